"""The report's figures: matplotlib ``Figure`` objects built from a gradflow document.

Each builder takes the document and its recording steps and returns a figure, or None when the
document has nothing to show for it (no skips, no bands, no recordings). Figures are made with
``matplotlib.figure.Figure`` directly (no pyplot state, safe in a background thread). Each has
a key (:data:`FIGURES`), the page anchor of its section, to which findings link: each diagnosis
rule names its figure where it is registered (:mod:`geobp.callbacks.rules`), and a rule may bring
a figure of its own, shown after these.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from geobp.callbacks.diagnosis import as_array, band_names
from geobp.callbacks.rules import rules_in_order


def figures(data: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[tuple[str, str, Figure]]:
    """The report's figures as ``(key, title, figure)``, in page order (none without recordings).

    Args:
        data: the gradflow document.
        keys: the keys of :data:`FIGURES`, or of registered rules' own figures, to build (all
            when None); figures with nothing to show are left out.
    """
    figs: list[tuple[str, str, Figure]] = []
    steps = np.asarray(data.get("steps") or [], dtype=np.float64)
    if not len(steps):
        return figs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rule_figures = {r.figure: (r.title or r.figure, r.plot) for r in rules_in_order()
                        if r.plot is not None and r.figure not in FIGURES}
        for key, (title, build) in {**FIGURES, **rule_figures}.items():
            if keys is not None and key not in keys:
                continue
            fig = build(data, steps)
            if fig is not None:
                figs.append((key, title, fig))
    return figs


def png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG, for a ``data:`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _positive(a: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite become NaN (gaps)."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _layer_rms(data: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
    layers = data.get("layers") or []
    norms = as_array(data.get("layer_norm"))
    if norms.ndim != 2 or norms.shape[1] != len(layers) or not layers:
        return np.zeros((0, 0)), []
    numel = np.array([max(int(x["numel"]), 1) for x in layers], dtype=np.float64)
    return norms / np.sqrt(numel), [str(x["name"]) for x in layers]


def _layer_ticks(ax: Any, names: list[str], axis: str) -> None:
    step = max(1, len(names) // 40)
    ticks = list(range(0, len(names), step))
    labels = [names[i] for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=6)


def _flow_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    rms, names = _layer_rms(data)
    mx = as_array(data.get("layer_max_abs"))
    if not names:
        return None
    fig = Figure(figsize=(12, 4.5), layout="tight")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.plot(x, _positive(np.nanmedian(_positive(rms), axis=0)), "o-", ms=3, label="RMS (median over recordings)")
    ax.plot(x, _positive(rms[-1]), ".:", ms=3, label=f"RMS at step {int(steps[-1])}")
    if mx.ndim == 2 and mx.shape == rms.shape:
        ax.plot(x, _positive(np.nanmax(_positive(mx), axis=0)), "^-", ms=3, alpha=0.7,
                label="max |grad| (over recordings)")
    ax.set_yscale("log")
    ax.set_ylabel("gradient magnitude")
    ax.set_xlabel("layer (module order: input left, output right)")
    _layer_ticks(ax, names, "x")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _heatmap_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    rms, names = _layer_rms(data)
    if not names:
        return None
    values = _positive(rms).T  # layers x recordings
    if not np.isfinite(values).any():
        return None
    fig = Figure(figsize=(12, max(3.0, min(12.0, 0.12 * len(names) + 1.5))), layout="tight")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    lo, hi = np.nanmin(values), np.nanmax(values)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d62728")
    # Cell edges halfway between recordings: recordings need not be evenly spaced.
    mids = (steps[1:] + steps[:-1]) / 2
    x_edges = np.concatenate([[steps[0] - 0.5], mids, [steps[-1] + 0.5]])
    y_edges = np.arange(len(names) + 1) - 0.5
    image = ax.pcolormesh(x_edges, y_edges, masked, cmap=cmap, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)))
    ax.set_facecolor("#d62728")
    ax.invert_yaxis()
    fig.colorbar(image, ax=ax, label="RMS gradient (red: zero, missing or non-finite)")
    _layer_ticks(ax, names, "y")
    ax.set_xlabel("step")
    return fig


def _skips_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    skips = data.get("skips") or []
    series = [(s, _positive(as_array(s.get("ratio")))) for s in skips]
    series = [(s, r) for s, r in series if len(r) == len(steps) and np.isfinite(r).any()]
    if not series:
        return None
    fig = Figure(figsize=(12, 4.5), layout="tight")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    for j, (s, r) in enumerate(series):
        a, b = s.get("paths") or ["a", "b"]
        ax.plot(steps, r, ".-", ms=3, color=cmap(j / max(1, len(series) - 1)),
                label=f"{s['name']} ({a}/{b})")
    thr = (data.get("thresholds") or {}).get("dead_branch_ratio")
    if thr:
        ax.axhline(thr, color="#b02a2a", ls="--", lw=1, label=f"dead below {thr:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm ratio")
    ax.grid(True, alpha=0.3)
    if len(series) <= 24:
        ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _bands_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    if norms.ndim != 2 or norms.shape[0] != len(steps) or not np.isfinite(norms).any():
        return None
    fig = Figure(figsize=(12, 4), layout="tight")
    ax, bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    names = band_names(data)
    for b in range(norms.shape[1]):
        ax.plot(steps, _positive(norms[:, b]), ".-", ms=3, label=names[b])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"|grad| of {bands.get('layer')}[:, band]")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    med = np.nanmedian(norms, axis=0)
    bar.bar(np.arange(norms.shape[1]), np.where(np.isfinite(med), med, 0.0))
    bar.set_yscale("log")
    bar.set_xticks(np.arange(norms.shape[1]))
    bar.set_xticklabels(names, rotation=90, fontsize=7)
    bar.set_xlabel("band")
    bar.set_title("median over recordings", fontsize=9)
    return fig


def _clip_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    total = as_array(data.get("total_norm"))
    if len(total) != len(steps):
        return None
    meta = data.get("meta") or {}
    scale = as_array(data.get("loss_scale"))
    has_scale = len(scale) == len(steps) and np.isfinite(scale).any()
    fig = Figure(figsize=(12, 4), layout="tight")
    axes = fig.subplots(1, 2 if has_scale else 1)
    ax = axes[0] if has_scale else axes
    ax.plot(steps, _positive(total), ".-", ms=3, label="total norm (before clipping)")
    bad = ~np.isfinite(total)
    if bad.any():
        top = np.nanmax(_positive(total)) if np.isfinite(_positive(total)).any() else 1.0
        ax.plot(steps[bad], np.full(bad.sum(), top), "rx", label="non-finite")
    clip = meta.get("gradient_clip_val")
    title = "no gradient clipping"
    if clip:
        ax.axhline(float(clip), color="#b02a2a", ls="--", lw=1, label=f"clip threshold {clip:g}")
        clipped = np.array([bool(c) for c in data.get("clipped") or []][: len(steps)])
        if clipped.size == len(steps) and clipped.any():
            ax.plot(steps[clipped], _positive(total)[clipped], "o", mfc="none", color="#b02a2a", label="clipped")
        seen = (data.get("steps_seen") or [0])[-1]
        n_clip = (data.get("clipped_steps") or [0])[-1] or 0
        title = f"clipped on {n_clip} of {seen} steps ({n_clip / max(seen, 1):.1%})"
    ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if has_scale:
        sx = axes[1]
        sx.plot(steps, _positive(scale), ".-", ms=3, color="#1f77b4", label="loss scale")
        sx.set_yscale("log", base=2)
        sx.set_xlabel("step")
        sx.set_ylabel("loss scale")
        skipped = as_array(data.get("nonfinite_steps"))
        if len(skipped) == len(steps):
            tx = sx.twinx()
            tx.step(steps, skipped, where="post", color="#d62728", label="skipped steps (cumulative)")
            tx.set_ylabel("skipped steps", color="#d62728")
        sx.set_title("fp16 loss scale and skipped (non-finite) steps", fontsize=9)
    return fig


def _metrics_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    loss = as_array(data.get("loss"))
    if len(loss) == len(steps) and np.isfinite(loss).any():
        curves["loss (recorded steps)"] = (steps, loss)
    for name, points in (data.get("metrics") or {}).items():
        arr = as_array(points)
        if arr.ndim == 2 and arr.shape[1] == 2 and np.isfinite(arr[:, 1]).any():
            curves[name] = (arr[:, 0], arr[:, 1])
    if not curves:
        return None
    losses = {k: v for k, v in curves.items() if "loss" in k.lower()}
    others = {k: v for k, v in curves.items() if k not in losses}
    panels = [p for p in (losses, others) if p]
    fig = Figure(figsize=(12, 4), layout="tight")
    axes = fig.subplots(1, len(panels))
    axes = np.atleast_1d(axes)
    for ax, panel, label in zip(axes, panels, ("loss" if losses else "metric", "metric")):
        for name, (x, y) in sorted(panel.items()):
            ax.plot(x, y, ".-", ms=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return fig


def _updates_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure | None:
    layers = data.get("layers") or []
    ratio = as_array(data.get("update_ratio"))
    if ratio.ndim != 2 or ratio.shape != (len(steps), len(layers)) or not np.isfinite(ratio).any():
        return None
    names = [str(x["name"]) for x in layers]
    fig = Figure(figsize=(12, max(4.0, min(12.0, 0.12 * len(names) + 2.0))), layout="tight")
    ax, line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    values = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan).T  # layers x recordings
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1e-6, 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d62728")
    mids = (steps[1:] + steps[:-1]) / 2
    x_edges = np.concatenate([[steps[0] - 0.5], mids, [steps[-1] + 0.5]])
    image = ax.pcolormesh(x_edges, np.arange(len(names) + 1) - 0.5, np.ma.masked_invalid(values), cmap=cmap,
                          norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)))
    ax.set_facecolor("#eeeeee")
    ax.invert_yaxis()
    fig.colorbar(image, ax=ax, label="||dw|| / ||w|| per step (red: 0; grey: not measured or frozen)")
    _layer_ticks(ax, names, "y")
    ax.set_xlabel("step")
    zero = np.isfinite(ratio) & (ratio == 0)
    if zero.any():  # a layer that did not move at all: its own colour (LogNorm cannot show 0)
        r, c = np.nonzero(zero.T)
        ax.scatter(steps[c], r, marker="s", s=12, color="#d62728", label="no change")
    frozen = data.get("frozen") or []
    if frozen:
        shown = ", ".join(str(x["name"]) for x in frozen[:6]) + (" ..." if len(frozen) > 6 else "")
        ax.set_title(f"frozen (requires_grad=False, not shown): {shown}", fontsize=8)
    median = np.nanmedian(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)
    line.plot(steps, _positive(median), ".-", ms=3, label="median layer")
    line.plot(steps, _positive(np.nanmax(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)), ":", label="largest")
    line.plot(steps, _positive(np.nanmin(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)), ":", label="smallest")
    thresholds = data.get("thresholds") or {}
    line.axhline(1e-3, color="#2a7a2a", lw=1, ls="--", label="1e-3 (healthy)")
    for key, color in (("stalled_ratio", "#b02a2a"), ("unstable_update_ratio", "#b02a2a")):
        if thresholds.get(key):
            line.axhline(float(thresholds[key]), color=color, lw=1, ls=":")
    line.set_yscale("log")
    line.set_xlabel("step")
    line.grid(True, alpha=0.3)
    line.legend(fontsize=7)
    return fig


Builder = Callable[[Mapping[str, Any], np.ndarray], "Figure | None"]

#: The figures, by key (the page anchor), with their titles, in page order.
FIGURES: dict[str, tuple[str, Builder]] = {
    "flow": ("Gradient flow per layer", _flow_figure),
    "heatmap": ("Layers by step (log10 RMS gradient)", _heatmap_figure),
    "updates": ("Update ratio ||dw|| / ||w|| per layer and step", _updates_figure),
    "skips": ("Skip connections: gradient ratio over time", _skips_figure),
    "bands": ("Input bands: first-convolution gradient", _bands_figure),
    "clip": ("Total norm, clipping and loss scale", _clip_figure),
    "metrics": ("Loss and metrics", _metrics_figure),
}
