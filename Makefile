# The README's two commands: `make demo` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Model caches and run outputs stay inside the repository's ignored folders.
export ABFT_LENS_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env demo test test-fast bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	VENV=$(VENV) bash scripts/setup-env.sh
	touch $@

demo: env
	$(VENV)/bin/abft-lens find-heads smollm2-135m --dataset sst2 --n-prompts 64 --out runs/demo/find-heads

test: env
	$(PY) -m pytest -q

test-fast: env
	$(PY) -m pytest -q -m "not slow"

bench: env
	$(PY) benchmarks/bench_head_scoring.py

clean:
	rm -rf $(VENV) .cache runs
