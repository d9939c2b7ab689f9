#!/usr/bin/env bash
# The README's two screenshots (docs/img/): the attention view of the embedded model, and the report of a
# short ABFT run (128 prompts, 8 steps of 16, lr 1e-4; about 3 min on 2 CPU cores) with its evaluation, taken with
# headless Chromium. Run from the repository root; run folders go to runs/screenshots/.
set -euo pipefail
VENV=${VENV:-.venv}
OUT=${OUT:-runs/screenshots}
CHROMIUM=${CHROMIUM:-chromium}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
rm -rf "$OUT" && mkdir -p "$OUT" docs/img
"$VENV/bin/python" -m abft_lens show-attention smollm2-135m --dataset sst2 --prompt 3 --heads top:8 --out "$OUT/attention.html"
"$VENV/bin/python" -m abft_lens finetune smollm2-135m --dataset sst2 --method abft --n-train 128 --batch-size 16 --steps 8 \
  --lr 1e-4 --out "$OUT/abft"
"$VENV/bin/python" -m abft_lens evaluate "$OUT/abft" --n-test 32 --robustness --robustness-queries 16
"$VENV/bin/python" -m abft_lens report "$OUT/abft"   # the run's page again, now linking its evaluation
shot() { "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=10000 \
  --window-size="$2" --screenshot="$3" "file://$PWD/$1" 2>/dev/null; }
shot "$OUT/attention.html" 1040,560 docs/img/attention_view.png
shot "$OUT/abft/report.html" 1300,1900 docs/img/report.png
echo "docs/img/attention_view.png docs/img/report.png"
