"""Analyses of the claim that the end-to-end ICL objective contains the ABFT objective
(method.md section 7). A separate package: it imports `abft_lens`, never the other way round.

Installed as ``abft_lens_analysis`` (pyproject.toml maps it to this folder): a top-level ``analysis`` in
site-packages could collide with another distribution's. From a checkout's root it is also importable
as ``analysis`` (the examples below); its modules import each other relatively, so both names work.

In a notebook::

    from abft_lens import load_model, load_dataset, split_pools, build_prompts
    from analysis import GradientConfig, analyze_gradients, figures

    model = load_model("smollm2-135m")
    dataset = load_dataset("sst2")
    prompts = build_prompts(model.tokenizer, dataset, split_pools(dataset).train, n_prompts=16)
    result = analyze_gradients(model, prompts, GradientConfig())
    result.layers, result.heads, result.sign, result.summary          # tidy tables + headline numbers
    figures.layer_cosines(result.layers).show()

    from analysis import weight_landscape, read_metrics
    land = weight_landscape(model, "smollm2-135m", Path("runs/abft"), Path("runs/e2e"), grid=9)
    figures.landscape_figure(land.grid, land.marks()).show()
    figures.dynamics_figure(read_metrics([Path("runs/abft"), Path("runs/e2e")])).show()

The command-line jobs (`abft-lens analyze-gradients | landscape | dynamics`) are in `analysis.jobs`
and write the same tables as CSV, the figures as HTML and their config as JSON.
"""

from . import figures
from .dynamics import read_metrics
from .gradients import (
    GradientAnalysis,
    GradientConfig,
    QKParameters,
    analyze_gradients,
    prompt_gradients,
    sign_test,
    split_pattern_gradient,
    wilson_interval,
)
from .landscape import LandscapeResult, weight_landscape

__all__ = [
    "GradientAnalysis", "GradientConfig", "LandscapeResult", "QKParameters", "analyze_gradients", "figures",
    "prompt_gradients", "read_metrics", "sign_test", "split_pattern_gradient", "weight_landscape", "wilson_interval",
]
