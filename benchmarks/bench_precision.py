"""bf16 mixed precision against float32 on the embedded model: parity, then speed and memory.

Parts (each saved as it finishes under --out, so an interrupted run resumes; --parts picks some):

  loss      the ABFT loss and its gradient on W_Q/W_K on one fixed batch: relative error of bf16
  heads     find-heads on SST-2 (--n-heads-prompts): rank correlation of label_mass, top-10 heads,
            |delta label_mass| per head (heads_delta.csv)
  speed     side by side, alternating, in one process: an ABFT and an E2E optimiser step (32 prompts,
            micro-batch 8), find-heads prompts/s, evaluate inputs/s; added peak RSS per step (sampled),
            and the exact activation memory autograd keeps for one micro-batch of 8 (SavedForBackward);
            achieved GFLOP/s of the ABFT step beside a bf16 and an fp32 matmul peak measured here
  emulation on a CPU without bf16 instructions: native bf16 (PyTorch's fallback kernels) against the
            emulated bf16 matmuls (precision.EmulatedBf16Matmuls) and fp32, on one fixed batch of
            --emulation-prompts training prompts: the ABFT loss and gradient on W_Q/W_K, the label
            attention masses, the label logits and predictions, and the seconds of each forward+backward
  train     ABFT and E2E at the demo's size (SST-2, 512 prompts, 32 steps of 32, lr 3e-4) in each
            precision, each evaluated on 512 test queries x 2 demonstration sets in its own precision;
            per-step metrics in train_<method>_<precision>/metrics.jsonl

    .venv/bin/python benchmarks/bench_precision.py --out benchmarks/results/precision_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from abft_lens.benchmarking import PeakRSS, binomial_standard_error
from abft_lens.data import load_dataset
from abft_lens.evaluation import EvaluateConfig, evaluate
from abft_lens.find_heads import FindHeadsConfig, find_heads
from abft_lens.forward import query_logits_and_rows
from abft_lens.heads import gather_label_attention, induction_head_mask, label_attention
from abft_lens.lora import lora_attached
from abft_lens.loss import abft_loss
from abft_lens.models import load_model
from abft_lens.plots import save_figure
from abft_lens.precision import autocast, fast_bf16
from abft_lens.runs import package_versions, write_json
from abft_lens.training import (
    FinetuneConfig,
    FinetuneRunner,
    apply_tensors,
    only_these_require_grad,
    parameters_to_train,
    plan_heads,
    run_finetune,
    snapshot,
    trainable_parameters,
    training_prompts,
)

PRECISIONS = ("fp32", "bf16")
DEFAULT_PARTS = ("loss", "heads", "speed", "train")
PARTS = (*DEFAULT_PARTS, "emulation")  # "emulation" runs when named


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_smollm2"))
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-heads-prompts", type=int, default=256)
    parser.add_argument("--speed-repeats", type=int, default=2,
                        help="alternating repeats of each timing, after one warm-up repeat")
    parser.add_argument("--summarise-speed", action="store_true",
                        help="redraw speed.json from speed.csv (no timing)")
    parser.add_argument("--emulation-prompts", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=512)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


class SavedForBackward:
    """Bytes autograd keeps for the backward during a block: every tensor saved by a forward op,
    counted once per storage, parameters excluded. Inside one micro-batch's forward all of them are
    alive at once, so this is the activation memory of that forward, exactly and on any device
    (RSS on CPU is blurred by the allocator's reuse of freed pages)."""

    def __init__(self, model) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedForBackward:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def matmul_gflops(dtype: torch.dtype, repeats: int = 20) -> float:
    """The rate of a 2048x576 @ 576x1536 matmul (SmolLM2's MLP shape) in ``dtype``."""
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 2048 * 576 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def abft_step_flops(model, n_prompts: int, mean_tokens: float, deepest_layer: int) -> float:
    """Forward + backward FLOPs of an ABFT step up to the deepest needed layer: 2 per multiply-add of
    every projection and of QK^T / pattern @ V, times 2 (the backward computes activation gradients
    everywhere, about one forward, but weight gradients only for W_Q/W_K)."""
    cfg = model.cfg
    d, n_kv = cfg.d_model, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    d_head = cfg.d_head
    per_token_layer = 2 * (d * cfg.n_heads * d_head * 2 + d * n_kv * d_head * 2 + 3 * d * cfg.d_mlp)
    attention = 2 * 2 * cfg.n_heads * d_head * mean_tokens / 2  # causal: half the keys on average
    return 2 * n_prompts * mean_tokens * (deepest_layer + 1) * (per_token_layer + attention)


def fixed_training_batch(model, n_prompts: int):
    """The first ``n_prompts`` training prompts of the default config, collated: the loss and emulation parts' batch."""
    train, _ = training_prompts(model, FinetuneConfig(n_train=n_prompts, n_val=0, lr=1e-4))
    return train.collate(range(n_prompts))


def loss_and_gradient_errors(loss: torch.Tensor, grad: torch.Tensor, reference_loss: torch.Tensor,
                             reference_grad: torch.Tensor) -> dict:
    """How far an ABFT loss and its flattened gradient are from a reference's."""
    return {"loss_relative_error": float((loss - reference_loss).abs() / reference_loss.abs()),
            "gradient_relative_error": float((grad - reference_grad).norm() / reference_grad.norm()),
            "gradient_cosine": float(torch.nn.functional.cosine_similarity(grad.double(), reference_grad.double(), dim=0))}


def part_loss(model, out: Path) -> dict:
    batch = fixed_training_batch(model, 8)
    params = trainable_parameters(model, "qk")
    layers = list(range(model.cfg.n_layers))
    results = {}
    with only_these_require_grad(model, params):
        for precision in PRECISIONS:
            with autocast(precision, model):
                attention = label_attention(model, batch, layers)
            mask = induction_head_mask(attention, batch.prompt_lengths)
            if precision == "fp32":
                fixed_mask = mask  # the same heads in both, so the comparison is of the same function
            out_loss = abft_loss(attention, batch.correct_mask, fixed_mask, 0.5, 1.0)
            grads = torch.autograd.grad(out_loss.loss, list(params.values()))
            results[precision] = (out_loss.loss.detach(), torch.cat([g.flatten() for g in grads]),
                                  mask)
    (loss32, grad32, mask32), (loss16, grad16, mask16) = results["fp32"], results["bf16"]
    summary = {
        "loss_fp32": float(loss32), "loss_bf16": float(loss16),
        **loss_and_gradient_errors(loss16, grad16, loss32, grad32),
        "head_mask_agreement": float((mask16 == mask32).double().mean()),
        "flagged_heads_fp32": int(mask32.sum()), "flagged_heads_bf16": int(mask16.sum()),
    }
    write_json(out / "loss.json", summary)
    return summary


def part_emulation(model, out: Path, n_prompts: int) -> dict:
    batch = fixed_training_batch(model, n_prompts)
    params = trainable_parameters(model, "qk")
    layers = list(range(model.cfg.n_layers))
    results, fixed_mask = {}, None
    with only_these_require_grad(model, params):
        for name in ("fp32", "bf16_emulated", "bf16_native"):
            start = time.perf_counter()
            block_outputs: dict[int, torch.Tensor] = {}
            keep_outputs = [(f"blocks.{layer}.hook_resid_post",
                             lambda t, hook, layer=layer: block_outputs.__setitem__(layer, t.detach().float().clone()))
                            for layer in layers]
            with (autocast("fp32" if name == "fp32" else "bf16", model, emulate_bf16=name == "bf16_emulated"),
                  model.hooks(fwd_hooks=keep_outputs)):
                logits, rows = query_logits_and_rows(model, batch, layers, detach_rows=False)
            attention = gather_label_attention(rows, batch.label_positions)
            if fixed_mask is None:
                fixed_mask = induction_head_mask(attention, batch.prompt_lengths)  # fp32's heads for all three
            out_loss = abft_loss(attention, batch.correct_mask, fixed_mask, 0.5, 1.0)
            grads = torch.autograd.grad(out_loss.loss, list(params.values()))
            seconds = time.perf_counter() - start
            label = logits.detach().index_select(-1, batch.label_token_ids)
            results[name] = {"loss": out_loss.loss.detach(), "grad": torch.cat([g.flatten() for g in grads]),
                             "attention": attention.detach(), "label_logits": label, "seconds": seconds,
                             "block_outputs": block_outputs}
            print(f"  {name}: {seconds:.1f} s", flush=True)

    real = batch.attention_mask.bool()

    def compare(a: str, b: str) -> dict:
        x, y = results[a], results[b]
        return {**loss_and_gradient_errors(x["loss"], x["grad"], y["loss"], y["grad"]),
                "max_abs_delta_label_attention": float((x["attention"] - y["attention"]).abs().max()),
                "max_abs_delta_label_logit": float((x["label_logits"] - y["label_logits"]).abs().max()),
                "same_predictions": bool((x["label_logits"].argmax(-1) == y["label_logits"].argmax(-1)).all()),
                # how a difference grows with depth: per block, the relative distance of its output
                # (real positions only) and the share of its elements that are bit-identical
                "block_output_relative_distance": [
                    float((x["block_outputs"][l] - y["block_outputs"][l])[real].norm() / y["block_outputs"][l][real].norm())
                    for l in layers],
                "block_output_identical_share": [
                    float((x["block_outputs"][l] == y["block_outputs"][l])[real].float().mean()) for l in layers]}

    summary = {"n_prompts": n_prompts, "mean_tokens": float(batch.attention_mask.sum(-1).float().mean()),
               "emulated_vs_native": compare("bf16_emulated", "bf16_native"),
               "native_vs_fp32": compare("bf16_native", "fp32"),
               "emulated_vs_fp32": compare("bf16_emulated", "fp32"),
               "seconds": {name: r["seconds"] for name, r in results.items()}}
    write_json(out / "emulation.json", summary)
    return summary


def part_heads(model, out: Path, n_prompts: int) -> dict:
    tables = {}
    for precision in PRECISIONS:
        config = FindHeadsConfig(n_prompts=n_prompts, precision=precision, out=str(out / f"heads_{precision}"))
        result = find_heads(config, model=model, progress=False)
        tables[precision] = result.scores.table.set_index(["layer", "head"]).sort_index()
        tables[precision + "_seconds"] = result.seconds
    a, b = tables["fp32"], tables["bf16"]
    delta = (b["label_mass"] - a["label_mass"]).rename("delta_label_mass").to_frame()
    delta["label_mass_fp32"], delta["label_mass_bf16"] = a["label_mass"], b["label_mass"]
    delta.reset_index().to_csv(out / "heads_delta.csv", index=False, float_format="%.6g")
    top = {p: set(tables[p].sort_values("rank").head(10).index) for p in PRECISIONS}
    summary = {
        "n_prompts": n_prompts,
        "label_mass_spearman": float(a["label_mass"].rank().corr(b["label_mass"].rank())),  # Spearman: Pearson of ranks
        "same_top10_by_pass_rate": top["fp32"] == top["bf16"], "top10_overlap": len(top["fp32"] & top["bf16"]),
        "max_abs_delta_label_mass": float(delta["delta_label_mass"].abs().max()),
        "mean_abs_delta_label_mass": float(delta["delta_label_mass"].abs().mean()),
        "max_abs_delta_pass_rate": float((b["pass_rate"] - a["pass_rate"]).abs().max()),
        "seconds_fp32": tables["fp32_seconds"], "seconds_bf16": tables["bf16_seconds"],
    }
    write_json(out / "heads.json", summary)
    return summary


@contextmanager
def step_runner(model, method: str, precision: str, train, batch_size: int = 32, micro_batch: int = 8, steps: int = 1):
    """A FinetuneRunner for ``method`` (full-rank or LoRA) at lr 1e-4 on ``train``, its parameters made the
    only ones with gradients; afterwards the trained tensors are restored and any adapter removed, so the
    model is as it was."""
    config = FinetuneConfig(method=method, lr=1e-4, batch_size=batch_size, micro_batch_size=micro_batch, steps=steps,
                            precision=precision, n_val=0)
    with lora_attached(model, config.lora_settings(), config.seed):
        params = parameters_to_train(model, config)
        initial = snapshot(params)
        try:
            runner = FinetuneRunner(model, train, config, 1e-4, plan_heads(config.heads, model.cfg.n_layers,
                                                                           model.cfg.n_heads), params)
            with only_these_require_grad(model, params):
                yield runner
        finally:
            apply_tensors(model, initial)


def timed_steps(model, method: str, precision: str, train, repeats: int) -> tuple[list[float], float]:
    """Seconds of ``repeats`` optimiser steps of 32 prompts (micro-batch 8) and the largest added peak RSS."""
    seconds, peak = [], 0.0
    with step_runner(model, method, precision, train, steps=repeats) as runner:
        for _ in range(repeats):
            with PeakRSS() as rss:
                row = runner.step()
            seconds.append(row["seconds"])
            peak = max(peak, rss.added_mb)
    return seconds, peak


def saved_activation_mb(model, method: str, precision: str, train, micro_batch: int = 8) -> float:
    """Activation memory of one micro-batch's forward (``SavedForBackward``): one step of one
    micro-batch, so no storage is freed and reused inside the measured block."""
    with step_runner(model, method, precision, train, batch_size=micro_batch, micro_batch=micro_batch) as runner, \
            SavedForBackward(model) as saved:
        runner.step()
    return saved.mb


def speed_prompts(model):
    """The training prompts the speed part times, and their mean length in tokens (for the FLOPs)."""
    train, _ = training_prompts(model, FinetuneConfig(n_train=128, n_val=0, lr=1e-4))
    return train, float(np.mean([len(p.tokens) for p in train.prompts]))


def part_speed(model, out: Path, repeats: int) -> dict:
    train, mean_tokens = speed_prompts(model)
    rows = []
    sst2 = load_dataset("sst2")
    # Repeat 0 is a warm-up and is not summarised: the first step of each kind pays one-time costs
    # (oneDNN kernel generation, the allocator growing the heap: 19.5 s and 2 GB for the first fp32
    # ABFT step against 8.6 s and 0.4 GB for the next, measured).
    for repeat in range(repeats + 1):
        for precision in PRECISIONS:  # alternating, so drift in the machine's speed hits both alike
            for method in ("abft", "e2e"):
                seconds, peak = timed_steps(model, method, precision, train, 1)
                rows.append({"repeat": repeat, "precision": precision, "what": f"{method}_step_32_prompts",
                             "seconds": seconds[0], "added_peak_rss_mb": peak})
            config = FindHeadsConfig(n_prompts=32, precision=precision, out=str(out / "scratch_heads"))
            with PeakRSS() as rss:
                seconds = find_heads(config, model=model, progress=False).seconds
            rows.append({"repeat": repeat, "precision": precision, "what": "find_heads_32_prompts",
                         "seconds": seconds, "added_peak_rss_mb": rss.added_mb})
            started = time.perf_counter()
            with PeakRSS() as rss:
                evaluate(model, sst2, EvaluateConfig(n_test=32, demo_sets=2, precision=precision), progress=False)
            rows.append({"repeat": repeat, "precision": precision, "what": "evaluate_64_inputs",
                         "seconds": time.perf_counter() - started, "added_peak_rss_mb": rss.added_mb})
    for precision in PRECISIONS:
        for method in ("abft", "e2e"):
            rows.append({"repeat": 1, "precision": precision, "what": f"{method}_micro_batch_8",
                         "saved_activation_mb": saved_activation_mb(model, method, precision, train)})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "speed.csv", index=False, float_format="%.4g")
    summary = summarise_speed(frame, model, mean_tokens)
    write_json(out / "speed.json", summary)
    return summary


def summarise_speed(frame: pd.DataFrame, model, mean_tokens: float) -> dict:
    """Medians over the repeats after the warm-up (repeat 0), speed-ups and GFLOP/s."""
    frame = frame[frame["repeat"] > 0]
    saved = (frame.dropna(subset=["saved_activation_mb"]).set_index(["precision", "what"])["saved_activation_mb"]
             if "saved_activation_mb" in frame else pd.Series(dtype=float))
    frame = frame.dropna(subset=["seconds"])
    median = frame.groupby(["what", "precision"])[["seconds", "added_peak_rss_mb"]].median().unstack("precision")
    speedup = (median["seconds"]["fp32"] / median["seconds"]["bf16"]).round(2).to_dict()
    flops = abft_step_flops(model, 32, mean_tokens, model.cfg.n_layers - 1)
    summary = {
        "threads": torch.get_num_threads(), "mean_prompt_tokens": mean_tokens, "repeats": int(frame["repeat"].nunique()),
        "median_seconds": {f"{w}/{p}": round(float(v), 3) for (w, p), v in median["seconds"].stack().items()},
        "median_added_peak_rss_mb": {f"{w}/{p}": round(float(v), 1)
                                     for (w, p), v in median["added_peak_rss_mb"].stack().items()},
        "bf16_speedup": speedup,
        "abft_over_e2e_step_time": {p: round(float(median["seconds"][p]["abft_step_32_prompts"]
                                                   / median["seconds"][p]["e2e_step_32_prompts"]), 3)
                                    for p in PRECISIONS},
        "abft_over_e2e_peak_rss": {p: round(float(median["added_peak_rss_mb"][p]["abft_step_32_prompts"]
                                                  / median["added_peak_rss_mb"][p]["e2e_step_32_prompts"]), 3)
                                   for p in PRECISIONS},
        "saved_activation_mb_micro_batch_8": {f"{w}/{p}": round(float(v), 1) for (p, w), v in saved.items()},
        "abft_over_e2e_saved_activations": {p: round(float(saved[(p, "abft_micro_batch_8")]
                                                        / saved[(p, "e2e_micro_batch_8")]), 3)
                                            for p in PRECISIONS if (p, "abft_micro_batch_8") in saved},
        "abft_step_gflop": round(flops / 1e9, 1),
        "abft_step_gflops_achieved": {p: round(flops / 1e9 / float(median["seconds"][p]["abft_step_32_prompts"]), 1)
                                      for p in PRECISIONS},
        "matmul_peak_gflops": {"fp32": round(matmul_gflops(torch.float32), 1),
                               "bf16": round(matmul_gflops(torch.bfloat16), 1)},
    }
    return summary


def part_train(model, out: Path, steps: int, n_test: int) -> dict:
    params = trainable_parameters(model, "qk")
    base = snapshot(params)
    sst2 = load_dataset("sst2")
    table_path = out / "train.csv"
    done = pd.read_csv(table_path) if table_path.is_file() else pd.DataFrame(columns=["method", "precision"])
    for method in ("abft", "e2e"):
        for precision in PRECISIONS:
            if ((done["method"] == method) & (done["precision"] == precision)).any():
                continue
            run_dir = out / f"train_{method}_{precision}"
            config = FinetuneConfig(method=method, lr=3e-4, steps=steps, micro_batch_size=16, precision=precision,
                                    out=str(run_dir), resume=True)
            try:
                result = run_finetune(config, model=model, progress=True)
                metrics = evaluate(model, sst2, EvaluateConfig(n_test=n_test, demo_sets=2, precision=precision),
                                   progress=True).metrics
            finally:
                apply_tensors(model, base)
            row = {"method": method, "precision": precision, "accuracy": metrics["accuracy"],
                   "macro_f1": metrics["macro_f1"], "n_inputs": metrics["n_inputs"],
                   "accuracy_se": binomial_standard_error(metrics["accuracy"], metrics["n_inputs"]),
                   "predicted_distribution": json.dumps(metrics["predicted_distribution"]),
                   "collapsed_onto": metrics["collapsed_onto"], "train_seconds": result.train_seconds,
                   "seconds_per_step": result.seconds_per_step, "eval_seconds": metrics["seconds"]}
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(table_path, index=False, float_format="%.4g")
    return done.to_dict("records")


def train_parity_figure(out: Path):
    """Per optimiser step, fp32 and bf16 together: the flagged-head count and the correct and wrong
    label mass of the flagged heads (ABFT), and the loss (ABFT and E2E)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=3, subplot_titles=("ABFT: flagged heads per prompt",
                                                           "ABFT: label mass of flagged heads", "loss"))
    colours = {"fp32": "#1f77b4", "bf16": "#d62728"}
    for precision in PRECISIONS:
        colour = colours[precision]
        for method in ("abft", "e2e"):
            path = out / f"train_{method}_{precision}" / "metrics.jsonl"
            if not path.is_file():
                continue
            metrics = pd.read_json(path, lines=True)
            dash = "solid" if method == "abft" else "dot"
            figure.add_trace(go.Scatter(x=metrics["step"], y=metrics["loss"], name=f"{method} loss, {precision}",
                                        line={"color": colour, "dash": dash}), row=1, col=3)
            if method != "abft":
                continue
            figure.add_trace(go.Scatter(x=metrics["step"], y=metrics["flagged_heads"], name=f"flagged, {precision}",
                                        line={"color": colour}), row=1, col=1)
            for column, mass_dash in (("correct_mass", "solid"), ("wrong_mass", "dash")):
                figure.add_trace(go.Scatter(x=metrics["step"], y=metrics[column],
                                            name=f"{column.split('_')[0]} mass, {precision}",
                                            line={"color": colour, "dash": mass_dash}), row=1, col=2)
    figure.update_xaxes(title_text="optimiser step")
    figure.update_layout(template="plotly_white", width=1300, height=420,
                         title="bf16 against fp32 during training (SST-2, 32 steps of 32, lr 3e-4)")
    return figure


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fast, seen = fast_bf16("cpu")
    write_json(args.out / "machine.json", {"fast_bf16": fast, "seen": seen, "threads": torch.get_num_threads(),
                                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                                           "versions": package_versions()})
    model = load_model(args.model)
    if args.summarise_speed:
        _, mean_tokens = speed_prompts(model)
        write_json(args.out / "speed.json", summarise_speed(pd.read_csv(args.out / "speed.csv"), model, mean_tokens))
        return
    parts = args.parts.split(",")
    if "loss" in parts:
        print("loss", json.dumps(part_loss(model, args.out)), flush=True)
    if "heads" in parts:
        print("heads", json.dumps(part_heads(model, args.out, args.n_heads_prompts)), flush=True)
    if "speed" in parts:
        print("speed", json.dumps(part_speed(model, args.out, args.speed_repeats)), flush=True)
    if "emulation" in parts:
        print("emulation", json.dumps(part_emulation(model, args.out, args.emulation_prompts)), flush=True)
    if "train" in parts:
        print("train", json.dumps(part_train(model, args.out, args.train_steps, args.n_test)), flush=True)
        save_figure(train_parity_figure(args.out), args.out / "train_parity", png=True)


if __name__ == "__main__":
    main()
