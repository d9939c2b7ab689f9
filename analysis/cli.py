"""`abft-lens analyze-gradients`, `abft-lens landscape` and `abft-lens dynamics`, and the analysis' figures
in `abft-lens figures`.

Registered through the entry-point group ``abft_lens.commands`` (pyproject.toml), so that
`abft_lens` never imports `analysis`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from abft_lens.cli import device_option, precision_option
from abft_lens.runs import load_config, with_overrides


def redraw_figures(roots, out, png):
    """`abft-lens figures` source: the analysis' figures from its saved folders (``analysis.jobs``)."""
    from .jobs import redraw_figures as redraw  # imported when drawing: keeps the CLI quick to start

    return redraw(roots, out, png)


def register(app: typer.Typer) -> None:
    from abft_lens.figure_sources import register_figure_source

    register_figure_source("analysis", redraw_figures)

    @app.command("analyze-gradients")
    def analyze_gradients_command(
        model: Optional[str] = typer.Argument(None, help="as for find-heads [default: smollm2-135m]"),
        dataset: Optional[str] = typer.Option(None, help="sst2, mr, ... or a CSV/JSONL file [default: sst2]"),
        n_prompts: Optional[int] = typer.Option(None, help="training-pool prompts, analysed one at a time [default: 64]"),
        k: Optional[int] = typer.Option(None, help="demonstrations per prompt [default: 4]"),
        softmax: Optional[str] = typer.Option(None, help="E2E cross-entropy over the label tokens (label) or the "
                                                         "vocabulary (vocab) [default: label]"),
        layers: Optional[str] = typer.Option(None, help="comma-separated layers to decompose [default: all]"),
        sign_test: Optional[bool] = typer.Option(None, "--sign-test/--no-sign-test", help="[default: on]"),
        sign_test_eps: Optional[float] = typer.Option(None, help="finite-difference step relative to ||W_QK|| "
                                                                 "[default: 1e-3]"),
        seed: Optional[int] = typer.Option(None, help="demonstration sampling [default: 42]"),
        device: Optional[str] = device_option(),
        out: Optional[Path] = typer.Option(None, help="output folder [default: runs/analyze-gradients_<model>_<dataset>]"),
        precision: Optional[str] = precision_option("fp32: the sign test's finite differences need it"),
        config: Optional[Path] = typer.Option(None, help="an AnalyzeGradientsConfig JSON (or an output's config.json)"),
    ) -> None:
        """Split the E2E gradient on W_Q/W_K into its label-attention paths and compare it with ABFT's."""
        from .jobs import AnalyzeGradientsConfig, run_analyze_gradients

        base = load_config(config, AnalyzeGradientsConfig) if config else AnalyzeGradientsConfig()
        chosen = tuple(int(x) for x in layers.split(",")) if layers else None
        cfg = with_overrides(base, dict(model=model, dataset=dataset, n_prompts=n_prompts, k=k, softmax=softmax,
                                layers=chosen, sign_test=sign_test, sign_test_eps=sign_test_eps, seed=seed,
                                device=device, out=str(out) if out else None, precision=precision))
        result = run_analyze_gradients(cfg)
        s = result.summary
        typer.echo(f"\n{cfg.model} on {cfg.dataset}, {s['n_prompts']} prompts "
                   f"({s['mean_flagged_heads_per_prompt']:.1f} induction heads per prompt):")
        typer.echo(f"  cosine(E2E, ABFT) {s['cos_full_abft']:.3f}; of the E2E label path {s['cos_label_abft']:.3f}, "
                   f"of the rest {s['cos_rest_abft']:.3f}")
        typer.echo(f"  label path: {s['share_label_norm']:.3f} of the E2E gradient norm, projection share "
                   f"{s['share_label_projection']:.3f} (correct {s['share_correct_projection']:.3f}, wrong "
                   f"{s['share_wrong_projection']:.3f}); identity error {s['max_identity_error']:.1e}")
        for _, row in result.sign.iterrows():
            typer.echo(f"  sign test {row['direction']:>8} {row['criterion']:<10} {row['fraction']:.3f} "
                       f"({row['successes']}/{row['pairs']}; prompt bootstrap [{row['bootstrap_low']:.3f}, "
                       f"{row['bootstrap_high']:.3f}])")
        typer.echo(f"Output folder: {cfg.run_dir()}")

    @app.command("landscape")
    def landscape_command(
        base: Optional[str] = typer.Option(None, help="the base model both runs fine-tuned [default: smollm2-135m]"),
        abft: Optional[Path] = typer.Option(None, help="ABFT run folder"),
        e2e: Optional[Path] = typer.Option(None, help="E2E run folder (same data set)"),
        grid: Optional[int] = typer.Option(None, help="points per axis over [-0.5, 1.5] [default: 9]"),
        n_test: Optional[int] = typer.Option(None, help="test queries [default: 128]"),
        demo_sets: Optional[int] = typer.Option(None, help="demonstration sets per query [default: 1]"),
        batch_size: Optional[int] = typer.Option(None, help="[default: 8]"),
        device: Optional[str] = device_option(),
        out: Optional[Path] = typer.Option(None, help="output folder [default: runs/landscape_<abft>_<e2e>]"),
        precision: Optional[str] = precision_option(),
        config: Optional[Path] = typer.Option(None, help="a LandscapeConfig JSON (or an output's config.json)"),
    ) -> None:
        """Accuracy on the plane base + l_E (E2E - base) + l_A (ABFT - base) of W_Q/W_K."""
        from .jobs import LandscapeConfig, run_landscape

        cfg = with_overrides(load_config(config, LandscapeConfig) if config else LandscapeConfig(),
                     dict(base=base, abft=str(abft) if abft else None, e2e=str(e2e) if e2e else None, grid=grid,
                          n_test=n_test, demo_sets=demo_sets, batch_size=batch_size, device=device,
                          out=str(out) if out else None, precision=precision))
        if not cfg.abft or not cfg.e2e:
            raise typer.BadParameter("give both --abft RUN and --e2e RUN")
        s = run_landscape(cfg).summary
        best = s["best_mix"]
        typer.echo(f"\naccuracy ({s['n_inputs']} test inputs, SE {s['accuracy_standard_error']:.3f}): base "
                   f"{s['accuracy_base']:.3f}, ABFT {s['accuracy_abft']:.3f}, E2E {s['accuracy_e2e']:.3f}; best mix "
                   f"{best['accuracy']:.3f} at l_E {best['l_e2e']:.2f}, l_A {best['l_abft']:.2f}")
        typer.echo("barriers: " + ", ".join(f"{name} {value:.3f}" for name, value in s["barriers"].items()))
        typer.echo(f"no barrier base -> ABFT -> E2E (within 2 SE): {s['no_barrier_base_abft_e2e']}")
        typer.echo(f"Output folder: {cfg.run_dir()}")

    @app.command("dynamics")
    def dynamics_command(
        runs: list[Path] = typer.Argument(..., help="fine-tuning run folders (e.g. an ABFT and an E2E run)"),
        out: Path = typer.Option(Path("runs/dynamics"), help="output folder"),
    ) -> None:
        """Plot the induction heads' correct and wrong label mass per training step of several runs."""
        from .jobs import DynamicsConfig, run_dynamics

        metrics = run_dynamics(DynamicsConfig(tuple(str(r) for r in runs), str(out)))
        for method, group in metrics.groupby("method"):
            first, last = group.iloc[0], group.iloc[-1]
            typer.echo(f"{method}: correct {first['correct_mass']:.3f} -> {last['correct_mass']:.3f}, wrong "
                       f"{first['wrong_mass']:.3f} -> {last['wrong_mass']:.3f} over {len(group)} steps")
        typer.echo(f"Output folder: {out}")
