# One command each, on a fresh machine: `make demo` (install + main job), `make test` (install + tests).
PYTHON ?= python3
export PYTHONWARNINGS ?= ignore::UserWarning:clip.clip,ignore::FutureWarning

.PHONY: setup demo voc-demo test test-slow check

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m vpl_plugin demo --out demo_out

voc-demo: setup
	$(PYTHON) examples/voc_subset_pipeline.py

test: setup
	$(PYTHON) -m pytest -m "not slow" -q

test-slow: setup
	$(PYTHON) -m pytest -m slow -q

# Lint, types and the docstring examples (configuration in pyproject.toml); run by .ci/run.
check:
	$(PYTHON) -m ruff check vpl_plugin tests
	$(PYTHON) -m mypy vpl_plugin
	$(PYTHON) -m pytest --doctest-modules vpl_plugin -q -p no:cacheprovider -o addopts=""
