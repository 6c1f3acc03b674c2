#!/usr/bin/env bash
# Create or update the ocz_d2 environment. Idempotent: a re-run with nothing changed takes seconds.
#
#   tools/setup_env.sh [VENV]      (default: $OCZ_VENV or ~/.cache/ocz_d2/venv)
#
# The virtualenv lives outside the repository so that fresh clones (CI, worktrees) reuse it.
# Heavy steps (torch, requirements, Detectron2) run only when requirements.txt or the installer
# scripts changed since the last successful run (a stamp file holds their hash); the editable
# install of ocz_d2 is redone whenever the environment points at another checkout.
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

stamp_file="$venv/.ocz_d2_stamp"
stamp="$(cat "$repo/requirements.txt" "$repo/tools/setup_env.sh" "$repo/tools/install_detectron2.py" \
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
  rm -f "$venv/.ocz_d2_repo"
  echo "$stamp" > "$stamp_file"
  log "environment ready in $(( $(date +%s) - start )) s"
fi

# Editable install of this checkout (seconds); skipped when it already points here.
if [ "$(cat "$venv/.ocz_d2_repo" 2>/dev/null)" != "$repo" ] \
   || ! "$py" -c 'import ocz_d2' >/dev/null 2>&1; then
  log "installing ocz_d2 from $repo (editable)"
  pip_install -q --no-deps --no-build-isolation -e "$repo"
  echo "$repo" > "$venv/.ocz_d2_repo"
fi
log "ok: $py"
