"""Diagnosis rules on the optimizer's steps: ``stalled``, ``unstable_updates`` and ``loss_scale``.

They read the update ratios (``update_ratio``: ``||dw|| / ||w||`` of each layer over the
optimizer step of each recording) and, under fp16, the loss scale and skipped steps. Pure
functions from the ``gradflow.json`` document to findings, registered as rules
(:mod:`geobp.callbacks.rules`) and run by :func:`~geobp.callbacks.diagnosis.diagnose`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from geobp.callbacks.findings import Finding, Thresholds, as_array, persistent_start
from geobp.callbacks.rules import register_rule

#: A ``stalled`` stretch must cover at least this share of the usable recordings: a schedule that
#: anneals the learning rate to zero stalls every layer over the last few recordings by design.
STALLED_SHARE = 0.1


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


@register_rule("stalled", order=60, figure="updates")
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


@register_rule("unstable_updates", order=40, figure="updates")
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


@register_rule("loss_scale", order=20, figure="clip")
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
