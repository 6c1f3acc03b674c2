# ocz_d2: one command to set up, one for the demo, one for the tests.
# The virtualenv lives outside the checkout (see INSTALL.md); override with OCZ_VENV=/path.
OCZ_VENV ?= $(HOME)/.cache/ocz_d2/venv
PY := $(OCZ_VENV)/bin/python
export OCZ_VENV

.PHONY: setup test lint demo

setup:
	@bash tools/setup_env.sh "$(OCZ_VENV)"

test: setup
	$(PY) -m ruff check ocz_d2 tools tests
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check ocz_d2 tools tests
	$(PY) -m ruff format --check ocz_d2 tools tests

demo: setup
	$(PY) tools/demo.py --output-dir output/demo
