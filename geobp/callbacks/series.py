"""The recorded series: the gradflow document in memory, built and appended to by the monitor.

The document is the content of ``gradflow.json`` (written by :mod:`geobp.callbacks.jsonfile`,
diagnosed by :mod:`geobp.callbacks.diagnosis`, drawn by :mod:`geobp.callbacks.report`). It is
plain JSON data: dicts, lists, strings, numbers, booleans and None.

``gradflow.json`` schema (``"schema": "geobp.gradflow"``, ``"version": 1``). Numbers that are
not finite are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``; ``null`` means "not
measured". ``R`` is the number of recordings, ``L`` of layers, ``C`` of input bands.

=================  ===========================================================================
key                value
=================  ===========================================================================
schema, version    ``"geobp.gradflow"``, ``1``
meta               ``model`` (class name), ``precision``, ``gradient_clip_val`` (null: none),
                   ``gradient_clip_algorithm``, ``loss_scaler`` (bool), ``world_size``,
                   ``every_n_steps``, ``step_check``, ``geobp_version``, ``updated`` (ISO time);
                   ``resumed_at``: steps at which the run was resumed from a checkpoint (absent
                   if never); ``thinned``: times the series was halved (absent if never)
thresholds         the diagnosis thresholds used (:class:`~geobp.callbacks.diagnosis.Thresholds`)
layers             ``[L]`` of ``{name, type, numel}``: modules owning parameters, module order
steps              ``[R]`` optimizer step (``trainer.global_step``, 0-based) of each recording
layer_norm         ``[R][L]`` L2 norm of each layer's gradient (unscaled, before clipping)
layer_max_abs      ``[R][L]`` largest absolute gradient value of each layer
update_ratio       ``[R][L]`` ``||w_after - w_before|| / ||w_before||`` of each layer over the
                   recorded step's optimizer step (null: not measured, a skipped step, ``w = 0``)
frozen             ``[{name, type, numel}]``: modules whose parameters all have
                   ``requires_grad=False`` (not monitored: never stalled)
total_norm         ``[R]`` L2 norm over all parameters, before clipping
clipped            ``[R]`` whether that step's total exceeded the clip threshold (null: no clip)
steps_seen         ``[R]`` optimizer steps observed so far (every step unless step_check off)
clipped_steps      ``[R]`` of those, clipped so far (null: no clipping)
nonfinite_steps    ``[R]`` of those, with NaN/Inf gradients so far (skipped steps under fp16)
totals             ``{steps_seen, nonfinite_steps, clipped_steps}`` at the end of training (or
                   at an exception), counting steps after the last recording; absent before
loss_scale         ``[R]`` the fp16 loss scale (null without a scaler)
loss               ``[R]`` the training loss of the recorded step (unscaled)
bands              null, or ``{layer, names: [C], norm: [R][C]}``: first convolution's gradient
                   per band; ``names`` from the data module's ``band_names``, else
                   ``band_1..band_C``
skips              ``[{name, kind, source, paths: [a, b], norms: [R][2], ratio: [R]}]``,
                   ``ratio = a / b``; kinds ``residual`` (branch, shortcut), ``unet`` (skip,
                   deeper), ``pattern`` (through, elsewhere)
metrics            ``{name: [[step, value], ...]}`` from ``trainer.callback_metrics``
nonfinite          ``[{step, layer, all_layers, nonfinite_layers, loss_scale, scenes, windows,
                   bounds, crs, band_max_abs}]``: the first step of each run of non-finite steps
                   (first 100 runs), ``layer`` the first non-finite one in backward order,
                   ``all_layers`` whether every layer with a gradient was (then the loss was),
                   the step's tiles, with ``windows`` as ``[row_off, col_off, height, width]``,
                   ``bounds`` as ``[left, bottom, right, top]`` in the scene's ``crs`` (null
                   where the scene's georeference is unknown), ``band_max_abs`` ``[tiles][C]``
                   the largest absolute input value per band (``"nan"``: a NaN in it)
diagnoses          ``[{kind, where, step, value, message, fix}]``
=================  ===========================================================================

**Bounded size.** Past ``max_recordings`` recordings the series is *thinned*: every other
recording is dropped (the first and the latest are kept), so the spacing of older recordings
doubles while recording goes on at the same interval. Metric series are thinned the same way.
The document, and with it ``gradflow.json`` and the monitor's checkpoint state, then stays below
about ``max_recordings`` x (2 L + 3 K + C + 10) numbers (K skips).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from geobp.callbacks.diagnosis import early_head_ratios, encode_float

SCHEMA = "geobp.gradflow"
SCHEMA_VERSION = 1
#: Non-finite steps kept in full in ``nonfinite`` (all are counted).
MAX_EVENTS = 100
#: Top-level keys holding one value per recording.
PER_RECORDING = ("steps", "layer_norm", "layer_max_abs", "update_ratio", "total_norm", "clipped", "steps_seen",
                 "clipped_steps", "nonfinite_steps", "loss_scale", "loss")


def new_document(meta: Mapping[str, Any], thresholds: Mapping[str, Any], layers: Sequence[Mapping[str, Any]],
                 band_layer: str | None, skips: Sequence[Mapping[str, Any]],
                 band_names: Sequence[str] | None = None,
                 frozen: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """An empty document.

    Args:
        meta: the ``meta`` entries (model, precision, clipping, ...).
        thresholds: the diagnosis thresholds.
        layers: ``{name, type, numel}`` of each layer, in module order.
        band_layer: module path of the convolution measured per band, or None.
        skips: ``{name, kind, source, paths}`` of each skip connection.
        band_names: one name per input band of ``band_layer`` (None: unknown).
        frozen: ``{name, type, numel}`` of each frozen module.

    Returns:
        The document, with every series empty.
    """
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "meta": dict(meta),
        "thresholds": dict(thresholds),
        "layers": [dict(x) for x in layers],
        "frozen": [dict(x) for x in frozen],
        "frozen_spans": [],
        "steps": [], "layer_norm": [], "layer_max_abs": [], "update_ratio": [], "total_norm": [], "clipped": [],
        "steps_seen": [], "clipped_steps": [], "nonfinite_steps": [], "loss_scale": [], "loss": [],
        "bands": ({"layer": band_layer, "names": list(band_names) if band_names is not None else None, "norm": []}
                  if band_layer is not None else None),
        "skips": [{**dict(s), "norms": [], "ratio": []} for s in skips],
        "metrics": {},
        "nonfinite": [],
        "diagnoses": [],
    }


@dataclass(frozen=True)
class Recording:
    """The values of one recording, as measured (host floats; None: not measured).

    Attributes:
        step: optimizer step.
        layer_norm: L2 norm of each layer's gradient (None for a layer without gradient).
        layer_max_abs: largest ``|grad|`` of each layer (None likewise).
        total_norm: L2 norm over all gradients.
        clipped: whether the step was clipped (None without clipping).
        steps_seen: optimizer steps observed so far.
        clipped_steps: of those, clipped (None without clipping).
        nonfinite_steps: of those, with NaN/Inf gradients.
        loss_scale: the fp16 loss scale, or None.
        loss: the training loss, or None.
        band_norm: gradient norm per input band, or None.
        skip_norms: ``(a, b)`` norms of each skip's two paths (None: path not observed).
    """

    step: int
    layer_norm: list[float | None]
    layer_max_abs: list[float | None]
    total_norm: float
    clipped: bool | None
    steps_seen: int
    clipped_steps: int | None
    nonfinite_steps: int
    loss_scale: float | None
    loss: float | None
    band_norm: list[float] | None
    skip_norms: list[tuple[float | None, float | None]]


def append_recording(data: dict[str, Any], rec: Recording) -> None:
    """Append one recording to every series of ``data`` (non-finite values encoded)."""
    data["steps"].append(rec.step)
    data["layer_norm"].append([encode_float(v) for v in rec.layer_norm])
    data["layer_max_abs"].append([encode_float(v) for v in rec.layer_max_abs])
    data["update_ratio"].append(None)  # set by set_update_ratio once the optimizer has stepped
    data["total_norm"].append(encode_float(rec.total_norm))
    data["clipped"].append(rec.clipped)
    data["steps_seen"].append(rec.steps_seen)
    data["clipped_steps"].append(rec.clipped_steps)
    data["nonfinite_steps"].append(rec.nonfinite_steps)
    data["loss_scale"].append(rec.loss_scale)
    data["loss"].append(encode_float(rec.loss))
    if data["bands"] is not None:
        data["bands"]["norm"].append([encode_float(v) for v in rec.band_norm] if rec.band_norm else None)
    for entry, (a, b) in zip(data["skips"], rec.skip_norms, strict=True):
        entry["norms"].append([encode_float(a), encode_float(b)])
        entry["ratio"].append(encode_float(a / b if a is not None and b not in (None, 0.0) else None))


def note_frozen(data: dict[str, Any], step: int, names: Sequence[str]) -> None:
    """Record that the measured layers ``names`` were frozen (``requires_grad=False``) at the recording
    of ``step``: their values are null there because they were frozen, not lost (a fine-tuning
    schedule such as ``model.freeze_encoder_epochs``).

    ``data["frozen_spans"]`` holds ``{layers, first_step, last_step}``; a span goes on while the same
    layers are frozen at consecutive recordings.
    """
    spans = data.setdefault("frozen_spans", [])
    if not names:
        return
    steps = data["steps"]
    previous = steps[-2] if len(steps) > 1 and steps[-1] == step else None
    if spans and spans[-1]["layers"] == list(names) and spans[-1]["last_step"] == previous:
        spans[-1]["last_step"] = step
    else:
        spans.append({"layers": list(names), "first_step": step, "last_step": step})


def set_update_ratio(data: dict[str, Any], step: int, ratios: Sequence[float | None] | None) -> bool:
    """Store the update ratios of the recording at ``step`` (the latest one), if it is there.

    Returns:
        Whether the latest recording is at ``step`` (and now holds ``ratios``).
    """
    if not data["steps"] or data["steps"][-1] != step:
        return False
    data["update_ratio"][-1] = [encode_float(v) for v in ratios] if ratios is not None else None
    return True


def window_bounds(transform: Sequence[float], window: Sequence[int]) -> list[float]:
    """``[left, bottom, right, top]`` of a pixel window in map coordinates.

    Args:
        transform: the scene's affine transform ``(a, b, c, d, e, f)``: ``x = a col + b row + c``,
            ``y = d col + e row + f``.
        window: ``(row_off, col_off, height, width)``.
    """
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    row, col, height, width = (int(v) for v in window[:4])
    corners = [(col + dc, row + dr) for dc in (0, width) for dr in (0, height)]
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    return [min(xs), min(ys), max(xs), max(ys)]


def append_nonfinite_event(data: dict[str, Any], step: int, layers: Sequence[str], layer_bad: Sequence[bool],
                           layer_zero: Sequence[bool], loss_scale: float | None,
                           tiles: tuple[Any, Any] | None,
                           georef: Mapping[str, tuple[str | None, Sequence[float]]] | None = None,
                           band_max_abs: Sequence[Sequence[float]] | None = None) -> None:
    """Add a ``nonfinite`` entry (at most :data:`MAX_EVENTS`; nothing when no layer is non-finite).

    Args:
        data: the document.
        step: the step of the event.
        layers: layer names, in module order.
        layer_bad: whether each layer's gradient is non-finite.
        layer_zero: whether each layer's gradient is zero (or absent).
        loss_scale: the fp16 loss scale, or None.
        tiles: ``(scene, window)`` of the step's batch (geobp's batch contract), or None.
        georef: scene name to ``(crs, transform)``, for the tiles' bounds, or None.
        band_max_abs: ``[tiles][C]`` largest absolute input value per tile and band, or None.
    """
    bad_names = [name for name, bad in zip(layers, layer_bad) if bad]
    if len(data["nonfinite"]) >= MAX_EVENTS or not bad_names:
        return
    scenes, windows = None, None
    if tiles is not None:
        scene, window = tiles
        if scene is not None:
            scenes = [str(s) for s in (scene if isinstance(scene, (list, tuple)) else [scene])]
        if window is not None:
            windows = window.tolist() if isinstance(window, Tensor) else [list(w) for w in window]
    bounds, crs = None, None
    if georef and scenes and windows and len(scenes) == len(windows):
        known = [georef.get(s) for s in scenes]
        bounds = [window_bounds(g[1], w) if g is not None else None for g, w in zip(known, windows)]
        crs = [g[0] if g is not None else None for g in known]
    data["nonfinite"].append({
        "step": step,
        "layer": bad_names[-1],  # nearest the output: backward visits it first
        "all_layers": all(b or z for b, z in zip(layer_bad, layer_zero)),  # zero: no gradient
        "nonfinite_layers": len(bad_names),
        "loss_scale": loss_scale,
        "scenes": scenes,
        "windows": windows,
        "bounds": bounds,
        "crs": crs,
        "band_max_abs": [[encode_float(v) for v in row] for row in band_max_abs] if band_max_abs is not None else None,
    })


def append_metrics(data: dict[str, Any], step: int, metrics: Mapping[str, Any]) -> None:
    """Add the scalar ``metrics`` at ``step`` (a second value at the same step replaces the first).

    Names starting with ``gradflow/`` (the monitor's own) and values that are not one number
    are left out.
    """
    for name, value in metrics.items():
        if name.startswith("gradflow/"):
            continue
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        series = data["metrics"].setdefault(name, [])
        if series and series[-1][0] == step:
            series[-1][1] = encode_float(v)
        else:
            series.append([step, encode_float(v)])


def latest_scalars(data: Mapping[str, Any], clipping: bool, loss_scaler: bool) -> dict[str, float]:
    """The logger scalars of the latest recording (see :class:`~geobp.callbacks.GradientFlowMonitor`)."""

    def last(key: str) -> float:
        v = data[key][-1]
        return math.nan if v is None else float(v)

    out: dict[str, float] = {"gradflow/total_norm": last("total_norm"),
                             "gradflow/nonfinite_steps": last("nonfinite_steps")}
    ratio = early_head_ratio(data)
    if ratio is not None:
        out["gradflow/early_head_ratio"] = ratio
    if clipping:
        out["gradflow/clip_fraction"] = last("clipped_steps") / max(int(data["steps_seen"][-1]), 1)
    if loss_scaler:
        out["gradflow/loss_scale"] = last("loss_scale")
        out["gradflow/skipped_steps"] = last("nonfinite_steps")
    for entry in data["skips"]:
        if entry["ratio"][-1] is not None:
            out[f"gradflow/skip_ratio/{entry['name']}"] = float(entry["ratio"][-1])
    if data["bands"] is not None and data["bands"]["norm"][-1] is not None:
        for b, v in enumerate(data["bands"]["norm"][-1]):
            out[f"gradflow/band_norm/{b}"] = float(v)
    return out


def early_head_ratio(data: Mapping[str, Any]) -> float | None:
    """The latest recording's early/head ratio (:func:`~geobp.callbacks.diagnosis.early_head_ratios`), or None."""
    ratio = float(early_head_ratios(data["layers"], data["layer_norm"][-1:])[-1])
    return ratio if math.isfinite(ratio) else None


def thin(data: dict[str, Any], max_recordings: int) -> bool:
    """Halve the series once it holds more than ``max_recordings`` recordings (see module doc).

    Keeps the recordings at even positions and the latest one; a metric series longer than
    ``max_recordings`` is halved the same way. Increments ``meta["thinned"]``.

    Returns:
        Whether the series was thinned.
    """
    n = len(data["steps"])
    if n <= max_recordings:
        return False
    keep = [*range(0, n - 1, 2), n - 1]

    def pick(values: list[Any]) -> list[Any]:
        return [values[i] for i in keep]

    for key in PER_RECORDING:
        data[key] = pick(data[key])
    if data["bands"] is not None:
        data["bands"]["norm"] = pick(data["bands"]["norm"])
    for entry in data["skips"]:
        entry["norms"], entry["ratio"] = pick(entry["norms"]), pick(entry["ratio"])
    for name, points in data["metrics"].items():
        if len(points) > max_recordings:
            data["metrics"][name] = [*points[0:-1:2], points[-1]]
    data["meta"]["thinned"] = int(data["meta"].get("thinned", 0)) + 1
    return True


def layout_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why a saved document's series cannot be continued by ``current``'s recordings, or None.

    They must have the same layers (names and sizes), skips (names and kinds) and band layer.
    """
    if saved.get("schema") != SCHEMA or saved.get("version") != SCHEMA_VERSION:
        return f"it is not a {SCHEMA} version {SCHEMA_VERSION} document"
    for key, fields in (("layers", ("name", "numel")), ("skips", ("name", "kind"))):
        a = [tuple(x.get(f) for f in fields) for x in saved.get(key) or []]
        b = [tuple(x.get(f) for f in fields) for x in current.get(key) or []]
        if a != b:
            diff = next((f"{x} != {y}" for x, y in zip(a, b) if x != y), f"{len(a)} != {len(b)} entries")
            return f"its {key} differ from the model's ({diff})"
    band_a = (saved.get("bands") or {}).get("layer")
    band_b = (current.get("bands") or {}).get("layer")
    if band_a != band_b:
        return f"its band layer {band_a!r} is not the model's {band_b!r}"
    return None


def continue_document(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The saved document, to be continued by the current run.

    Series, metrics, non-finite events and diagnoses come from ``saved``; ``meta`` (precision,
    interval, version, ...) and ``thresholds`` from ``current``, as they apply from now on,
    except ``resumed_at`` and ``thinned``, which keep the saved history. ``totals`` is dropped
    (set again at the end of training).
    """
    out = copy_document(saved)
    out.pop("totals", None)
    out.setdefault("update_ratio", [None] * len(out.get("steps") or []))
    out.setdefault("frozen_spans", [])
    out["frozen"] = copy_document(current.get("frozen") or [])
    if out.get("bands") is not None and current.get("bands") is not None:
        out["bands"]["names"] = copy_document(current["bands"].get("names"))
    meta = dict(current["meta"])
    for key in ("resumed_at", "thinned"):
        if key in (saved.get("meta") or {}):
            meta[key] = copy_document(saved["meta"][key])
    out["meta"] = meta
    out["thresholds"] = dict(current["thresholds"])
    return out


def copy_document(data: Any) -> Any:
    """A copy of a document's dicts and lists (the leaves are immutable), e.g. for a checkpoint."""
    if isinstance(data, dict):
        return {k: copy_document(v) for k, v in data.items()}
    if isinstance(data, list):
        return [copy_document(v) for v in data]
    return data
