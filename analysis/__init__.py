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

import importlib
from typing import TYPE_CHECKING

# Imported on first use (PEP 562): the CLI registers this package's commands at start-up, and a
# mistyped flag of any command must fail before torch is imported.
_EXPORTS = {
    "figures": None, "read_metrics": ".dynamics", "GradientAnalysis": ".gradients", "GradientConfig": ".gradients",
    "QKParameters": ".gradients", "analyze_gradients": ".gradients", "prompt_gradients": ".gradients",
    "sign_test": ".gradients", "split_pattern_gradient": ".gradients", "wilson_interval": ".gradients",
    "LandscapeResult": ".landscape", "weight_landscape": ".landscape",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from . import figures
    from .dynamics import read_metrics
    from .gradients import (GradientAnalysis, GradientConfig, QKParameters, analyze_gradients, prompt_gradients,
                            sign_test, split_pattern_gradient, wilson_interval)
    from .landscape import LandscapeResult, weight_landscape


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
