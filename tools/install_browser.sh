#!/usr/bin/env bash
# Debian's chromium and chromedriver, for the web demo's headless-browser test
# (tests/test_web_demo.py). Idempotent: nothing happens when both are there.
#
#   tools/install_browser.sh        (make test runs it)
#
# Installs with apt-get when run as root (CI, the project's machines). Elsewhere, or when the
# install fails, it says what to install and exits 0, and the browser test is skipped with that
# reason; under CI (CI set) a failed install is an error, because the test must run there.
set -euo pipefail

log() { echo "[browser] $*"; }

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
missing="Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  log "not root or no apt-get: install $missing for the browser test; it is skipped without them"
  if [ -n "${CI:-}" ]; then exit 1; fi
  exit 0
fi
start=$(date +%s)
log "installing chromium and chromium-driver with apt-get (once per machine)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends chromium chromium-driver >/dev/null; }; then
  log "apt-get failed: install $missing for the browser test"
  if [ -n "${CI:-}" ]; then exit 1; fi
  exit 0
fi
log "chromium and chromedriver installed in $(( $(date +%s) - start )) s"
