"""What each fine-tuning method costs, side by side on one machine (issue 14; the paper's Table 2 columns):
ABFT and E2E, full-rank and LoRA (r = 16 on q/k), in one precision, on one model.

For each method, alternating (so that drift in the machine's speed hits all alike), after a warm-up round
that is not summarised: the seconds of one optimiser step of 32 SST-2 training prompts (micro-batch 8), and
once the activation memory autograd keeps for one micro-batch of 8 (``SavedForBackward``, exact). Beside
them, read from the model: the trainable parameters and the paper's Param.* (parameters held in full
precision with gradients; E2E's include the LM head: ``full_precision_parameter_count``). The model is left
as it was after every measurement (W_Q/W_K restored, adapters removed).

    .venv/bin/python benchmarks/bench_cost.py --model smollm2-135m --out benchmarks/results/cost_smollm2
    .venv/bin/python benchmarks/bench_cost.py --model gemma3-270m --out benchmarks/results/cost_gemma3

Writes ``cost.csv`` (every measurement), ``summary.csv`` (per method: median seconds per step over the
repeats, activation MB, parameters, and each against ABFT's) and ``summary.json`` (with the command and
versions). Measure on a quiet machine: nothing else may share the cores.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, however this file is loaded
import bench_precision  # noqa: E402

METHODS = ("abft", "e2e", "abft-lora", "e2e-lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds after the warm-up round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: choose another --out")
    return args


def parameter_counts(model, method: str, precision: str, train) -> dict[str, int]:
    """Trainable parameters and Param.* of ``method`` on ``model``, read with the method's adapters on."""
    from abft_lens.training import full_precision_parameter_count

    with bench_precision.step_runner(model, method, precision, train) as runner:
        params = runner.params
        return {"trainable_params": sum(p.numel() for p in params.values()),
                "full_precision_params": full_precision_parameter_count(model, params, runner.config.objective)}


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: the median step time over the measured rounds (round 0 is the warm-up), the activation
    MB and the parameter counts, and the ratios to ABFT's."""
    steps = frame[frame["round"] > 0].groupby("method", sort=False)["seconds_per_step"].median()
    once = frame[frame["round"] == 0].set_index("method")[["saved_activation_mb", "trainable_params",
                                                          "full_precision_params"]]
    table = once.join(steps).reset_index()
    if "abft" in set(table["method"]):
        reference = table.set_index("method").loc["abft"]
        for column in ("seconds_per_step", "saved_activation_mb", "full_precision_params"):
            table[f"{column}_vs_abft"] = table[column] / reference[column]
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from abft_lens.benchmarking import exact_integers
    from abft_lens.models import load_model
    from abft_lens.runs import package_versions, write_json

    model = load_model(args.model)
    train, mean_tokens = bench_precision.speed_prompts(model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for round_ in range(args.repeats + 1):
        for method in args.methods:
            seconds, peak = bench_precision.timed_steps(model, method, args.precision, train, 1)
            row = {"round": round_, "method": method, "seconds_per_step": seconds[0], "added_peak_rss_mb": peak}
            if round_ == 0:
                row["saved_activation_mb"] = bench_precision.saved_activation_mb(model, method, args.precision, train)
                row.update(parameter_counts(model, method, args.precision, train))
            rows.append(row)
            print(f"round {round_} {method}: {seconds[0]:.2f} s per step", flush=True)
    frame = pd.DataFrame(rows)
    exact_integers(frame, 4).to_csv(args.out / "cost.csv", index=False, float_format="%.4g")  # counts in full
    table = summarise(frame)
    exact_integers(table, 4).to_csv(args.out / "summary.csv", index=False, float_format="%.4g")
    command = shlex.join([sys.executable, sys.argv[0] if argv is None else __file__,
                          *(sys.argv[1:] if argv is None else argv)])
    write_json(args.out / "summary.json", {
        "command": command, "model": args.model, "precision": args.precision, "threads": torch.get_num_threads(),
        "prompts_per_step": 32, "micro_batch": 8, "mean_prompt_tokens": mean_tokens,
        "methods": table.to_dict("records"), "versions": package_versions()})
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
