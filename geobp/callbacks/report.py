"""The report page: ``report.html``, one self-contained page rendered from a gradflow document.

Diagnoses with their fixes come first, each linked to the figure that shows it, then the figures
of :mod:`geobp.callbacks.plots` as embedded PNGs, then tables of the skip connections and
non-finite steps. The page loads nothing from the network. ``geobp report RUN_DIR`` calls
:func:`render_report_from_run_dir`; ``geobp report --compare`` is :mod:`geobp.callbacks.compare`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geobp.callbacks.diagnosis import Thresholds, as_array, band_names, decode_float, diagnose, describe_tiles
from geobp.callbacks.jsonfile import JSON_NAME, REPORT_DIR, atomic_write_text, read_json
from geobp.callbacks.plots import figures, png_base64
from geobp.callbacks.rules import figure_of
from geobp.errors import DataNotFoundError, format_error

HTML_NAME = "report.html"


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
    return [render_report(p) for p in find_runs(run_dir)]


def find_runs(run_dir: str | Path) -> list[Path]:
    """The ``gradflow.json`` files of a run: ``RUN_DIR/gradflow/gradflow.json``, else all below it.

    Args:
        run_dir: a run's log directory, a folder holding several runs, or a ``gradflow.json``.

    Returns:
        The data files, sorted by path (at least one).

    Raises:
        DataNotFoundError: ``run_dir`` does not exist or holds no ``gradflow/gradflow.json``.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [run_dir]
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
    return found


# ----- the page -------------------------------------------------------------------------------

def render_html(data: Mapping[str, Any]) -> str:
    """The self-contained report page (PNG plots embedded as base64, no external resources)."""
    meta = data.get("meta") or {}
    esc = html.escape
    figs = figures(data)
    anchors = {key for key, _, _ in figs} | ({"nonfinite"} if data.get("nonfinite") else set())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Gradient flow: {esc(str(meta.get('model', 'run')))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Gradient flow: {esc(str(meta.get('model', 'run')))}</h1>",
        f"<p>{_summary(data)}</p>",
        "<h2 id='diagnoses'>Diagnoses</h2>",
        diagnoses_table(data.get("diagnoses") or [], anchors),
    ]
    for key, title, fig in figs:
        parts.append(f"<h2 id='{key}'>{esc(title)}</h2>")
        parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{png_base64(fig)}'>")
    parts.append(_skips_table(data))
    parts.append(_nonfinite_table(data))
    parts.append("</body></html>")
    return "\n".join(parts)


#: The pages' style sheet (inline: the pages load nothing).
STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
         "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
         ".ok{color:#2a7a2a}.kind{font-weight:bold;color:#b02a2a}.kind a{color:inherit}img{max-width:100%}"
         "h2{margin-top:2em;border-bottom:1px solid #ddd}")


def _summary(data: Mapping[str, Any]) -> str:
    meta = data.get("meta") or {}
    steps = data.get("steps") or []
    seen = (data.get("steps_seen") or [0])[-1]
    bands = band_names(data) if data.get("bands") else []
    items = [
        f"{len(steps)} recordings (every {meta.get('every_n_steps')} steps)",
        f"{seen} steps observed",
        f"{len(data.get('layers') or [])} layers",
        f"{len(data.get('skips') or [])} skip connections",
        f"precision {meta.get('precision')}",
        f"clip {meta.get('gradient_clip_val')}",
        f"updated {meta.get('updated', 'never (not written yet)')}",
    ]
    if bands:
        items.insert(3, f"bands {', '.join(bands)}")
    if data.get("frozen"):
        items.insert(3, f"{len(data['frozen'])} frozen layers")
    for span in data.get("frozen_spans") or []:
        items.insert(3, frozen_span_text(span))
    return html.escape(" · ".join(str(i) for i in items))


def frozen_span_text(span: Mapping[str, Any]) -> str:
    """``12 layers frozen at steps 0-40 (model.encoder.conv1, ...)``: layers frozen for a time, null in the plots then."""
    layers = list(span.get("layers") or [])
    shown = ", ".join(layers[:2]) + (", ..." if len(layers) > 2 else "")
    return f"{len(layers)} layers frozen at steps {span.get('first_step')}-{span.get('last_step')} ({shown})"


def diagnoses_table(diagnoses: list[Mapping[str, Any]], anchors: set[str] | frozenset[str] = frozenset(),
                    prefix: str = "") -> str:
    """The findings as an HTML table, each kind linked to the section that shows it.

    Args:
        diagnoses: the document's ``diagnoses``.
        anchors: the section ids present on the page (a finding whose section is absent is not linked).
        prefix: prepended to the ids (several runs on one page).
    """
    if not diagnoses:
        return "<p class='ok'>No findings: gradients look healthy by every rule.</p>"
    esc = html.escape

    def kind(d: Mapping[str, Any]) -> str:
        name = esc(str(d.get("kind")))
        target = figure_of(str(d.get("kind")))
        return f"<a href='#{prefix}{target}'>{name}</a>" if target in anchors else name

    rows = "".join(
        f"<tr><td class='kind'>{kind(d)}</td><td>{esc(str(d.get('where')))}</td>"
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
    names = band_names(data)
    extreme = float((data.get("thresholds") or {}).get("extreme_input") or math.inf)
    rows = "".join(
        f"<tr><td>{e.get('step')}</td><td>{esc(str(e.get('layer')))}</td>"
        f"<td>{'yes' if e.get('all_layers') else 'no'}</td>"
        f"<td>{esc(describe_tiles(e, names, extreme, limit=len(e.get('scenes') or e.get('windows') or [])).lstrip('; '))}"
        "</td></tr>" for e in events)
    return ("<h2 id='nonfinite'>Non-finite steps</h2><table><tr><th>step</th><th>first layer (backward order)</th>"
            "<th>all layers</th><th>tiles: scene, window, bounds in the scene's CRS, bad input bands</th></tr>"
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
