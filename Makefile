# Quick start:  make demo   (sets up .venv, runs the demo on CPU ranks or GPUs)
#               make test   (sets up .venv, runs the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-compat lint format lock clean

# The test and pipelines extras: tests, and what diffusers' pipelines need (transformers, tokenizers, ...).
$(STAMP): pyproject.toml requirements/lock.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "cocodiff needs Python 3.11 or newer ($(PYTHON) is " + sys.version.split()[0] + "): make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[test,pipelines]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cocodiff demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the oldest diffusers of the tested range (pyproject, cocodiff/compat.py): the model-family tests
COMPAT := .venv-compat
$(COMPAT)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q torch==2.13.0 diffusers==0.41.0 numpy==2.4.6 safetensors==0.8.0 tqdm \
		pillow pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.17
	$(COMPAT)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests/test_models.py

# Re-pin requirements/lock.txt: a fresh venv from pyproject's ranges (torch and diffusers held), then pip freeze.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "torch==2.13.0" "diffusers==0.42.1" -e ".[test,pipelines]"
	head -5 requirements/lock.txt > requirements/lock.new
	.venv-lock/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' >> requirements/lock.new
	mv requirements/lock.new requirements/lock.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(COMPAT) cocodiff-out
