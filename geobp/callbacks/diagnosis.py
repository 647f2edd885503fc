"""Diagnosis rules: pure functions from a recorded gradient-flow series to findings.

The input is the ``gradflow.json`` document (see :mod:`geobp.callbacks.series` for its schema),
as a dict; non-finite numbers may appear as floats or as the strings ``"nan"``/``"inf"``.

A condition *persists* from recording ``i`` when it holds at ``i`` and in at least
``Thresholds.persist`` of the recordings from ``i`` on, and in at least ``min_recordings`` of them;
a finding's ``step`` is the first such ``i``'s step. Findings are sorted by their rule's order,
then step.

Each rule is declared once, with ``@register_rule(kind, order=..., figure=..., thresholds=...)``
(:mod:`geobp.callbacks.rules`): :func:`diagnose` runs every registered rule, and the report reads
each rule's figure from the registry. To add a rule, write it here with that decorator.

The thresholds, the :class:`Finding` type and the number helpers live in
:mod:`geobp.callbacks.findings` (re-exported here); the rules on the optimizer's steps
(``stalled``, ``unstable_updates``, ``loss_scale``) in :mod:`geobp.callbacks.update_rules`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from geobp.bands import default_band_name
from geobp.callbacks.findings import (
    Finding,
    FindingKind,
    GradientFlowWarning,
    Thresholds,
    as_array,
    band_names,
    decode_float,
    default_band_names,
    encode_float,
    persistent_start,
)
from geobp.callbacks.rules import order_of, register_rule, rules_in_order, unknown_extra_thresholds
from geobp.callbacks.update_rules import find_loss_scale, find_stalled, find_unstable_updates

__all__ = [
    "Finding", "FindingKind", "GradientFlowWarning", "Thresholds", "as_array", "band_names", "decode_float",
    "default_band_names", "describe_tiles", "diagnose", "early_head_ratios", "encode_float", "find_band_scale",
    "find_dead_bands", "find_dead_branches", "find_exploding", "find_loss_scale", "find_nonfinite", "find_stalled",
    "find_unstable_updates", "find_vanishing", "persistent_start",
]


def diagnose(data: Mapping[str, Any], thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every registered rule (:data:`geobp.callbacks.rules.RULES`) over a recorded series.

    Args:
        data: the ``gradflow.json`` document.
        thresholds: rule thresholds (defaults when None). Names in ``extra`` that no registered
            rule declares are warned about (:class:`GradientFlowWarning`) and otherwise unused.

    Returns:
        The findings, sorted by their rule's order (built in: nonfinite, loss_scale, exploding,
        unstable_updates, vanishing, stalled, dead_branch, dead_band, band_scale), then step.
    """
    t = thresholds or Thresholds()
    unknown = unknown_extra_thresholds(t)
    if unknown:
        warnings.warn(f"gradflow.thresholds.extra: no registered diagnosis rule declares {unknown}; ignored",
                      GradientFlowWarning, stacklevel=2)
    findings = [f for rule in rules_in_order() for f in rule.check(data, t)]
    return sorted(findings, key=lambda f: (order_of(f.kind), f.step, f.where))


def early_head_ratios(layers: Sequence[Mapping[str, Any]], layer_norm: Sequence[Any] | None) -> np.ndarray:
    """The vanishing indicator of each recording: early layers' RMS gradient over the head's.

    The one definition used by the ``vanishing`` rule and by the logged
    ``gradflow/early_head_ratio``: per-element RMS gradient (norm / sqrt(numel)) of each layer;
    the median (NaN ignored) over the first tenth of the layers (at least one) over that over the
    last tenth.

    Args:
        layers: ``{name, numel, ...}`` of each layer, in module order.
        layer_norm: ``[R][L]`` gradient norms (JSON values: None and non-finite strings allowed).

    Returns:
        ``[R]`` float64: the ratio; 0 where the early layers get no gradient and the head does;
        NaN where it is not defined (fewer than two layers, no finite values, a zero head).
    """
    norms = as_array(layer_norm)
    if len(layers) < 2 or norms.ndim != 2 or norms.shape[1] != len(layers):
        return np.full(len(layer_norm or []), np.nan)
    numel = np.array([max(int(layer["numel"]), 1) for layer in layers], dtype=np.float64)
    rms = norms / np.sqrt(numel)
    k = max(1, len(layers) // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        early = np.nanmedian(rms[:, :k], axis=1)
        head = np.nanmedian(rms[:, -k:], axis=1)
        ratio = early / head
    ratio = np.where(np.isfinite(ratio), ratio, np.nan)
    return np.where((early == 0) & (head > 0), 0.0, ratio)


@register_rule("vanishing", order=50, figure="flow")
def find_vanishing(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """Early layers' per-element RMS gradient orders of magnitude below the head's, persisting."""
    layers = data.get("layers") or []
    ratio = early_head_ratios(layers, data.get("layer_norm"))
    keep = np.flatnonzero(np.isfinite(ratio))
    start = persistent_start(ratio[keep] < t.vanishing_ratio, t)
    if start is None:
        return []
    i = keep[start]
    value = float(np.median(ratio[keep[start:]]))
    k = max(1, len(layers) // 10)
    first = layers[0]["name"]
    return [Finding(
        "vanishing", first, int(data["steps"][i]), value,
        f"gradients vanish: the first {k} layer(s) from {first} get {value:.1e} of the head's "
        f"RMS gradient per element (threshold {t.vanishing_ratio:.0e})",
        "add normalization (BatchNorm/GroupNorm) or skip connections, replace sigmoid/tanh "
        "with ReLU/GELU, or use a variance-preserving init (kaiming)")]


@register_rule("exploding", order=30, figure="clip")
def find_exploding(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """Total norm above a bound or growing without bound (persisting), or clipping on most steps."""
    out: list[Finding] = []
    steps = data.get("steps") or []
    total = as_array(data.get("total_norm"))
    layers = data.get("layers") or []
    norms = as_array(data.get("layer_norm"))
    keep = np.flatnonzero(np.isfinite(total)) if len(total) else np.zeros(0, dtype=int)
    fix = ("lower the learning rate, set trainer.gradient_clip_val (e.g. 1.0), and check the "
           "weight init scale and the input normalization")

    def largest_layer(i: int) -> str:
        if norms.ndim == 2 and norms.shape[1] == len(layers) and len(layers):
            row = np.where(np.isfinite(norms[i]), norms[i], -1.0)
            return str(layers[int(np.argmax(row))]["name"])
        return "total"

    if len(keep):
        finite = total[keep]
        start = persistent_start(finite > t.exploding_norm, t)
        if start is not None:
            i = keep[start]
            value = float(np.median(finite[start:]))
            out.append(Finding(
                "exploding", largest_layer(i), int(steps[i]), value,
                f"gradients explode: total norm {value:.3g} stays above {t.exploding_norm:.0e} "
                f"(largest in {largest_layer(i)})", fix))
        else:
            ref = float(np.median(finite[: t.min_recordings]))
            if ref > 0 and len(finite) > t.min_recordings:
                growth = finite / ref
                start = persistent_start(growth > t.exploding_growth, t)
                if start is not None:
                    i = keep[start]
                    value = float(np.median(growth[start:]))
                    out.append(Finding(
                        "exploding", largest_layer(i), int(steps[i]), value,
                        f"gradients explode: total norm grew {value:.3g}x over its start "
                        f"({ref:.3g}; threshold {t.exploding_growth:.0e}x), largest in {largest_layer(i)}",
                        fix))
    totals = data.get("totals") or {}
    seen = totals.get("steps_seen", (data.get("steps_seen") or [0])[-1])
    n_clipped = totals.get("clipped_steps", (data.get("clipped_steps") or [None])[-1])
    # Like the other rules, wait for min_recordings: early in training norms are large and
    # clipping is normal (warm-up), so a fraction over the first recording alone is a false alarm.
    if n_clipped is not None and seen >= 10 and len(steps) >= t.min_recordings:
        fraction = n_clipped / seen
        if fraction > t.clip_fraction:
            first = next((s for s, c in zip(steps, data.get("clipped") or []) if c), steps[0] if steps else 0)
            clip = (data.get("meta") or {}).get("gradient_clip_val")
            out.append(Finding(
                "exploding", "gradient clipping", int(first), fraction,
                f"gradients are clipped on {fraction:.0%} of steps (threshold {clip}): the clip, "
                "not the learning rate, sets the step size",
                "lower the learning rate, or raise trainer.gradient_clip_val if the norms are healthy"))
    return out


@register_rule("nonfinite", order=10, figure="nonfinite")
def find_nonfinite(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """NaN/Inf gradients: any without a loss scaler; with one, a collapsed scale or a non-finite loss."""
    events = data.get("nonfinite") or []
    if not events:
        return []
    scaler = bool((data.get("meta") or {}).get("loss_scaler"))
    chosen = None
    if not scaler:
        chosen = events[0]
    else:
        chosen = next((e for e in events if e.get("all_layers")), None)
        scales = [decode_float(s) for s in data.get("loss_scale") or [] if s is not None]
        if chosen is None and scales and scales[-1] < t.min_loss_scale:
            chosen = events[-1]
    if chosen is None:
        return []
    # the series' count can lag its events (the event is stored on its step, the count at the next
    # recording) and the totals come only at the end: the largest of the three
    counts = [len(events), *(data.get("nonfinite_steps") or [])[-1:], (data.get("totals") or {}).get("nonfinite_steps") or 0]
    count = max(c for c in counts if c is not None)
    tiles = describe_tiles(chosen, band_names(data), t.extreme_input)
    if chosen.get("all_layers"):
        where = "loss"
        what = (f"non-finite loss at step {chosen['step']}: every layer's gradient is NaN/Inf, "
                f"down to the output layer {chosen.get('layer')}, so the forward pass produced it")
        fix = ("look at the tiles named (nodata, NaN pixels, normalization by a zero std), and at "
               "log/sqrt/division in the loss; under fp16 an activation may overflow (try bf16-mixed)")
    else:
        where = str(chosen.get("layer"))
        what = f"non-finite gradient at step {chosen['step']}, first in {where} (backward order)"
        fix = ("lower the learning rate or set trainer.gradient_clip_val; check the operation "
               "in that layer's backward (sqrt/log/division near zero)")
    if scaler:
        what += f"; loss scale {decode_float((data.get('loss_scale') or [None])[-1]):.3g}"
    return [Finding("nonfinite", where, int(chosen["step"]), float(count),
                    f"{what}; {count} non-finite step(s) in all{tiles}", fix)]


def describe_tiles(event: Mapping[str, Any], names: Sequence[str] = (), extreme: float = math.inf,
                   limit: int = 3) -> str:
    """``"; tiles: ..."`` for an event's batch, or ``""`` without metadata.

    Each tile is named by scene and window (row, col, height, width), followed, where the event
    has them, by its bounds in the scene's CRS (left, bottom, right, top) and by the input bands
    whose normalised values were non-finite or above ``extreme`` in absolute value.

    Args:
        event: a ``nonfinite`` entry of the document.
        names: the band names (``band_<i+1>`` past their end).
        extreme: the largest absolute normalised value not called extreme.
        limit: tiles named; the rest are counted.
    """
    scenes = event.get("scenes")
    windows = event.get("windows")
    if not scenes and not windows:
        return ""
    bounds, crs, inputs = event.get("bounds") or [], event.get("crs") or [], event.get("band_max_abs") or []
    n = max(len(scenes or []), len(windows or []))
    parts = []
    for j in range(min(n, limit)):
        scene = scenes[j] if scenes and j < len(scenes) else "?"
        window = tuple(windows[j]) if windows and j < len(windows) else None
        text = f"{scene} {window}" if window is not None else str(scene)
        if j < len(bounds) and bounds[j] is not None:
            text += f" at ({', '.join(f'{v:.6g}' for v in bounds[j])})"
            text += f" in {crs[j]}" if j < len(crs) and crs[j] else ""
        if j < len(inputs) and inputs[j] is not None:
            text += _input_bands(as_array(inputs[j]), names, extreme)
        parts.append(text)
    more = f" and {n - limit} more" if n > limit else ""
    head = "scene (row, col, height, width)" + (" at (left, bottom, right, top)" if bounds else "")
    return f"; tiles ({head}): {', '.join(parts)}{more}"


def _input_bands(max_abs: np.ndarray, names: Sequence[str], extreme: float) -> str:
    """`` [non-finite input: B2; extreme input: B5 (|x| up to 3e+04)]`` for one tile, or ``""``."""
    def name(b: int) -> str:
        return names[b] if b < len(names) else default_band_name(b + 1)

    bad = [name(b) for b in np.flatnonzero(~np.isfinite(max_abs))]
    big = [(name(b), max_abs[b]) for b in np.flatnonzero(np.isfinite(max_abs) & (max_abs > extreme))]
    found = []
    if bad:
        found.append(f"non-finite input: {', '.join(bad)}")
    if big:
        found.append(f"extreme input: {', '.join(f'{n} (|x| up to {v:.3g})' for n, v in big)}")
    return f" [{'; '.join(found)}]" if found else ""


@register_rule("dead_branch", order=70, figure="skips")
def find_dead_branches(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """A skip path carrying almost nothing compared with its other path, persisting."""
    out = []
    steps = data.get("steps") or []
    for skip in data.get("skips") or []:
        norms = as_array(skip.get("norms"))
        if norms.ndim != 2 or norms.shape[1] != 2:
            continue
        paths = skip.get("paths") or ["a", "b"]
        # Residual blocks: only the branch can die (the identity always carries the gradient).
        checks = [(0, 1)] if skip.get("kind") == "residual" else [(0, 1), (1, 0)]
        for num, den in checks:
            a, b = norms[:, num], norms[:, den]
            valid = np.isfinite(a) & np.isfinite(b) & (a >= 0) & (b > 0)
            keep = np.flatnonzero(valid)
            ratio = a[keep] / b[keep]
            start = persistent_start(ratio < t.dead_branch_ratio, t)
            if start is None:
                continue
            i = keep[start]
            value = float(np.median(ratio[start:]))
            name = f"{skip['name']} {paths[num]}"
            if skip.get("kind") == "residual":
                fix = ("check the branch's last BatchNorm weight (zero-init residual that never "
                       "woke up?), dead ReLUs and the learning rate, or remove the block")
            else:
                fix = (f"the {paths[num]} path is unused: check what feeds it (a frozen or "
                       f"detached module?) and its normalization")
            out.append(Finding(
                "dead_branch", name, int(steps[i]), value,
                f"{name} carries {value:.1e} of the {paths[den]} path's gradient "
                f"(threshold {t.dead_branch_ratio:.0e})", fix))
    return out


def _band_runs(data: Mapping[str, Any], t: Thresholds, others_only: bool,
               abnormal: Callable[[np.ndarray], np.ndarray]) -> Iterator[tuple[int, float, str, Any]]:
    """Per input band whose first-convolution gradient, over the median band's (of all bands, or
    of the other bands with ``others_only``), is ``abnormal`` persistently: (step, median ratio
    since, band name, layer)."""
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    if norms.ndim != 2 or norms.shape[1] < 2:
        return
    steps = data.get("steps") or []
    names = band_names(data)
    layer = bands.get("layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(norms, axis=1)
        for b in range(norms.shape[1]):
            reference = np.nanmedian(np.delete(norms, b, axis=1), axis=1) if others_only else median
            keep = np.flatnonzero(np.isfinite(norms[:, b]) & np.isfinite(reference) & (reference > 0))
            ratio = norms[keep, b] / reference[keep]
            start = persistent_start(abnormal(ratio), t)
            if start is not None:
                yield int(steps[keep[start]]), float(np.median(ratio[start:])), names[b], layer


@register_rule("dead_band", order=80, figure="bands")
def find_dead_bands(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """An input band whose first-convolution gradient is far below the median band's, persisting."""
    return [
        Finding(
            "dead_band", f"{name} ({layer})", step, value,
            f"input band {name} gets {value:.1e} of the median band's gradient in {layer} "
            f"(threshold {t.dead_band_ratio:.0e}): constant, empty or mis-normalised",
            "check the band's pixels (constant, all nodata?) and its normalization statistics, "
            "or drop it from the band selection")
        for step, value, name, layer in _band_runs(data, t, False, lambda r: r < t.dead_band_ratio)
    ]


@register_rule("band_scale", order=90, figure="bands")
def find_band_scale(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """An input band whose first-convolution gradient is orders of magnitude above the others', persisting.

    A weight's gradient scales with its input, so a band whose values are far larger than the
    others' (raw digital numbers next to reflectances, wrong statistics) shows here first.
    """
    return [
        Finding(
            "band_scale", f"{name} ({layer})", step, value,
            f"input band {name} gets {value:.3g}x the median gradient of the other bands in {layer} "
            f"(threshold {t.band_scale_ratio:g}x): its values are on another scale than the others' "
            "(raw digital numbers next to reflectances, or wrong normalization statistics)",
            "check the band's units and its normalization statistics (delete the cached statistics "
            "to recompute them), or normalise it like the other bands")
        for step, value, name, layer in _band_runs(data, t, True, lambda r: r > t.band_scale_ratio)
    ]
