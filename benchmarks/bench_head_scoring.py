"""Head scoring: our scorer against the way notebooks usually do it, on the embedded model.

    .venv/bin/python benchmarks/bench_head_scoring.py [--n-prompts 64] [--batch-size 8] [--fresh]

Three ways to get every head's label attention at the query's last token over the same prompts:
  naive           run_with_cache of every hook on each prompt alone (full forward), then slice
  cache_batched   run_with_cache of every hook on the same left-padded batches as ours
  ours            score_heads: hooks on hook_pattern only, keep the query row, stop after the
                  deepest needed layer, batched (float32, like the other two)
  ours_bf16       the same under bf16 autocast mixed precision (abft_lens.precision), against the
                  float32 ways a notebook uses
Each runs in a fresh subprocess, so that its memory is its own. Peak memory is the highest
resident set size sampled (every 2 ms) while scoring, minus the resident size just before: what
scoring adds on top of the loaded model (large blocks are served by mmap, see MEASURING_ENV, so
the resident size follows live memory rather than what the allocator kept). Results are saved per method as they finish
(benchmarks/results/head_scoring/), so an interrupted run resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "head_scoring"
METHODS = ("naive", "cache_batched", "ours", "ours_bf16")
# glibc keeps freed heap memory in the process, so the resident size would remember the largest
# transient of any earlier step; serving large blocks with mmap returns them on free, so the
# sampled resident size follows live memory. Same setting for every method.
MEASURING_ENV = {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure(method: str, n_prompts: int, batch_size: int) -> dict:
    import torch

    from abft_lens.benchmarking import PeakRSS
    from abft_lens.data import load_dataset, split_pools
    from abft_lens.heads import HeadScoreConfig, HeadStatistics, accumulate_head_statistics
    from abft_lens.models import load_model
    from abft_lens.precision import autocast
    from abft_lens.prompts import build_prompts

    torch.set_num_threads(torch.get_num_threads())
    model = load_model("smollm2-135m")
    dataset = load_dataset("sst2")
    prompts = build_prompts(model.tokenizer, dataset, split_pools(dataset, seed=42).train, n_prompts=n_prompts,
                            k=4, seed=42)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def from_cache(batch_indices: list[int], stats: HeadStatistics) -> None:
        batch = prompts.collate(batch_indices)
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
        rows = torch.stack([cache[name][:, :, -1, :] for name in names], dim=1)
        index = batch.label_positions[:, None, None, :].expand(-1, n_layers, n_heads, -1)
        stats.add(rows.gather(-1, index), batch.correct_mask, batch.prompt_lengths, "paper", 2.0)
        del cache

    with torch.no_grad():
        # A short warm-up forward so that one-off costs (lazy initialisation) are not timed; it
        # caches nothing, so the memory baseline holds the model and no activations.
        model(prompts.collate([0]).tokens[:, :8])
        stats = HeadStatistics.zeros(n_layers, n_heads)
        with PeakRSS() as memory:
            started = time.perf_counter()
            if method in ("ours", "ours_bf16"):
                with autocast("bf16" if method == "ours_bf16" else "fp32", model):
                    stats = accumulate_head_statistics(model, prompts, HeadScoreConfig(batch_size=batch_size),
                                                       progress=False)
            else:
                size = 1 if method == "naive" else batch_size
                for start in range(0, len(prompts), size):
                    from_cache(list(range(start, min(start + size, len(prompts)))), stats)
            seconds = time.perf_counter() - started
    return {
        "method": method, "n_prompts": n_prompts, "batch_size": 1 if method == "naive" else batch_size,
        "seconds": round(seconds, 2), "prompts_per_second": round(n_prompts / seconds, 2),
        "peak_added_memory_mb": round(memory.added_mb, 1), "threads": torch.get_num_threads(),
        "label_mass": (stats.label_mass / stats.n_prompts).tolist(),
        "pass_rate": (stats.passes / stats.n_prompts).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="discard saved results and measure again")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.n_prompts, args.batch_size)))
        return

    import numpy as np

    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in METHODS:
        path = RESULTS / f"{method}.json"
        if path.exists() and not args.fresh:
            saved = json.loads(path.read_text())
            if (saved["n_prompts"], saved["batch_size"]) in ((args.n_prompts, args.batch_size), (args.n_prompts, 1)):
                results[method] = saved
                print(f"{method}: reusing {path}")
                continue
        print(f"{method}: measuring {args.n_prompts} prompts ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--method", method, "--n-prompts", str(args.n_prompts),
                                "--batch-size", str(args.batch_size)], capture_output=True, text=True,
                               env={**os.environ, **MEASURING_ENV}, check=True)
        results[method] = json.loads(child.stdout.strip().splitlines()[-1])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results[method]))
        os.replace(tmp, path)

    ours, naive = results["ours"], results["naive"]
    print(f"\nHead scoring on smollm2-135m, sst2, k=4, {args.n_prompts} prompts, all 30 layers x 9 heads "
          f"({ours['threads']} threads):")
    print(f"{'method':<15}{'seconds':>9}{'prompts/s':>11}{'peak MB':>10}{'time x':>9}{'memory x':>10}"
          f"{'max |dS|':>11}")
    for method in METHODS:
        r = results[method]
        diff = float(np.abs(np.array(r["label_mass"]) - np.array(ours["label_mass"])).max())
        print(f"{method:<15}{r['seconds']:>9.1f}{r['prompts_per_second']:>11.2f}{r['peak_added_memory_mb']:>10.1f}"
              f"{r['seconds'] / ours['seconds']:>9.2f}{r['peak_added_memory_mb'] / max(ours['peak_added_memory_mb'], 1e-9):>10.1f}"
              f"{diff:>11.2e}")
    float32 = [m for m in METHODS if m != "ours_bf16"]
    same_passes = all(np.array_equal(np.array(results[m]["pass_rate"]), np.array(ours["pass_rate"])) for m in float32)
    print(f"pass rates identical across the float32 methods: {same_passes}")
    speedup = naive["seconds"] / ours["seconds"]
    memory = naive["peak_added_memory_mb"] / max(ours["peak_added_memory_mb"], 1e-9)
    print(f"ours vs naive (both fp32): {speedup:.1f}x faster (target 3x), {memory:.1f}x less added peak memory")
    bf16 = results["ours_bf16"]
    print(f"ours in bf16 vs naive fp32: {naive['seconds'] / bf16['seconds']:.1f}x faster (target 5x), "
          f"{naive['peak_added_memory_mb'] / max(bf16['peak_added_memory_mb'], 1e-9):.1f}x less added peak memory")


if __name__ == "__main__":
    main()
