# The README's two commands: `make demo` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Model caches and run outputs stay inside the repository's ignored folders.
export ABFT_LENS_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env system-deps demo test test-fast bench notebooks-html clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	VENV=$(VENV) bash scripts/setup-env.sh
	touch $@

# System packages (apt-get, as root): Debian's chromium for static PNG figures. Never run by `make env`
# or `make test`; .ci/run calls it first. Without it, PNG tests skip and figures are HTML only.
system-deps:
	bash scripts/system-deps.sh

# The main job on the embedded model: rank the induction heads, fine-tune W_Q/W_K with ABFT at the
# paper's size (512 prompts, 32 steps of 32; 5 of the demo's 8 min on 2 CPU cores in bf16) with the lr that the
# benchmark's validation search chose for SST-2, and compare vanilla ICL with ABFT on held-out
# prompts (64 queries x 2 demonstration sets).
DEMO := runs/demo
demo: env
	$(VENV)/bin/abft-lens find-heads smollm2-135m --dataset sst2 --n-prompts 64 --out $(DEMO)/find-heads
	$(VENV)/bin/abft-lens finetune smollm2-135m --dataset sst2 --method abft --lr 3e-4 \
		--micro-batch-size 16 --out $(DEMO)/abft
	$(VENV)/bin/abft-lens evaluate smollm2-135m --dataset sst2 --n-test 64 --out $(DEMO)/vanilla
	$(VENV)/bin/abft-lens evaluate $(DEMO)/abft --n-test 64 --out $(DEMO)/abft/evaluate
	$(PY) scripts/compare_metrics.py vanilla=$(DEMO)/vanilla abft=$(DEMO)/abft/evaluate
	$(VENV)/bin/abft-lens report --index $(DEMO)
	@echo "Reports (open offline in a browser):"; find $(DEMO) -name report.html | sort | sed 's/^/  /'

test: env
	$(PY) -m pytest -q --durations=25

test-fast: env
	$(PY) -m pytest -q -m "not slow"

bench: env
	$(PY) benchmarks/bench_head_scoring.py

# The three notebooks executed at their committed (CI-sized) parameters, published as pages that open offline:
# docs/notebooks/*.html (committed, linked from the README) with one plotly.min.js and one notebook.css beside them.
# 2.5 min on 2 CPU cores. Rerun after editing a notebook: tests/test_notebooks.py checks that each page matches
# its notebook.
notebooks-html: env
	$(PY) scripts/render_notebooks.py

clean:
	rm -rf $(VENV) .cache runs
