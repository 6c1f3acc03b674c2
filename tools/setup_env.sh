#!/usr/bin/env bash
# Create or update the ocz_d2 environment of this checkout. Idempotent: a re-run with nothing
# changed takes seconds.
#
#   tools/setup_env.sh [VENV]      (default: $OCZ_VENV or ~/.cache/ocz_d2/venv)
#   OCZ_SETUP_WEB=1 tools/setup_env.sh [VENV]   also the web demo's packages (requirements-web.txt)
#
# Two virtualenvs:
# - VENV, shared by every checkout (clones, worktrees, CI), outside the repository: the heavy
#   dependencies (torch, requirements.txt, Detectron2). Rebuilt only when requirements.txt, the
#   torch pins or the Detectron2 installer change (a stamp file holds their hash). No ocz_d2 in it.
# - <checkout>/.venv (git-ignored), a few kB: sees VENV's packages through a .pth file and has
#   this checkout installed editable (--no-deps). Its interpreter runs this checkout's code, and
#   no other checkout's setup can change that.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${OCZ_VENV:-$HOME/.cache/ocz_d2/venv}}"
python_bin="${PYTHON:-python3}"
torch_spec=(torch==2.15.0 torchvision==0.29.2)

log() { echo "[setup] $*"; }

if ! "$python_bin" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "[setup] error: $python_bin is not Python >= 3.10; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  mkdir -p "$(dirname "$venv")"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
pip_raw=("$py" -m pip --disable-pip-version-check)
# pip's output without the machine-specific warnings about absent local index folders.
# pipefail + set -e: a failing command in front of it still stops the script with its status.
drop_index_warnings() { grep -v "is ignored: it is neither a file nor a directory" || true; }
pip_install() { "${pip_raw[@]}" install "$@" 2>&1 | drop_index_warnings; }

# Not the name the earlier layout (ocz_d2 installed into VENV) used: the two do not reset each
# other's stamp while both are in use.
stamp_file="$venv/.ocz_d2_deps_stamp"
stamp="$( (cat "$repo/requirements.txt" "$repo/tools/install_detectron2.py"; echo "${torch_spec[*]}") \
  | sha256sum | cut -d' ' -f1)"

if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  start=$(date +%s)
  log "installing ${torch_spec[*]} (CUDA builds from PyPI; they run on CPU too)"
  # This machine's find-links folder holds a CPU-only torch 2.13 that breaks torchvision's
  # compiled ops; the exact versions above make pip take the PyPI wheels instead.
  pip_install -q "${torch_spec[@]}"
  log "installing requirements.txt"
  pip_install -q -r "$repo/requirements.txt" "${torch_spec[@]}"
  log "installing Detectron2 (kept if one already imports)"
  "$py" "$repo/tools/install_detectron2.py" 2>&1 | drop_index_warnings
  echo "$stamp" > "$stamp_file"
  log "environment ready in $(( $(date +%s) - start )) s"
fi

# The web demo's extra (make test, make web): its own stamp, so that adding or removing it never
# rebuilds the heavy step above; requirements.txt as constraints, so that it changes no pin there.
web_stamp_file="$venv/.ocz_d2_web_stamp"
web_stamp="$( (cat "$repo/requirements-web.txt" "$repo/requirements.txt") | sha256sum | cut -d' ' -f1)"
if [ "${OCZ_SETUP_WEB:-0}" = "1" ] && [ "$(cat "$web_stamp_file" 2>/dev/null)" != "$web_stamp" ]; then
  start=$(date +%s)
  log "installing the web demo's packages (requirements-web.txt)"
  pip_install -q -r "$repo/requirements-web.txt" -c "$repo/requirements.txt"
  echo "$web_stamp" > "$web_stamp_file"
  log "web packages ready in $(( $(date +%s) - start )) s"
fi

# The checkout's own environment (seconds).
local_venv="$repo/.venv"
local_py="$local_venv/bin/python"
shared_site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$local_py" ]; then
  log "creating $local_venv (this checkout's interpreter; packages from $venv)"
  "$py" -m venv --without-pip "$local_venv"
fi
local_site="$("$local_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A plain path line: the shared packages become importable, but the .pth files in the shared
# site-packages (an editable ocz_d2 of some checkout, in the earlier layout) are not run.
echo "$shared_site" > "$local_site/_ocz_d2_shared_venv.pth"
# Run from / so that the working directory's own ocz_d2 folder does not answer for the install.
where_is_ocz_d2() {
  # find_spec locates the package without importing it (torch, Detectron2: seconds).
  (cd / && "$local_py" -c 'import importlib.util as u, os
print(os.path.dirname(os.path.dirname(os.path.realpath(u.find_spec("ocz_d2").origin))))' \
    2>/dev/null) || true
}
repo_real="$(cd "$repo" && pwd -P)"
if [ "$(where_is_ocz_d2)" != "$repo_real" ]; then
  log "installing ocz_d2 from $repo (editable, into $local_venv)"
  "$py" -m pip --disable-pip-version-check --python "$local_py" install -q --no-deps \
    --no-build-isolation -e "$repo" 2>&1 | drop_index_warnings
fi
found="$(where_is_ocz_d2)"
if [ "$found" != "$repo_real" ]; then
  echo "[setup] error: $local_py imports ocz_d2 from '${found:-nowhere}', not from this" \
    "checkout $repo" >&2
  exit 1
fi
log "ok: $local_py (ocz_d2 from $repo; dependencies from $venv)"
