"""The per-run gradient-flow report: ``gradflow.json`` (the data) and ``report.html`` (one page).

``gradflow.json`` schema (``"schema": "geobp.gradflow"``, ``"version": 1``). Numbers that are
not finite are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``; ``null`` means "not
measured". ``R`` is the number of recordings, ``L`` of layers, ``C`` of input bands.

=================  ===========================================================================
key                value
=================  ===========================================================================
schema, version    ``"geobp.gradflow"``, ``1``
meta               ``model`` (class name), ``precision``, ``gradient_clip_val`` (null: none),
                   ``gradient_clip_algorithm``, ``loss_scaler`` (bool), ``world_size``,
                   ``every_n_steps``, ``step_check``, ``geobp_version``, ``updated`` (ISO time)
thresholds         the diagnosis thresholds used (:class:`~geobp.callbacks.diagnosis.Thresholds`)
layers             ``[L]`` of ``{name, type, numel}``: modules owning parameters, module order
steps              ``[R]`` optimizer step (``trainer.global_step``, 0-based) of each recording
layer_norm         ``[R][L]`` L2 norm of each layer's gradient (unscaled, before clipping)
layer_max_abs      ``[R][L]`` largest absolute gradient value of each layer
total_norm         ``[R]`` L2 norm over all parameters, before clipping
clipped            ``[R]`` whether that step's total exceeded the clip threshold (null: no clip)
steps_seen         ``[R]`` optimizer steps observed so far (every step unless step_check off)
clipped_steps      ``[R]`` of those, clipped so far (null: no clipping)
nonfinite_steps    ``[R]`` of those, with NaN/Inf gradients so far (skipped steps under fp16)
totals             ``{steps_seen, nonfinite_steps, clipped_steps}`` at the end of training (or
                   at an exception), counting steps after the last recording; absent before
loss_scale         ``[R]`` the fp16 loss scale (null without a scaler)
loss               ``[R]`` the training loss of the recorded step (unscaled)
bands              null, or ``{layer, norm: [R][C]}``: first convolution's gradient per band
skips              ``[{name, kind, source, paths: [a, b], norms: [R][2], ratio: [R]}]``,
                   ``ratio = a / b``; kinds ``residual`` (branch, shortcut), ``unet`` (skip,
                   deeper), ``pattern`` (through, elsewhere)
metrics            ``{name: [[step, value], ...]}`` from ``trainer.callback_metrics``
nonfinite          ``[{step, layer, all_layers, nonfinite_layers, loss_scale, scenes, windows}]``:
                   the first step of each run of non-finite steps (first 100 runs), ``layer``
                   the first non-finite one in backward order, ``all_layers`` whether every
                   layer with a gradient was (then the loss was), the step's tiles, with
                   ``windows`` as ``[row_off, col_off, height, width]``
diagnoses          ``[{kind, where, step, value, message, fix}]``
=================  ===========================================================================
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from geobp.callbacks.diagnosis import Finding, Thresholds, as_array, decode_float, diagnose
from geobp.errors import DataNotFoundError, format_error

SCHEMA = "geobp.gradflow"
SCHEMA_VERSION = 1
JSON_NAME = "gradflow.json"
HTML_NAME = "report.html"
REPORT_DIR = "gradflow"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # mode from the umask, unlike mkstemp's 0600
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write a gradflow document atomically (``allow_nan=False``: encode non-finite values first)."""
    path = Path(path)
    doc = dict(data)
    doc.setdefault("meta", {})
    doc["meta"] = {**doc["meta"], "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(doc, allow_nan=False, separators=(",", ":")))
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """Read and check a ``gradflow.json``.

    Raises:
        DataNotFoundError: missing file, not JSON, or not a gradflow document of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(format_error(path, "gradflow data not found",
                                             "pass the gradflow.json written by GradientFlowMonitor"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataNotFoundError(format_error(path, f"cannot read the gradflow data ({err})",
                                             "re-run training, or pass an intact gradflow.json")) from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataNotFoundError(format_error(
            path, f"not a gradflow document (expected schema {SCHEMA!r})",
            "pass the gradflow.json written by GradientFlowMonitor"))
    if data.get("version") != SCHEMA_VERSION:
        raise DataNotFoundError(format_error(
            path, f"unsupported gradflow version (expected {SCHEMA_VERSION}, found {data.get('version')!r})",
            "render it with the geobp version that wrote it"))
    return data


def render_report(json_path: str | Path, html_path: str | Path | None = None,
                  rediagnose: bool = False) -> Path:
    """Render ``report.html`` from a ``gradflow.json``.

    Args:
        json_path: the data file.
        html_path: where to write the page; defaults to ``report.html`` beside ``json_path``.
        rediagnose: run the diagnosis again with the thresholds stored in the file instead of
            showing the stored diagnoses.

    Returns:
        The path of the page.

    Raises:
        DataNotFoundError: see :func:`read_json`.
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    if rediagnose:
        thresholds = Thresholds(**(data.get("thresholds") or {}))
        data["diagnoses"] = [f.to_dict() for f in diagnose(data, thresholds)]
    out = Path(html_path) if html_path is not None else json_path.with_name(HTML_NAME)
    atomic_write_text(out, render_html(data))
    return out


def render_report_from_run_dir(run_dir: str | Path) -> list[Path]:
    """Re-render the report(s) of a run: ``RUN_DIR/gradflow/gradflow.json``, else any below it.

    Args:
        run_dir: the run's log directory (``trainer.log_dir``, e.g. ``lightning_logs/version_0``),
            a folder holding several runs, or a ``gradflow.json`` itself.

    Returns:
        The pages written, sorted by path.

    Raises:
        DataNotFoundError: ``run_dir`` does not exist or holds no ``gradflow/gradflow.json``.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [render_report(run_dir)]
    if not run_dir.is_dir():
        raise DataNotFoundError(format_error(run_dir, "run directory not found",
                                             "pass the run's log directory (trainer.log_dir)"))
    direct = run_dir / REPORT_DIR / JSON_NAME
    found = [direct] if direct.is_file() else sorted(run_dir.glob(f"**/{REPORT_DIR}/{JSON_NAME}"))
    if not found:
        raise DataNotFoundError(format_error(
            run_dir, f"no {REPORT_DIR}/{JSON_NAME} in this folder or below it",
            "pass the log directory of a run trained with the GradientFlowMonitor callback "
            "(e.g. lightning_logs/version_0), with write_report enabled"))
    return [render_report(p) for p in found]


# ----- the page -------------------------------------------------------------------------------

def render_html(data: Mapping[str, Any]) -> str:
    """The self-contained report page (PNG plots embedded as base64, no external resources)."""
    meta = data.get("meta") or {}
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Gradient flow: {esc(str(meta.get('model', 'run')))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
        ".ok{color:#2a7a2a}.kind{font-weight:bold;color:#b02a2a}img{max-width:100%}"
        "h2{margin-top:2em;border-bottom:1px solid #ddd}</style></head><body>",
        f"<h1>Gradient flow: {esc(str(meta.get('model', 'run')))}</h1>",
        f"<p>{_summary(data)}</p>",
        "<h2 id='diagnoses'>Diagnoses</h2>",
        _diagnoses_table(data.get("diagnoses") or []),
    ]
    for title, fig in _figures(data):
        parts.append(f"<h2>{esc(title)}</h2>")
        parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{_png(fig)}'>")
    parts.append(_skips_table(data))
    parts.append(_nonfinite_table(data))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(data: Mapping[str, Any]) -> str:
    meta = data.get("meta") or {}
    steps = data.get("steps") or []
    seen = (data.get("steps_seen") or [0])[-1]
    items = [
        f"{len(steps)} recordings (every {meta.get('every_n_steps')} steps)",
        f"{seen} steps observed",
        f"{len(data.get('layers') or [])} layers",
        f"{len(data.get('skips') or [])} skip connections",
        f"precision {meta.get('precision')}",
        f"clip {meta.get('gradient_clip_val')}",
        f"updated {meta.get('updated', '?')}",
    ]
    return html.escape(" · ".join(str(i) for i in items))


def _diagnoses_table(diagnoses: list[Mapping[str, Any]]) -> str:
    if not diagnoses:
        return "<p class='ok'>No findings: gradients look healthy by every rule.</p>"
    esc = html.escape
    rows = "".join(
        f"<tr><td class='kind'>{esc(str(d.get('kind')))}</td><td>{esc(str(d.get('where')))}</td>"
        f"<td>{esc(str(d.get('step')))}</td><td>{esc(_fmt(d.get('value')))}</td>"
        f"<td>{esc(str(d.get('message')))}</td><td>{esc(str(d.get('fix')))}</td></tr>"
        for d in diagnoses)
    return ("<table><tr><th>kind</th><th>where</th><th>step</th><th>value</th><th>finding</th>"
            f"<th>fix</th></tr>{rows}</table>")


def _skips_table(data: Mapping[str, Any]) -> str:
    skips = data.get("skips") or []
    if not skips:
        return ""
    esc = html.escape
    rows = []
    for s in skips:
        norms = as_array(s.get("norms"))
        ratio = as_array(s.get("ratio"))
        med = lambda v: _fmt(float(np.nanmedian(v))) if len(v) and np.isfinite(v).any() else "-"  # noqa: E731
        a, b = s.get("paths") or ["a", "b"]
        rows.append(f"<tr><td>{esc(s['name'])}</td><td>{esc(s['kind'])}</td>"
                    f"<td>{esc(str(s.get('source') or ''))}</td>"
                    f"<td>{esc(a)}: {med(norms[:, 0] if norms.ndim == 2 else norms)}</td>"
                    f"<td>{esc(b)}: {med(norms[:, 1] if norms.ndim == 2 else norms)}</td>"
                    f"<td>{med(ratio)}</td></tr>")
    return ("<h2>Skip connections (medians over recordings)</h2><table><tr><th>module</th>"
            "<th>kind</th><th>source</th><th>path a norm</th><th>path b norm</th><th>a / b</th></tr>"
            + "".join(rows) + "</table>")


def _nonfinite_table(data: Mapping[str, Any]) -> str:
    events = data.get("nonfinite") or []
    if not events:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{e.get('step')}</td><td>{esc(str(e.get('layer')))}</td>"
        f"<td>{'yes' if e.get('all_layers') else 'no'}</td><td>{esc(str(e.get('scenes') or ''))}</td>"
        f"<td>{esc(str(e.get('windows') or ''))}</td></tr>" for e in events)
    return ("<h2>Non-finite steps</h2><table><tr><th>step</th><th>first layer (backward order)</th>"
            "<th>all layers</th><th>scenes</th><th>windows (row, col, height, width)</th></tr>"
            + rows + "</table>")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    try:
        v = decode_float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(data: Mapping[str, Any]) -> list[tuple[str, Figure]]:
    figs: list[tuple[str, Figure]] = []
    steps = np.asarray(data.get("steps") or [], dtype=np.float64)
    if not len(steps):
        return figs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for title, build in (
            ("Gradient flow per layer", _flow_figure),
            ("Layers by step (log10 RMS gradient)", _heatmap_figure),
            ("Skip connections: gradient ratio over time", _skips_figure),
            ("Input bands: first-convolution gradient", _bands_figure),
            ("Total norm, clipping and loss scale", _clip_figure),
            ("Loss and metrics", _metrics_figure),
        ):
            fig = build(data, steps)
            if fig is not None:
                figs.append((title, fig))
    return figs


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
    for b in range(norms.shape[1]):
        ax.plot(steps, _positive(norms[:, b]), ".-", ms=3, label=f"band {b}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"|grad| of {bands.get('layer')}[:, band]")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    med = np.nanmedian(norms, axis=0)
    bar.bar(np.arange(norms.shape[1]), np.where(np.isfinite(med), med, 0.0))
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


def findings_to_dicts(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings as the JSON ``diagnoses`` list."""
    return [f.to_dict() for f in findings]
