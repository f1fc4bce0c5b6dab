# The two commands of the README: `make demo` (set up + run the embedded default) and `make test`.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test lint reference

setup:
	PYTHON=$(PY) bash scripts/setup.sh

demo: setup
	$(PY) -m tunesmith.cli demo

test: setup
	bash scripts/install-browser.sh
	bash scripts/install-slurm.sh
	lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint:
	ruff check src tests bench
	lint-imports

reference:
	$(PY) -m tunesmith.config.reference --write README.md
