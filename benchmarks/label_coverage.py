"""How often a training prompt has no demonstration of its query's label (issue 18's "why ABFT stalls").

    .venv/bin/python benchmarks/label_coverage.py [--model smollm2-135m] [--seeds 42 43 44] \
        [--out benchmarks/results/label_coverage.csv] [--overwrite]

On such a prompt the ABFT loss has no reward term: only the punishment of wrong labels acts. For each paper
data set and seed this builds the training prompts exactly as `finetune` does (the paper's recipe: 512
prompts, k = 4, from the training pool; ``training_prompts``), once with random demonstrations (the paper's)
and with each ``--training-demos`` that covers the label (``label_covering``, forcing one such demonstration;
``label_covering_resampled``, redrawing random sets until one holds it), and writes the share without the query's label beside
(1 - 1/n_labels)^k, the share for balanced labels; and the mean share of a prompt's demonstrations that carry
the query's label (``query_label_demos_*``: 1/n_labels for random ones and balanced labels; forcing one
demonstration of the query's label raises it, which makes that label the demonstrations' majority more often
than at test time; redrawing raises it less). The model is loaded for its tokenizer and never run:
a minute on 2 cores, so the script writes its table at the end and does not resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import get_args

import pandas as pd

from abft_lens.choices import TrainingDemos
from abft_lens.data import PAPER_DATASETS, load_dataset
from abft_lens.prompts import query_label_demo_share, share_without_query_label
from abft_lens.errors import ConfigError
from abft_lens.runs import atomic_write_text, check_out_file
from abft_lens.training import FinetuneConfig, training_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", nargs="+", choices=list(PAPER_DATASETS), default=list(PAPER_DATASETS),
                        metavar="DATASET", help=f"paper data sets (default: all of {', '.join(PAPER_DATASETS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    # Not the committed table's name: a bare run must not stop on (or replace) the file RESULTS.md cites.
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label_coverage.csv"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        check_out_file(args.out, (".csv",), args.overwrite)
    except ConfigError as error:
        parser.error(str(error))
    return args


def coverage_rows(model, datasets: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for dataset in datasets:
        n_labels = len(load_dataset(dataset).label_words)
        for seed in seeds:
            config = FinetuneConfig(dataset=dataset, seed=seed)  # the paper's recipe: n_train, k, pools
            prompts = {demos: training_prompts(model, dataclasses.replace(config, training_demos=demos))[0]
                       for demos in get_args(TrainingDemos)}
            shares = {demos: share_without_query_label(prompts[demos]) for demos in prompts}
            rows.append(dict(dataset=dataset, n_labels=n_labels, seed=seed, k=config.k, n_prompts=config.n_train,
                             **shares, balanced_random=(1 - 1 / n_labels) ** config.k,
                             **{f"query_label_demos_{demos}": query_label_demo_share(prompts[demos])
                                for demos in prompts}))
            print(f"{dataset} seed {seed}: {shares['random']:.3f} of the prompts without the query's label "
                  f"(label-covering {shares['label_covering']:.3f}, resampled "
                  f"{shares['label_covering_resampled']:.3f})", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from abft_lens.models import load_model  # after the argument checks: loading takes seconds

    table = coverage_rows(load_model(args.model), args.datasets, args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, table.to_csv(index=False))  # shares are counts / 512: written exactly
    print(table.groupby("dataset", sort=False)[["random", "balanced_random"]].mean().round(3).to_string())


if __name__ == "__main__":
    main()
