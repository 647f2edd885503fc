"""Diagnosis rules: pure functions from a recorded gradient-flow series to findings.

The input is the ``gradflow.json`` document (see :mod:`geobp.callbacks.report` for its schema),
as a dict; non-finite numbers may appear as floats or as the strings ``"nan"``/``"inf"``.

A condition *persists* from recording ``i`` when it holds at ``i`` and in at least
``Thresholds.persist`` of the recordings from ``i`` on, and in at least ``min_recordings`` of them;
a finding's ``step`` is the first such ``i``'s step. Findings are sorted by kind, then step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

FindingKind = Literal["vanishing", "exploding", "nonfinite", "dead_branch", "dead_band"]
_ORDER = ("nonfinite", "exploding", "vanishing", "dead_branch", "dead_band")


class GradientFlowWarning(UserWarning):
    """Category of the warnings issued for findings while training runs (filterable)."""


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the diagnosis rules (defaults suit ResNet/U-Net segmentation models).

    Attributes:
        vanishing_ratio: vanishing when the early layers' per-element RMS gradient is below this
            fraction of the head's (early/head = the first/last tenth of the layers, medians).
            Healthy ResNet U-Nets sit around 0.1 to 10; a 10-layer sigmoid MLP near 1e-9.
        exploding_norm: exploding when the total gradient norm stays above this.
        exploding_growth: exploding when the total norm stays above this multiple of its median
            over the first ``min_recordings`` recordings.
        clip_fraction: exploding when more than this fraction of steps is clipped.
        dead_branch_ratio: dead when a path carries less than this fraction of the gradient of
            the other path of its skip (residual branch vs shortcut; U-Net skip vs deeper path,
            either way round).
        dead_band_ratio: dead when an input band's gradient is below this fraction of the
            median band's.
        min_loss_scale: under fp16 with a loss scaler, non-finite steps are expected while the
            scale calibrates; they become a finding once the scale falls below this (or when
            the loss itself is non-finite).
        persist: fraction of recordings, from its start, in which a condition must hold.
        min_recordings: fewest recordings in which a condition must hold.
    """

    vanishing_ratio: float = 1e-4
    exploding_norm: float = 1e4
    exploding_growth: float = 1e3
    clip_fraction: float = 0.5
    dead_branch_ratio: float = 1e-3
    dead_band_ratio: float = 1e-3
    min_loss_scale: float = 1.0
    persist: float = 0.8
    min_recordings: int = 3

    def __post_init__(self) -> None:
        for name in ("vanishing_ratio", "exploding_norm", "exploding_growth", "dead_branch_ratio",
                     "dead_band_ratio", "min_loss_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Thresholds.{name} must be > 0 (found {getattr(self, name)})")
        if not 0 < self.clip_fraction <= 1 or not 0 < self.persist <= 1:
            raise ValueError(f"Thresholds.clip_fraction and persist must be in (0, 1] "
                             f"(found {self.clip_fraction}, {self.persist})")
        if self.min_recordings < 1:
            raise ValueError(f"Thresholds.min_recordings must be >= 1 (found {self.min_recordings})")


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: ``vanishing``, ``exploding``, ``nonfinite``, ``dead_branch`` or ``dead_band``.
        where: the layer, skip (``<module> <path>``) or band (``band <i> (<conv>)``) concerned.
        step: first optimizer step at which it was seen.
        value: the measured quantity (a ratio, a norm, a fraction or a count; see ``message``).
        message: one line saying what was measured.
        fix: one line saying what to try.
    """

    kind: FindingKind
    where: str
    step: int
    value: float
    message: str
    fix: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (non-finite ``value`` as a string)."""
        out = asdict(self)
        out["value"] = encode_float(self.value)
        return out


def encode_float(x: float | None) -> float | str | None:
    """A float for JSON: non-finite values become ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_float(x: Any) -> float:
    """Inverse of :func:`encode_float`; None becomes NaN."""
    if x is None:
        return math.nan
    return float(x)


def as_array(rows: Sequence[Any] | None) -> np.ndarray:
    """A list (or list of lists) of JSON numbers, None and non-finite strings as a float64 array.

    None becomes NaN; a None standing for a whole row (e.g. no band gradient at a recording)
    becomes a row of NaN.
    """
    if not rows:
        return np.zeros((0,))
    try:
        return np.array(rows, dtype=np.float64)  # numpy parses "nan"/"inf" and maps None to NaN
    except ValueError:
        width = max((len(r) for r in rows if isinstance(r, (list, tuple))), default=0)
        return np.array([r if isinstance(r, (list, tuple)) else [None] * width for r in rows], dtype=np.float64)


def persistent_start(flags: np.ndarray, t: Thresholds) -> int | None:
    """Index of the first recording from which ``flags`` persist (see module doc), or None."""
    flags = np.asarray(flags, dtype=bool)
    n = len(flags)
    if n == 0:
        return None
    counts = np.cumsum(flags[::-1])[::-1]  # number of True from i on
    lengths = np.arange(n, 0, -1)
    ok = flags & (counts >= t.min_recordings) & (counts >= t.persist * lengths)
    hits = np.flatnonzero(ok)
    return int(hits[0]) if len(hits) else None


def diagnose(data: Mapping[str, Any], thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every rule over a recorded series.

    Args:
        data: the ``gradflow.json`` document.
        thresholds: rule thresholds (defaults when None).

    Returns:
        The findings, sorted by kind (nonfinite, exploding, vanishing, dead_branch, dead_band)
        then step.
    """
    t = thresholds or Thresholds()
    findings = [*find_nonfinite(data, t), *find_exploding(data, t), *find_vanishing(data, t),
                *find_dead_branches(data, t), *find_dead_bands(data, t)]
    return sorted(findings, key=lambda f: (_ORDER.index(f.kind), f.step, f.where))


def find_vanishing(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """Early layers' per-element RMS gradient orders of magnitude below the head's, persisting."""
    layers = data.get("layers") or []
    norms = as_array(data.get("layer_norm"))
    if len(layers) < 2 or norms.ndim != 2 or norms.shape[1] != len(layers):
        return []
    numel = np.array([max(int(layer["numel"]), 1) for layer in layers], dtype=np.float64)
    rms = norms / np.sqrt(numel)
    k = max(1, len(layers) // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        early = np.nanmedian(rms[:, :k], axis=1)
        head = np.nanmedian(rms[:, -k:], axis=1)
        ratio = early / head
    usable = np.isfinite(ratio) | ((early == 0) & (head > 0))
    ratio = np.where((early == 0) & (head > 0), 0.0, ratio)
    keep = np.flatnonzero(usable)
    start = persistent_start(ratio[keep] < t.vanishing_ratio, t)
    if start is None:
        return []
    i = keep[start]
    value = float(np.median(ratio[keep[start:]]))
    first = layers[0]["name"]
    return [Finding(
        "vanishing", first, int(data["steps"][i]), value,
        f"gradients vanish: the first {k} layer(s) from {first} get {value:.1e} of the head's "
        f"RMS gradient per element (threshold {t.vanishing_ratio:.0e})",
        "add normalization (BatchNorm/GroupNorm) or skip connections, replace sigmoid/tanh "
        "with ReLU/GELU, or use a variance-preserving init (kaiming)")]


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
    tiles = describe_tiles(chosen)
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


def describe_tiles(event: Mapping[str, Any], limit: int = 3) -> str:
    """``"; tiles: scene a (r, c, h, w), ..."`` for an event's batch, or ``""`` without metadata."""
    scenes = event.get("scenes")
    windows = event.get("windows")
    if not scenes and not windows:
        return ""
    n = max(len(scenes or []), len(windows or []))
    parts = []
    for j in range(min(n, limit)):
        scene = scenes[j] if scenes and j < len(scenes) else "?"
        window = tuple(windows[j]) if windows and j < len(windows) else None
        parts.append(f"{scene} {window}" if window is not None else str(scene))
    more = f" and {n - limit} more" if n > limit else ""
    return f"; tiles (scene (row, col, height, width)): {', '.join(parts)}{more}"


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


def find_dead_bands(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """An input band whose first-convolution gradient is far below the median band's, persisting."""
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    if norms.ndim != 2 or norms.shape[1] < 2:
        return []
    steps = data.get("steps") or []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(norms, axis=1)
    out = []
    for b in range(norms.shape[1]):
        valid = np.isfinite(norms[:, b]) & np.isfinite(median) & (median > 0)
        keep = np.flatnonzero(valid)
        ratio = norms[keep, b] / median[keep]
        start = persistent_start(ratio < t.dead_band_ratio, t)
        if start is None:
            continue
        i = keep[start]
        value = float(np.median(ratio[start:]))
        out.append(Finding(
            "dead_band", f"band {b} ({bands.get('layer')})", int(steps[i]), value,
            f"input band {b} gets {value:.1e} of the median band's gradient in {bands.get('layer')} "
            f"(threshold {t.dead_band_ratio:.0e}): constant, empty or mis-normalised",
            "check the band's pixels (constant, all nodata?) and its normalization statistics, "
            "or drop it from the band selection"))
    return out
