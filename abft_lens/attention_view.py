"""The attention view: one prompt's tokens coloured by the attention of the query's last token, per head.

Two halves, so a report can redraw a view from saved numbers without a model:

- ``capture_example(models, prompts, index, heads)`` runs the forward (``forward.query_attention_rows``,
  the query rows of ``blocks.{l}.attn.hook_pattern``) and returns an ``AttentionExample``: the tokens,
  the demonstration labels (position, correct or wrong), the paper's threshold, and one attention row
  per (model, head). It is plain JSON (``to_dict``/``from_dict``).
- ``attention_figure(example)`` draws it with plotly: the tokens wrapped into lines, each cell coloured
  by attention (hover: the exact value), label tokens boxed green (same label as the query's answer)
  or red (another label), one heatmap trace per head and a dropdown that switches heads in the page;
  the title gives the head's label mass S and the threshold. With two models (base and fine-tuned)
  they are drawn side by side.

``attention_view(model, prompt, heads)`` does both; ``pattern_view(model, prompt, head)`` draws the full
pattern (every query position) of one head. circuitsvis is not used: its notebook display and its
HTML load the JavaScript from a CDN (only its development mode uses the bundle it ships), which
fails offline and on most clusters; plotly figures carry plotly.js with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.errors import HeadSelectionError
from abft_lens.forward import full_attention_pattern, query_attention_rows
from abft_lens.heads import Head, ThresholdKind, induction_thresholds
from abft_lens.prompts import ICLPrompt, PromptSet

CORRECT_COLOUR = "#1a9850"
WRONG_COLOUR = "#d73027"
_HEAD = re.compile(r"^\s*L(\d+)H(\d+)\s*$", re.IGNORECASE)


# --- head specs ---------------------------------------------------------------------------------------


def head_name(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def parse_heads(spec: str | int | Sequence[Head]) -> list[Head] | int:
    """``"L20H5,L18H6"`` -> [(20, 5), (18, 6)]; ``"top:8"`` -> 8 (the 8 heads with the largest label
    mass, chosen later; an int N means the same); a list of (layer, head) pairs is returned as a list. HeadSelectionError otherwise."""
    if isinstance(spec, int):
        if spec < 1:
            raise HeadSelectionError(f"heads: top:N needs N of at least 1, got {spec}.")
        return spec
    if not isinstance(spec, str):
        heads = [(int(layer), int(head)) for layer, head in spec]
        if not heads:
            raise HeadSelectionError("heads: the head list is empty.")
        return heads
    text = spec.strip()
    if text.lower().startswith("top:"):
        try:
            count = int(text[4:])
        except ValueError:
            count = 0
        if count < 1:
            raise HeadSelectionError(f"heads: {spec!r} should be top:N with N a positive whole number, e.g. top:8.")
        return count
    heads = []
    for piece in text.split(","):
        match = _HEAD.match(piece)
        if match is None:
            raise HeadSelectionError(f"heads: {piece.strip()!r} is not a head; write LxHy (layer x, head y), "
                                     "comma-separated, e.g. L20H5,L18H6, or top:N.")
        heads.append((int(match[1]), int(match[2])))
    if len(set(heads)) != len(heads):
        raise HeadSelectionError(f"heads: {spec!r} names a head twice.")
    return heads


def check_heads_exist(heads: Sequence[Head], n_layers: int, n_heads: int) -> None:
    bad = [head_name(h) for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise HeadSelectionError(f"heads: {', '.join(bad)} not in this model ({n_layers} layers x {n_heads} heads, "
                                 f"L0H0 to L{n_layers - 1}H{n_heads - 1}).")


# --- the saved numbers ------------------------------------------------------------------------------


@dataclass
class AttentionExample:
    """One prompt's query-row attention for some heads of one or more models (e.g. base, fine-tuned)."""

    tokens: list[str]  # display strings, one per position
    label_positions: list[int]
    correct: list[bool]  # per demonstration: its label equals the query's
    demo_labels: list[str]
    query_label: str
    threshold: float  # the label mass an induction head must exceed on this prompt
    threshold_kind: str
    heads: list[Head]
    rows: dict[str, np.ndarray]  # model name -> [head, key_pos] attention from the last position
    title: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.rows)

    def label_mass(self, model: str) -> np.ndarray:
        """S per head: attention on all demonstration label tokens."""
        return self.rows[model][:, self.label_positions].sum(-1)

    def correct_mass(self, model: str) -> np.ndarray:
        positions = [p for p, ok in zip(self.label_positions, self.correct, strict=True) if ok]
        return self.rows[model][:, positions].sum(-1) if positions else np.zeros(len(self.heads))

    def wrong_mass(self, model: str) -> np.ndarray:
        return self.label_mass(model) - self.correct_mass(model)

    def to_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "label_positions": self.label_positions, "correct": self.correct,
                "demo_labels": self.demo_labels, "query_label": self.query_label, "threshold": self.threshold,
                "threshold_kind": self.threshold_kind, "heads": [list(h) for h in self.heads],
                "rows": {name: np.round(rows, 6).tolist() for name, rows in self.rows.items()},
                "title": self.title, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AttentionExample:
        return cls(list(data["tokens"]), [int(p) for p in data["label_positions"]], [bool(c) for c in data["correct"]],
                   list(data["demo_labels"]), str(data["query_label"]), float(data["threshold"]),
                   str(data["threshold_kind"]), [(int(l), int(h)) for l, h in data["heads"]],
                   {name: np.asarray(rows, dtype=np.float64) for name, rows in data["rows"].items()},
                   str(data.get("title", "")), dict(data.get("extra", {})))


# --- the forward ------------------------------------------------------------------------------------


def display_token(text: str) -> str:
    """A token as it is shown in a cell: line breaks and tabs made visible, nothing left empty."""
    shown = text.replace("\n", "↵").replace("\t", "⇥")
    return shown if shown.strip() else ("␣" * len(shown) if shown else "∅")


def _as_prompt_set(prompt: ICLPrompt | PromptSet, pad_token_id: int) -> PromptSet:
    if isinstance(prompt, PromptSet):
        return prompt
    n_labels = max([*prompt.demo_labels, prompt.query_label]) + 1
    return PromptSet([prompt], tuple(f"label {i}" for i in range(n_labels)), tuple(range(n_labels)), pad_token_id)


def _rows(model, prompts: PromptSet, index: int, layers: Sequence[int]) -> Float[Tensor, "layer head key_pos"]:
    batch = prompts.collate([index]).to(next(model.parameters()).device)
    with torch.inference_mode():
        return query_attention_rows(model, batch, list(layers))[0].float().cpu()


def capture_example(
    models: Mapping[str, object], prompt: ICLPrompt | PromptSet, heads: str | Sequence[Head] = "top:8",
    index: int = 0, threshold: ThresholdKind = "paper", tau: float = 2.0, title: str = "",
) -> AttentionExample:
    """The query rows of ``heads`` on prompt ``index`` of ``prompt`` under each of ``models`` (name ->
    model, e.g. {"base": m0, "fine-tuned": m1}; all with the same tokenizer). ``heads="top:N"`` takes the
    N heads with the largest label mass S on this prompt under the first model."""
    first = next(iter(models.values()))
    tokenizer = first.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prompts = _as_prompt_set(prompt, int(pad))
    shown = prompts[index]
    wanted = parse_heads(heads)
    n_layers, n_heads = first.cfg.n_layers, first.cfg.n_heads
    if isinstance(wanted, int):
        rows = _rows(first, prompts, index, range(n_layers))
        mass = rows[:, :, list(shown.label_positions)].sum(-1).flatten()
        order = torch.argsort(mass, descending=True, stable=True)[: min(wanted, mass.numel())].tolist()
        wanted = [(i // n_heads, i % n_heads) for i in order]
    check_heads_exist(wanted, n_layers, n_heads)
    layers = sorted({layer for layer, _ in wanted})
    captured = {}
    for name, model in models.items():
        rows = _rows(model, prompts, index, layers)
        captured[name] = torch.stack([rows[layers.index(layer), head] for layer, head in wanted]).numpy()
    n = len(shown.tokens)
    limit = float(induction_thresholds(torch.tensor([n]), shown.k, threshold, tau)[0])
    words = prompts.label_words
    return AttentionExample(
        tokens=[display_token(tokenizer.decode([t])) for t in shown.tokens],
        label_positions=list(shown.label_positions), correct=list(shown.correct_demos),
        demo_labels=[words[label] for label in shown.demo_labels], query_label=words[shown.query_label],
        threshold=limit, threshold_kind=threshold, heads=list(wanted), rows=captured, title=title)


# --- drawing ----------------------------------------------------------------------------------------


def _grid(values: np.ndarray, width: int, fill: object = None) -> list[list[object]]:
    """``values`` wrapped into rows of ``width`` cells, the last row padded with ``fill``."""
    n_rows = math.ceil(len(values) / width)
    padded = [*values.tolist(), *([fill] * (n_rows * width - len(values)))]
    return [padded[r * width:(r + 1) * width] for r in range(n_rows)]


def _roles(example: AttentionExample) -> list[str]:
    roles = [""] * len(example.tokens)
    for i, (position, ok, word) in enumerate(zip(example.label_positions, example.correct, example.demo_labels,
                                                 strict=True)):
        roles[position] = f"demonstration {i + 1}'s label '{word}' ({'correct' if ok else 'wrong'})"
    roles[-1] = (roles[-1] + "; " if roles[-1] else "") + "the query's last token (attends from here)"
    return roles


def _head_title(example: AttentionExample, i: int) -> str:
    parts = []
    for model in example.models:
        s = example.label_mass(model)[i]
        verdict = "induction head" if s > example.threshold else "below threshold"
        who = f"{model}: " if len(example.models) > 1 else ""
        parts.append(f"{who}S = {s:.3f} (correct {example.correct_mass(model)[i]:.3f}, wrong "
                     f"{example.wrong_mass(model)[i]:.3f}), {verdict}")
    head = head_name(example.heads[i])
    lead = f"{example.title}: " if example.title else ""
    return (f"{lead}{head}, attention from the query's last token<br><sup>{'; '.join(parts)}; threshold "
            f"{example.threshold:.3f} ({example.threshold_kind}); query's label '{example.query_label}'</sup>")


def attention_figure(example: AttentionExample, width: int = 12, head: int = 0) -> go.Figure:
    """The view of ``example`` (see the module doc), showing head number ``head`` first."""
    from plotly.subplots import make_subplots

    models = example.models
    figure = make_subplots(rows=1, cols=len(models), subplot_titles=models if len(models) > 1 else None,
                           horizontal_spacing=0.04)
    n = len(example.tokens)
    text = _grid(np.array(example.tokens, dtype=object), width, fill="")
    roles = _roles(example)
    custom = [[[p, roles[p]] if p < n else [None, ""] for p in range(r * width, (r + 1) * width)]
              for r in range(len(text))]
    for i, h in enumerate(example.heads):
        # Colour up to the largest value outside position 0 (the attention sink); hover gives every value.
        top = max(float(np.max(example.rows[m][i][1:] if n > 1 else example.rows[m][i])) for m in models) or 1.0
        for column, model in enumerate(models, start=1):
            row = example.rows[model][i]
            figure.add_trace(go.Heatmap(
                z=_grid(row, width), text=text, customdata=custom, texttemplate="%{text}", textfont={"size": 11 if len(models) == 1 else 9},
                zmin=0.0, zmax=top, colorscale="Blues", showscale=column == len(models), xgap=2, ygap=2,
                colorbar={"title": {"text": "attention", "side": "right"}, "thickness": 12},
                name=f"{head_name(h)} {model}" if len(models) > 1 else head_name(h),
                meta={"head": head_name(h), "model": model, "n_tokens": n},
                visible=i == head,
                hovertemplate=(f"{head_name(h)}{' ' + model if len(models) > 1 else ''}<br>position %{{customdata[0]}}: "
                               "%{text}<br>attention %{z:.4f}<br>%{customdata[1]}<extra></extra>"),
            ), row=1, col=column)
    for column in range(1, len(models) + 1):
        suffix = "" if column == 1 else str(column)
        for position, ok in zip(example.label_positions, example.correct, strict=True):
            r, c = divmod(position, width)
            figure.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, xref=f"x{suffix}",
                             yref=f"y{suffix}", line={"color": CORRECT_COLOUR if ok else WRONG_COLOUR, "width": 3})
        r, c = divmod(n - 1, width)
        figure.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, xref=f"x{suffix}",
                         yref=f"y{suffix}", line={"color": "black", "width": 2, "dash": "dot"})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False, autorange="reversed")
    for name, colour in ((f"correct label (= query's '{example.query_label}')", CORRECT_COLOUR),
                         ("wrong label", WRONG_COLOUR), ("query's last token", "black")):
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                                    marker={"symbol": "square-open", "size": 12, "color": colour,
                                            "line": {"width": 2}}))
    n_legend = 3
    per_head = len(models)
    buttons = []
    for i, h in enumerate(example.heads):
        visible = [j // per_head == i for j in range(len(example.heads) * per_head)] + [True] * n_legend
        buttons.append({"label": head_name(h), "method": "update",
                        "args": [{"visible": visible}, {"title.text": _head_title(example, i)}]})
    n_rows = len(text)
    figure.update_layout(
        title={"text": _head_title(example, head), "x": 0.01, "xanchor": "left", "yref": "container", "y": 1,
               "yanchor": "top", "pad": {"t": 14}},
        template="plotly_white", height=180 + 34 * n_rows, width=90 + (78 if len(models) == 1 else 48) * width * len(models),
        margin={"t": 120, "l": 20, "r": 20, "b": 20},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0},
        updatemenus=[{"buttons": buttons, "direction": "down", "showactive": True, "active": head,
                      "x": 1.0, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "pad": {"b": 30}}],
    )
    return figure


def attention_view(
    model, prompt: ICLPrompt | PromptSet, heads: str | Sequence[Head] = "top:8", index: int = 0,
    compare: object | None = None, names: tuple[str, str] = ("base", "fine-tuned"),
    threshold: ThresholdKind = "paper", tau: float = 2.0, width: int = 12, title: str = "",
) -> go.Figure:
    """The attention view of prompt ``index`` (a PromptSet, or one ICLPrompt) for ``heads`` ("top:8",
    "L20H5,L18H6" or [(20, 5), ...]); with ``compare`` (a second model, e.g. the fine-tuned one), both
    side by side under ``names``. A plotly Figure: displayed inline in Jupyter, ``write_html`` to save."""
    models = {names[0]: model, names[1]: compare} if compare is not None else {"model": model}
    return attention_figure(capture_example(models, prompt, heads, index, threshold, tau, title), width)


def pattern_figure(tokens: Sequence[str], pattern: np.ndarray, label_positions: Sequence[int],
                   correct: Sequence[bool], title: str) -> go.Figure:
    """A query_pos x key_pos heatmap of one head's pattern, the demonstration label columns marked."""
    labels = [f"{i} {t}" for i, t in enumerate(tokens)]
    top = float(np.max(pattern[1:, 1:])) if len(tokens) > 1 else 1.0
    figure = go.Figure(go.Heatmap(
        z=pattern, x=labels, y=labels, colorscale="Blues", zmin=0.0, zmax=top or 1.0,
        hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>",
        colorbar={"title": {"text": "attention", "side": "right"}}))
    for position, ok in zip(label_positions, correct, strict=True):
        figure.add_vline(x=position, line_color=CORRECT_COLOUR if ok else WRONG_COLOUR, line_width=1, opacity=0.6)
    figure.update_yaxes(autorange="reversed", tickfont={"size": 8}, title="query position")
    figure.update_xaxes(tickfont={"size": 8}, title="key position (green/red: correct/wrong demonstration labels)")
    size = min(1400, 300 + 9 * len(tokens))
    figure.update_layout(title=title, template="plotly_white", width=size + 100, height=size)
    return figure


def pattern_view(model, prompt: ICLPrompt | PromptSet, head: str | Head, index: int = 0) -> go.Figure:
    """The full attention pattern (every query position) of one head on one prompt, from a hook on
    ``blocks.{layer}.attn.hook_pattern``."""
    parsed = parse_heads(head) if isinstance(head, str) else [tuple(head)]
    if not isinstance(parsed, list) or len(parsed) != 1:
        raise HeadSelectionError(f"pattern: name one head (e.g. L20H5), got {head!r}.")
    layer, h = parsed[0]
    check_heads_exist(parsed, model.cfg.n_layers, model.cfg.n_heads)
    tokenizer = model.tokenizer
    prompts = _as_prompt_set(prompt, int(tokenizer.pad_token_id or tokenizer.eos_token_id or 0))
    shown = prompts[index]
    batch = prompts.collate([index]).to(next(model.parameters()).device)
    with torch.inference_mode():
        pattern = full_attention_pattern(model, batch, layer)[0, h].cpu().numpy()
    tokens = [display_token(tokenizer.decode([t])) for t in shown.tokens]
    return pattern_figure(tokens, pattern, shown.label_positions, shown.correct_demos,
                          f"{head_name((layer, h))}: full attention pattern")
