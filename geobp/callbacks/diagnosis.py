"""Diagnosis rules: pure functions from a recorded gradient-flow series to findings.

The input is the ``gradflow.json`` document (see :mod:`geobp.callbacks.series` for its schema),
as a dict; non-finite numbers may appear as floats or as the strings ``"nan"``/``"inf"``.

A condition *persists* from recording ``i`` when it holds at ``i`` and in at least
``Thresholds.persist`` of the recordings from ``i`` on, and in at least ``min_recordings`` of them;
a finding's ``step`` is the first such ``i``'s step. Findings are sorted by kind, then step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from geobp.errors import ConfigError, format_error

FindingKind = Literal["vanishing", "exploding", "nonfinite", "dead_branch", "dead_band", "band_scale", "stalled",
                      "unstable_updates", "loss_scale"]
_ORDER = ("nonfinite", "loss_scale", "exploding", "unstable_updates", "vanishing", "stalled", "dead_branch",
          "dead_band", "band_scale")
#: A ``stalled`` stretch must cover at least this share of the usable recordings: a schedule that
#: anneals the learning rate to zero stalls every layer over the last few recordings by design.
STALLED_SHARE = 0.1


class GradientFlowWarning(UserWarning):
    """Category of the warnings issued for findings while training runs (filterable)."""


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the diagnosis rules (defaults suit ResNet/U-Net segmentation models).

    Attributes:
        vanishing_ratio: vanishing when the early layers' per-element RMS gradient is below this
            fraction of the head's (:func:`early_head_ratios`). Healthy ResNet U-Nets sit around
            0.1 to 10; a 10-layer sigmoid MLP near 1e-9.
        exploding_norm: exploding when the total gradient norm stays above this.
        exploding_growth: exploding when the total norm stays above this multiple of its median
            over the first ``min_recordings`` recordings.
        clip_fraction: exploding when more than this fraction of steps is clipped.
        dead_branch_ratio: dead when a path carries less than this fraction of the gradient of
            the other path of its skip (residual branch vs shortcut; U-Net skip vs deeper path,
            either way round).
        dead_band_ratio: dead when an input band's gradient is below this fraction of the
            median band's.
        band_scale_ratio: mis-scaled when an input band's gradient is above this multiple of
            the median of the other bands'.
        stalled_ratio: stalled when a layer that receives a gradient changes by less than this
            fraction of its weight norm in an optimizer step (update ratio ``||dw|| / ||w||``;
            about 1e-3 is the classic healthy value), over at least a tenth of the run.
        unstable_update_ratio: unstable when the median layer's update ratio is above this.
        min_loss_scale: under fp16 with a loss scaler, non-finite steps are expected while the
            scale calibrates; they become a finding once the scale falls below this (or when
            the loss itself is non-finite).
        skip_fraction: ``loss_scale`` when the scale is below ``min_loss_scale`` and more than
            this fraction of the steps since the previous recording were skipped.
        extreme_input: a band of a tile is named as extreme in a non-finite finding when its
            largest absolute normalised value is above this.
        persist: fraction of recordings, from its start, in which a condition must hold.
        min_recordings: fewest recordings in which a condition must hold.

    Raises:
        ConfigError: a value is out of its range (the message names the key and the range).
    """

    vanishing_ratio: float = 1e-4
    exploding_norm: float = 1e4
    exploding_growth: float = 1e3
    clip_fraction: float = 0.5
    dead_branch_ratio: float = 1e-3
    dead_band_ratio: float = 1e-3
    band_scale_ratio: float = 100.0
    stalled_ratio: float = 1e-6
    unstable_update_ratio: float = 0.1
    min_loss_scale: float = 1.0
    skip_fraction: float = 0.5
    extreme_input: float = 100.0
    persist: float = 0.8
    min_recordings: int = 3

    def __post_init__(self) -> None:
        fractions = ("clip_fraction", "persist", "skip_fraction")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "min_recordings":
                ok, valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1"
            elif f.name in fractions:
                ok, valid = _is_number(value) and 0 < value <= 1, "a number in (0, 1]"
            else:
                ok, valid = _is_number(value) and 0 < value < math.inf, "a finite number > 0"
            if not ok:
                raise ConfigError(format_error(
                    None, f"gradflow.thresholds.{f.name} must be {valid} (found {value!r})",
                    f"set gradflow.thresholds.{f.name} to {valid}, e.g. its default {f.default!r}"))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: ``vanishing``, ``exploding``, ``nonfinite``, ``dead_branch``, ``dead_band``,
            ``band_scale``, ``stalled``, ``unstable_updates`` or ``loss_scale``.
        where: the layer, skip (``<module> <path>``) or band (``<band name> (<conv>)``) concerned.
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
        The findings, sorted by kind (nonfinite, loss_scale, exploding, unstable_updates,
        vanishing, stalled, dead_branch, dead_band, band_scale) then step.
    """
    t = thresholds or Thresholds()
    findings = [*find_nonfinite(data, t), *find_loss_scale(data, t), *find_exploding(data, t),
                *find_unstable_updates(data, t), *find_vanishing(data, t), *find_stalled(data, t),
                *find_dead_branches(data, t), *find_dead_bands(data, t), *find_band_scale(data, t)]
    return sorted(findings, key=lambda f: (_ORDER.index(f.kind), f.step, f.where))


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
        return names[b] if b < len(names) else f"band_{b + 1}"

    bad = [name(b) for b in np.flatnonzero(~np.isfinite(max_abs))]
    big = [(name(b), max_abs[b]) for b in np.flatnonzero(np.isfinite(max_abs) & (max_abs > extreme))]
    found = []
    if bad:
        found.append(f"non-finite input: {', '.join(bad)}")
    if big:
        found.append(f"extreme input: {', '.join(f'{n} (|x| up to {v:.3g})' for n, v in big)}")
    return f" [{'; '.join(found)}]" if found else ""


def default_band_names(count: int) -> list[str]:
    """``band_1`` .. ``band_<count>``: the names of bands whose files carry none."""
    return [f"band_{b + 1}" for b in range(count)]


def band_names(data: Mapping[str, Any]) -> list[str]:
    """The names of the document's input bands (``bands.names``, else :func:`default_band_names`)."""
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    names = [str(n) for n in bands.get("names") or []]
    count = norms.shape[1] if norms.ndim == 2 else len(names)
    return names if len(names) == count else default_band_names(count)


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
    names = band_names(data)
    layer = bands.get("layer")
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
            "dead_band", f"{names[b]} ({layer})", int(steps[i]), value,
            f"input band {names[b]} gets {value:.1e} of the median band's gradient in {layer} "
            f"(threshold {t.dead_band_ratio:.0e}): constant, empty or mis-normalised",
            "check the band's pixels (constant, all nodata?) and its normalization statistics, "
            "or drop it from the band selection"))
    return out


def find_band_scale(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """An input band whose first-convolution gradient is orders of magnitude above the others', persisting.

    A weight's gradient scales with its input, so a band whose values are far larger than the
    others' (raw digital numbers next to reflectances, wrong statistics) shows here first.
    """
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    if norms.ndim != 2 or norms.shape[1] < 2:
        return []
    steps = data.get("steps") or []
    names = band_names(data)
    layer = bands.get("layer")
    out = []
    for b in range(norms.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            others = np.nanmedian(np.delete(norms, b, axis=1), axis=1)
        valid = np.isfinite(norms[:, b]) & np.isfinite(others) & (others > 0)
        keep = np.flatnonzero(valid)
        ratio = norms[keep, b] / others[keep]
        start = persistent_start(ratio > t.band_scale_ratio, t)
        if start is None:
            continue
        i = keep[start]
        value = float(np.median(ratio[start:]))
        out.append(Finding(
            "band_scale", f"{names[b]} ({layer})", int(steps[i]), value,
            f"input band {names[b]} gets {value:.3g}x the median gradient of the other bands in {layer} "
            f"(threshold {t.band_scale_ratio:g}x): its values are on another scale than the others' "
            "(raw digital numbers next to reflectances, or wrong normalization statistics)",
            "check the band's units and its normalization statistics (delete the cached statistics "
            "to recompute them), or normalise it like the other bands"))
    return out


def _update_rows(data: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """``(update ratios [R][L], gradient norms [R][L], layers)`` when both are recorded, else empty arrays."""
    layers = data.get("layers") or []
    upd = as_array(data.get("update_ratio"))
    norms = as_array(data.get("layer_norm"))
    if not layers or upd.ndim != 2 or upd.shape != norms.shape or upd.shape[1] != len(layers):
        return np.zeros((0, 0)), np.zeros((0, 0)), []
    return upd, norms, layers


def _frozen_note(data: Mapping[str, Any]) -> str:
    frozen = data.get("frozen") or []
    return f"; {len(frozen)} frozen layer(s) (requires_grad=False) are not checked" if frozen else ""


def find_stalled(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """Layers receiving gradients whose weights do not change, persisting over a tenth of the run or more.

    One finding names every stalled layer. Layers frozen on purpose (``requires_grad=False``)
    are not monitored, hence never stalled; recordings where a layer's RMS gradient is below
    ``vanishing_ratio`` of the head's are left out for it (vanishing, not stalled).
    """
    upd, norms, layers = _update_rows(data)
    steps = data.get("steps") or []
    stalled: list[tuple[int, str, float]] = []  # (start step, layer, median ratio)
    if layers:
        # A layer whose gradient vanishes does not move either: that is the vanishing rule's
        # finding, so a layer counts only where its RMS gradient is not vanishingly small next
        # to the head's (the last tenth of the layers, as in early_head_ratios).
        numel = np.array([max(int(x["numel"]), 1) for x in layers], dtype=np.float64)
        rms = np.where(np.isfinite(norms), norms, np.nan) / np.sqrt(numel)
        k = max(1, len(layers) // 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            head = np.nanmedian(rms[:, -k:], axis=1, keepdims=True)
        moving_gradient = rms >= t.vanishing_ratio * head
    for j, layer in enumerate(layers):
        valid = np.isfinite(upd[:, j]) & moving_gradient[:, j] & (norms[:, j] > 0)
        keep = np.flatnonzero(valid)
        start = persistent_start(upd[keep, j] < t.stalled_ratio, t)
        if start is None or len(keep) - start < STALLED_SHARE * len(keep):
            continue
        stalled.append((int(steps[keep[start]]), str(layer["name"]), float(np.median(upd[keep[start:], j]))))
    if not stalled:
        return []
    step = min(s for s, _, _ in stalled)
    value = float(np.median([v for _, _, v in stalled]))
    shown = ", ".join(name for _, name, _ in stalled[:5]) + (f" and {len(stalled) - 5} more" if len(stalled) > 5 else "")
    return [Finding(
        "stalled", stalled[0][1], step, value,
        f"{len(stalled)} of {len(layers)} layer(s) get gradients but do not change: update ratio "
        f"||dw||/||w|| {value:.1e} per step (threshold {t.stalled_ratio:.0e}; about 1e-3 is healthy) "
        f"in {shown}{_frozen_note(data)}",
        "check that those parameters are in the optimizer, that their parameter group's learning "
        "rate is not 0, that the scheduler has not driven it to 0, and that weight decay does "
        "not cancel the updates; freeze them (requires_grad=False) if that is the intent")]


def find_unstable_updates(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """The median layer's update ratio far above the healthy ~1e-3 on most recordings."""
    upd, _, layers = _update_rows(data)
    if not layers:
        return []
    steps = data.get("steps") or []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(np.where(np.isfinite(upd), upd, np.nan), axis=1)
    keep = np.flatnonzero(np.isfinite(median))
    start = persistent_start(median[keep] > t.unstable_update_ratio, t)
    if start is None:
        return []
    rows = keep[start:]
    value = float(np.median(median[rows]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = np.nanmedian(upd[rows], axis=0)
    largest = str(layers[int(np.nanargmax(np.where(np.isfinite(per_layer), per_layer, -1.0)))]["name"])
    return [Finding(
        "unstable_updates", largest, int(steps[keep[start]]), value,
        f"updates are too large: the median layer changes by {value:.2g} of its weight norm per "
        f"step (threshold {t.unstable_update_ratio:g}; about 1e-3 is healthy), most in {largest}",
        "lower the learning rate (or add warm-up); check the optimizer's settings (e.g. Adam's eps) "
        "and that the loss is averaged, not summed, over pixels")]


def find_loss_scale(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
    """Under fp16 with a loss scaler: the scale driven below ``min_loss_scale`` with most steps skipped."""
    if not (data.get("meta") or {}).get("loss_scaler"):
        return []
    scale = as_array(data.get("loss_scale"))
    seen = as_array(data.get("steps_seen"))
    skipped = as_array(data.get("nonfinite_steps"))
    steps = data.get("steps") or []
    if not (len(scale) == len(seen) == len(skipped) == len(steps)) or not len(steps):
        return []
    d_seen = np.diff(seen, prepend=0.0)
    d_skipped = np.diff(skipped, prepend=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fraction = d_skipped / d_seen
    keep = np.flatnonzero(np.isfinite(scale) & np.isfinite(fraction) & (d_seen > 0))
    flags = (scale[keep] < t.min_loss_scale) & (fraction[keep] > t.skip_fraction)
    start = persistent_start(flags, t)
    if start is None:
        return []
    rows = keep[start:]
    share = float(d_skipped[rows].sum() / d_seen[rows].sum())
    value = float(scale[rows[-1]])
    return [Finding(
        "loss_scale", "loss scale", int(steps[keep[start]]), value,
        f"the fp16 loss scale fell to {value:.3g} (threshold {t.min_loss_scale:g}) and {share:.0%} of "
        f"the steps since step {int(steps[keep[start]])} were skipped for non-finite gradients: "
        "training barely updates",
        "use bf16-mixed where the GPU supports it (no loss scaling); otherwise find what overflows "
        "in fp16: lower the learning rate, check the input normalization, keep exp/log/division "
        "of the loss in fp32")]
