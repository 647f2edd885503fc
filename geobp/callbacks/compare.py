"""``geobp report --compare``: several runs' gradient flow side by side on one self-contained page.

The page answers "what changed between the good run and the bad one": a table of the runs
(model, precision, clipping, steps, bands, findings), each run's findings, then one row per
figure (per-layer gradient flow, update ratios, skip ratios, band gradients, clipping and loss
scale, metrics) with one column per run, on the same y range (:func:`share_limits`). Figures
come from :mod:`geobp.callbacks.plots`; the page embeds them as PNGs and loads nothing from the
network.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from geobp.callbacks.diagnosis import band_names
from geobp.callbacks.jsonfile import atomic_write_text, read_json
from geobp.callbacks.plots import FIGURES, figures, png_base64
from geobp.callbacks.report import STYLE, diagnoses_table, find_runs
from geobp.errors import ConfigError, format_error

#: The figures compared, in page order (keys of :data:`~geobp.callbacks.plots.FIGURES`).
COMPARED = ("flow", "updates", "skips", "bands", "clip", "metrics")


def render_compare(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Write one page comparing the gradient flow of several runs.

    Args:
        runs: two or more runs: each a run's log directory (holding ``gradflow/gradflow.json``)
            or a ``gradflow.json``.
        out: the page to write (atomically).

    Returns:
        The path of the page.

    Raises:
        ConfigError: fewer than two runs, or a folder that holds several runs.
        DataNotFoundError: a run without gradflow data (see :func:`~geobp.callbacks.report.find_runs`).
    """
    if len(runs) < 2:
        raise ConfigError(format_error(None, f"--compare needs at least two runs (found {len(runs)})",
                                       "pass two or more run folders: geobp report --compare RUN_A RUN_B"))
    docs = []
    for run in runs:
        found = find_runs(run)
        if len(found) > 1:
            shown = ", ".join(str(p.parent.parent) for p in found[:4]) + (" ..." if len(found) > 4 else "")
            raise ConfigError(format_error(run, f"holds {len(found)} runs ({shown})",
                                           "pass each run's own folder to --compare"))
        docs.append((str(run), read_json(found[0])))
    out = Path(out)
    atomic_write_text(out, compare_html(docs))
    return out


def compare_html(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The comparison page for ``(label, gradflow document)`` pairs, in the given order."""
    esc = html.escape
    n = len(runs)
    grid = f"display:grid;grid-template-columns:repeat({n},minmax(0,1fr));gap:1em"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Gradient flow: {n} runs compared</title>",
        f"<style>{STYLE}body{{max-width:{max(1200, 700 * n)}px}}.runs{{{grid}}}"
        ".runs h3{margin:0.3em 0;font-size:1em}td{font-size:0.9em}</style></head><body>",
        f"<h1>Gradient flow: {n} runs compared</h1>",
        _runs_table(runs),
        "<h2 id='findings'>Findings</h2><div class='runs'>",
    ]
    built = [{key: (title, fig) for key, title, fig in figures(data, COMPARED)} for _, data in runs]
    for key in COMPARED:
        share_limits([figs[key][1] for figs in built if key in figs])
    for j, (label, data) in enumerate(runs):
        anchors = {f"{key}" for key in built[j]}
        parts.append(f"<div><h3>{esc(label)}</h3>"
                     f"{diagnoses_table(data.get('diagnoses') or [], anchors, prefix='')}</div>")
    parts.append("</div>")
    for key in COMPARED:
        title = FIGURES[key][0]
        parts.append(f"<h2 id='{key}'>{esc(title)}</h2><div class='runs'>")
        for (label, _), figs in zip(runs, built):
            parts.append(f"<div><h3>{esc(label)}</h3>")
            if key in figs:
                parts.append(f"<img alt='{esc(title)}: {esc(label)}' "
                             f"src='data:image/png;base64,{png_base64(figs[key][1])}'>")
            else:
                parts.append("<p>not recorded in this run</p>")
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def share_limits(figs: Sequence[Figure]) -> None:
    """Give the same axes of several figures of one kind the same y range, so runs compare by eye.

    Axes are matched by position; figures whose axes differ in number are left as they are, and
    so are colour bars and heatmaps whose rows are layers (each run keeps its own).
    """
    if len(figs) < 2 or len({len(f.axes) for f in figs}) != 1:
        return
    for column in zip(*(f.axes for f in figs)):
        if any(ax.get_label() == "<colorbar>" for ax in column) or len({ax.get_yscale() for ax in column}) != 1:
            continue
        if any(ax.yaxis_inverted() for ax in column):
            continue  # a heatmap whose rows are layers: each run keeps its own
        lows, highs = zip(*(ax.get_ylim() for ax in column))
        for ax in column:
            ax.set_ylim(min(lows), max(highs))


def _runs_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    esc = html.escape
    rows: list[tuple[str, list[str]]] = [
        ("model", [str((d.get("meta") or {}).get("model")) for _, d in runs]),
        ("precision", [str((d.get("meta") or {}).get("precision")) for _, d in runs]),
        ("gradient clip", [str((d.get("meta") or {}).get("gradient_clip_val")) for _, d in runs]),
        ("recordings (every N steps)", [f"{len(d.get('steps') or [])} ({(d.get('meta') or {}).get('every_n_steps')})"
                                        for _, d in runs]),
        ("steps observed", [str(_steps_seen(d)) for _, d in runs]),
        ("layers (frozen)", [f"{len(d.get('layers') or [])} ({len(d.get('frozen') or [])})" for _, d in runs]),
        ("bands", [", ".join(band_names(d)) if d.get("bands") else "-" for _, d in runs]),
        ("findings", [", ".join(sorted({str(f.get("kind")) for f in d.get("diagnoses") or []})) or "none"
                      for _, d in runs]),
        ("updated", [str((d.get("meta") or {}).get("updated", "-")) for _, d in runs]),
    ]
    head = "".join(f"<th>{esc(label)}</th>" for label, _ in runs)
    body = "".join(f"<tr><th>{esc(name)}</th>{''.join(f'<td>{esc(v)}</td>' for v in values)}</tr>"
                   for name, values in rows)
    return f"<table><tr><th>run</th>{head}</tr>{body}</table>"


def _steps_seen(data: Mapping[str, Any]) -> int:
    totals = data.get("totals") or {}
    return int(totals.get("steps_seen") or (data.get("steps_seen") or [0])[-1] or 0)
