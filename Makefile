# `make demo` and `make test` work on a fresh clone with only Python 3.11 present.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export OPDFLOW_CACHE ?= $(CURDIR)/.cache/opdflow
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-fast chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opdflow run configs/demo.yaml --store ./opdflow-store

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not integration and not slow"

chromium:
	.ci/install-chromium

clean:
	rm -rf $(VENV) .prefect .cache opdflow-store
