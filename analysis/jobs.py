"""The analysis jobs behind `abft-lens analyze-gradients`, `abft-lens landscape` and
`abft-lens dynamics`: a typed config (saved as the output folder's config.json), the work, and
tidy CSVs plus plotly figures in the output folder."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from abft_lens.config import check_int, validate_config
from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import ConfigError
from abft_lens.figures import figure_name
from abft_lens.heads import ThresholdKind
from abft_lens.models import DEFAULT_MODEL, load_model
from abft_lens.plots import save_figure
from abft_lens.precision import Precision, autocast, resolve_config_precision
from abft_lens.prompts import build_prompts
from abft_lens.runs import atomic_write_text, save_config, write_json
from . import figures
from .dynamics import read_metrics
from .gradients import GradientAnalysis, GradientConfig, Softmax, analyze_gradients
from .landscape import LandscapeResult, landscape_marks, weight_landscape


def _csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


# --- analyze-gradients ---------------------------------------------------------------------------


@dataclass
class AnalyzeGradientsConfig:
    model: str = DEFAULT_MODEL
    dataset: str = "sst2"
    n_prompts: int = 64
    k: int = 4
    seed: int = 42  # demonstrations of the prompts
    pool_seed: int = 42  # the train/demo/test split: prompts come from the training pool, as in training
    softmax: Softmax = "label"
    layers: tuple[int, ...] | None = None
    threshold: ThresholdKind = "paper"
    tau: float = 2.0
    punish_weight: float = 0.5
    sign_test: bool = True
    sign_test_eps: float = 1e-3
    sign_test_abft: bool = True
    sign_test_aggregate: bool = True
    label_words: tuple[str, ...] | None = None
    device: str | None = None
    out: str | None = None  # default: runs/analyze-gradients_<model>_<dataset>
    # fp32 by default: the sign test's finite differences (eps 1e-3 of ||W_QK||) and the decomposition's
    # identity check are below bf16's resolution (2^-8); bf16 is there for a quick look at large models.
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        validate_config(self, positive=("n_prompts", "k"), non_negative=("seed", "pool_seed"),
                        positive_float=("tau", "sign_test_eps"))
        for layer in self.layers or ():
            check_int("layers", layer, 0)

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"analyze-gradients_{Path(self.model).name}_{Path(self.dataset).stem}"

    def gradient_config(self) -> GradientConfig:
        return GradientConfig(softmax=self.softmax, layers=self.layers, punish_weight=self.punish_weight,
                              threshold=self.threshold, tau=self.tau, sign_test=self.sign_test,
                              sign_test_eps=self.sign_test_eps, sign_test_abft=self.sign_test_abft,
                              sign_test_aggregate=self.sign_test_aggregate)


def gradient_prompts(model, config: AnalyzeGradientsConfig):
    """Training-style prompts: queries and demonstrations from the training pool."""
    dataset = load_dataset(config.dataset, config.label_words)
    pool = split_pools(dataset, seed=config.pool_seed).train
    return build_prompts(model.tokenizer, dataset, pool, n_prompts=min(config.n_prompts, len(pool)), k=config.k,
                         seed=config.seed, max_length=model.cfg.n_ctx)


def write_gradient_analysis(analysis: GradientAnalysis, out: Path, title: str) -> list[Path]:
    """layers.csv, heads.csv, prompts.csv, prompt_layers.csv, sign_pairs.csv, sign_test.csv,
    summary.json and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("layers", analysis.layers), ("heads", analysis.heads), ("prompts", analysis.prompts),
                        ("prompt_layers", analysis.per_prompt), ("sign_pairs", analysis.pairs),
                        ("sign_test", analysis.sign)):
        _csv(out / f"{name}.csv", frame)
    write_json(out / "summary.json", analysis.summary)
    written = []
    for name, figure in gradient_figures(analysis.layers, analysis.heads, analysis.sign, title).items():
        written += save_figure(figure, out / ("gradient_components" if name == "components" else name))
    return written


def gradient_figures(layers: pd.DataFrame, heads: pd.DataFrame, sign: pd.DataFrame, title: str) -> dict[str, go.Figure]:
    """A gradient analysis' figures by name: per-layer cosines, the gradient by path, per-head cosines
    and, where it ran, the sign test."""
    drawn = {"layer_cosines": figures.layer_cosines(layers, f"{title}: cosine(E2E, ABFT) per layer"),
             "components": figures.layer_components(layers, f"{title}: E2E gradient on W_Q/W_K by path"),
             "head_cosines": figures.head_cosines(heads, f"{title}: cosine(E2E, ABFT) on the induction heads")}
    if len(sign):
        drawn["sign_test"] = figures.sign_test_figure(sign)
    return drawn


def run_analyze_gradients(config: AnalyzeGradientsConfig, model=None, progress: bool = True) -> GradientAnalysis:
    started = time.perf_counter()
    model = model if model is not None else load_model(config.model, device=config.device)
    config, choice = resolve_config_precision(config, next(model.parameters()).device, announce=progress)
    prompts = gradient_prompts(model, config)
    with autocast(config.precision, model):
        analysis = analyze_gradients(model, prompts, config.gradient_config(), progress=progress)
    out = config.run_dir()
    write_gradient_analysis(analysis, out, f"{Path(config.model).name} on {config.dataset}")
    save_config(out, config, gradient_config=dataclasses.asdict(analysis.config), n_prompts=len(prompts),
                precision_reason=choice.reason,
                label_words=list(prompts.label_words),
                mean_prompt_tokens=sum(len(p.tokens) for p in prompts.prompts) / len(prompts),
                seconds=round(time.perf_counter() - started, 1))
    return analysis


# --- landscape -------------------------------------------------------------------------------------


@dataclass
class LandscapeConfig:
    base: str = DEFAULT_MODEL
    abft: str = ""  # an ABFT run folder (abft-lens finetune --method abft)
    e2e: str = ""  # an E2E run folder on the same data set
    grid: int = 9  # points per axis over [low, high]
    low: float = -0.5
    high: float = 1.5
    n_test: int = 128  # test queries
    demo_sets: int = 1  # demonstration sets per query
    seed: int = 42  # demonstrations
    batch_size: int = 8
    device: str | None = None
    out: str | None = None  # default: runs/landscape_<abft run>_<e2e run>
    precision: Precision = "auto"  # of the evaluations on the grid

    def __post_init__(self) -> None:
        validate_config(self, positive=("n_test", "demo_sets", "batch_size"), non_negative=("seed",))
        check_int("grid", self.grid, 2)
        if not self.low < self.high:
            raise ConfigError(f"low must be below high; got low {self.low!r}, high {self.high!r}.")

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"landscape_{Path(self.abft).name}_{Path(self.e2e).name}"


def write_landscape(result: LandscapeResult, out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _csv(out / "landscape.csv", result.grid)
    _csv(out / "paths.csv", result.paths)
    write_json(out / "summary.json", result.summary)
    return save_figure(figures.landscape_figure(result.grid, result.marks(), title), out / "landscape")


def run_landscape(config: LandscapeConfig, model=None, progress: bool = True) -> LandscapeResult:
    started = time.perf_counter()
    model = model if model is not None else load_model(config.base, device=config.device)
    config, choice = resolve_config_precision(config, next(model.parameters()).device, announce=progress)
    with autocast(config.precision, model):
        result = weight_landscape(model, config.base, Path(config.abft), Path(config.e2e), grid=config.grid,
                                  low=config.low, high=config.high, n_test=config.n_test,
                                  demo_sets=config.demo_sets, seed=config.seed, batch_size=config.batch_size,
                                  progress=progress)
    out = config.run_dir()
    title = f"{Path(config.base).name} on {result.summary['dataset']}: accuracy on the weight plane"
    write_landscape(result, out, title)
    save_config(out, config, seconds=round(time.perf_counter() - started, 1), precision_reason=choice.reason)
    return result


# --- dynamics --------------------------------------------------------------------------------------


@dataclass
class DynamicsConfig:
    runs: tuple[str, ...] = ()  # fine-tuning run folders (their metrics.jsonl)
    out: str = "runs/dynamics"


def run_dynamics(config: DynamicsConfig) -> pd.DataFrame:
    metrics = read_metrics([Path(run) for run in config.runs])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _csv(out / "dynamics.csv", metrics)
    save_figure(figures.dynamics_figure(metrics), out / "dynamics")
    save_config(out, config)
    return metrics


# --- figures from saved folders --------------------------------------------------------------------


def redraw_figures(roots: Sequence[Path], out: Path, png: bool) -> list[Path]:
    """The analysis' figure source for `abft-lens figures` (registered by ``analysis.cli.register``):
    redraws every gradient analysis (``gradients_<name>_*``), landscape (``landscape_<name>``) and
    dynamics table (``dynamics_<name>``) saved under ``roots`` into ``out``."""
    written: list[Path] = []
    for root in [Path(r) for r in roots if Path(r).exists()]:
        for folder in sorted({path.parent for path in root.rglob("summary.json")}):
            name = figure_name(folder, root)
            if (folder / "layers.csv").is_file() and (folder / "heads.csv").is_file():
                layers, heads = pd.read_csv(folder / "layers.csv"), pd.read_csv(folder / "heads.csv")
                if not {"cos_full_abft", "cos_label_abft"} <= set(layers.columns):
                    continue
                sign_path = folder / "sign_test.csv"
                sign = pd.read_csv(sign_path) if sign_path.is_file() and sign_path.stat().st_size else pd.DataFrame()
                for figure_kind, figure in gradient_figures(layers, heads, sign, name).items():
                    written += save_figure(figure, out / f"{_prefixed('gradients', name)}_{figure_kind}", png)
            elif (folder / "landscape.csv").is_file():
                marks = landscape_marks(json.loads((folder / "summary.json").read_text()))
                written += save_figure(figures.landscape_figure(pd.read_csv(folder / "landscape.csv"), marks,
                                                                f"{name}: accuracy on the weight plane"),
                                       out / _prefixed("landscape", name), png)
        for path in sorted(root.rglob("dynamics.csv")):
            name = figure_name(path.parent, root)
            written += save_figure(figures.dynamics_figure(pd.read_csv(path), f"Induction heads' label attention "
                                                           f"during training: {name}"), out / _prefixed("dynamics", name), png)
    return written


def _prefixed(prefix: str, name: str) -> str:
    return name if name.startswith(prefix) else f"{prefix}_{name}"
