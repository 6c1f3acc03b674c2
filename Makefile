# ocz_d2: one command to set up, one for the demo, one for the tests.
# Heavy dependencies live in a virtualenv outside the checkout, shared by all checkouts (see
# INSTALL.md; override with OCZ_VENV=/path); each checkout runs its own code through its own small
# .venv, which `make setup` creates.
OCZ_VENV ?= $(HOME)/.cache/ocz_d2/venv
PY := $(CURDIR)/.venv/bin/python
# ruff is a standalone binary: the shared one (python -m ruff looks for it beside .venv's python).
RUFF := $(OCZ_VENV)/bin/ruff
export OCZ_VENV
# pytest-xdist processes for `make test` (one per core: each test process runs torch on
# one thread, see tests/conftest.py); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= auto

.PHONY: setup setup-web test lint demo web

setup:
	@bash tools/setup_env.sh "$(OCZ_VENV)"

# setup, plus the web demo's packages (requirements-web.txt) and, for its browser test, Debian's
# chromium and chromedriver (apt-get, as root, once per machine).
setup-web:
	@OCZ_SETUP_WEB=1 bash tools/setup_env.sh "$(OCZ_VENV)"
	@bash tools/install_browser.sh

test: setup-web
	$(RUFF) check ocz_d2 tools tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=10 tests

lint: setup
	$(RUFF) check ocz_d2 tools tests
	$(RUFF) format --check ocz_d2 tools tests

demo: setup
	$(PY) tools/demo.py --output-dir output/demo

# The web page on the model `make demo` trained (http://127.0.0.1:7860).
web: setup
	@OCZ_SETUP_WEB=1 bash tools/setup_env.sh "$(OCZ_VENV)"
	$(PY) tools/web_demo.py --config-file configs/synthetic/ocz_tiny.yaml \
		MODEL.WEIGHTS output/demo/model_final.pth
