"""``GradientFlowMonitor``: the Lightning hooks of gradient-flow monitoring.

The work is done elsewhere, one job per module: :mod:`~geobp.callbacks.recorder` measures (with
:mod:`~geobp.callbacks.measure`, :mod:`~geobp.callbacks.skips` and
:mod:`~geobp.callbacks.steps`), :mod:`~geobp.callbacks.series` holds the recorded document,
:mod:`~geobp.callbacks.diagnosis` turns it into findings and :mod:`~geobp.callbacks.writer`
writes the report. This module decides when each happens.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

import geobp
from geobp.callbacks.diagnosis import (
    Finding,
    GradientFlowWarning,
    Thresholds,
    decode_float,
    default_band_names,
    diagnose,
)
from geobp.callbacks.jsonfile import REPORT_DIR
from geobp.callbacks.measure import input_max_abs
from geobp.callbacks.recorder import GradientRecorder
from geobp.callbacks.series import (
    append_metrics,
    append_nonfinite_event,
    append_recording,
    note_frozen,
    continue_document,
    copy_document,
    latest_scalars,
    layout_mismatch,
    new_document,
    set_update_ratio,
    thin,
)
from geobp.callbacks.steps import RING_ROWS
from geobp.callbacks.writer import ReportWriter
from geobp.errors import ConfigError, format_error

StepCheck = Literal["auto", "sync", "deferred", "off"]


class GradientFlowMonitor(L.Callback):
    """Measure gradient flow during training, diagnose it, and write a report per run.

    Works on any LightningModule. Measurements are taken in ``on_before_optimizer_step``, where
    Lightning hands over gradients that are unscaled (AMP) and not yet clipped, and, under DDP,
    already averaged across ranks. Every ``every_n_steps`` optimizer steps (step 0 included), and
    at the first step of each run of non-finite steps, a *recording* stores, with fused kernels
    and one device-to-host copy, the gradient norms per layer, input band and skip-connection
    path, the total norm, clipping, the fp16 loss scale and the loss (see
    :mod:`geobp.callbacks.recorder` for each, and for DDP, FSDP and gradient accumulation). Around
    the optimizer step of each planned recording it also measures each layer's update ratio
    ``||dw|| / ||w||`` (a copy of the weights is taken before that step and dropped after it).
    Modules whose parameters all have ``requires_grad=False`` are listed as frozen, not measured.

    In its first hook (``setup``) it reads, when the trainer has a data module, the data
    module's ``band_names`` (one name per input band; ``band_1..band_N`` without it), used in
    plots and findings, and its ``scenes`` (``name`` and ``image.crs``/``image.transform``, as
    :class:`~geobp.data.datamodule.GeoTiffDataModule` has them), with which a non-finite finding
    gives each tile's bounds in its scene's CRS. A non-finite finding also names the bands that
    were non-finite or extreme in its tiles: each tile's largest absolute input value per band
    (one reduction over ``batch["image"]``) is taken when the event is found during its step
    (``sync``), or kept on the device for every step when it may be found later (``deferred``).

    Between recordings, ``step_check`` decides what is done on each step (see
    :mod:`geobp.callbacks.steps`):

    - ``deferred``: each step's per-parameter norms (one fused ``torch._foreach_norm``) wait on
      the device, no host sync, and the next recording counts clipped and non-finite steps and
      reports the first of each run of non-finite steps (up to ``every_n_steps - 1`` steps late);
    - ``sync``: the same, plus one host read per step of its finiteness, so a non-finite step is
      recorded at once. Free on CPU, and nearly so under fp16 (its loss scaler syncs anyway);
    - ``auto`` (default): ``sync`` on CPU or with a loss scaler, else ``deferred``;
    - ``off``: nothing between recordings (clip and non-finite counts cover recorded steps only).

    With ``gradient_clip_algorithm="value"`` clipping is counted on recorded steps only.

    After each recording the diagnosis rules (:mod:`geobp.callbacks.diagnosis`) run on rank 0;
    each new finding is issued once as a :class:`GradientFlowWarning`. Rank 0 writes
    ``<trainer.log_dir>/gradflow/gradflow.json`` and ``report.html`` (see
    :mod:`geobp.callbacks.report`) at the end of training, on an exception, and at validation
    and training epoch ends at most every ``report_every_s`` seconds (there the JSON is written
    at once and the page rendered in a background thread, so a killed run keeps a recent report
    without training waiting for matplotlib).

    Logged to the trainer's loggers (rank 0, at each recording, ``step`` = optimizer step):

    - ``gradflow/total_norm``: L2 norm of all gradients, before clipping;
    - ``gradflow/early_head_ratio``: RMS gradient of the first tenth of the layers over the last
      tenth's (the vanishing indicator);
    - ``gradflow/nonfinite_steps``: steps with NaN/Inf gradients so far;
    - ``gradflow/clip_fraction``: fraction of steps clipped so far (only with gradient clipping);
    - ``gradflow/loss_scale`` and ``gradflow/skipped_steps``: only with an fp16 loss scaler;
    - ``gradflow/skip_ratio/<module>``: path ratio of each skip (branch/shortcut, skip/deeper,
      through/elsewhere);
    - ``gradflow/band_norm/<b>``: gradient norm of input band ``b``.

    Checkpoints carry the recorded run (:meth:`state_dict`): a run resumed from one continues its
    series, step counts and findings (each still warned only once), and its report covers the
    whole run; ``meta.resumed_at`` lists the resume steps.

    Args:
        every_n_steps: optimizer steps between recordings. A recording costs more than a
            tracked step, so its share of step time falls as the interval grows; the default is
            chosen to keep recordings well within the monitor's budget of step time (what was
            measured, and how: BENCHMARKS.md, section 2; ``python -m benchmarks monitor-cost``
            measures it on your machine). The per-step check does not depend on it.
        thresholds: diagnosis thresholds (:class:`~geobp.callbacks.diagnosis.Thresholds`).
        skip_pattern: regular expression over module paths of other modules to treat as skip
            carriers (``re.search``), or None.
        band_layer: module path of the convolution used for per-band gradients; None takes the
            first ``nn.Conv2d`` in module order.
        step_check: what is measured between recordings (see above).
        log_to_logger: log the scalars above to the trainer's loggers.
        write_report: write ``gradflow.json`` and ``report.html`` under ``trainer.log_dir``.
        report_every_s: least seconds between refreshes of the report at epoch ends (0: every
            epoch end); the final write is always done.
        warn: issue findings as warnings while training runs.
        max_recordings: most recordings kept; past it the series is thinned (every other one
            dropped, see :mod:`geobp.callbacks.series`), which bounds memory, ``gradflow.json``
            and the checkpoint state (a recording's size grows with the number of layers, skips
            and bands).

    Raises:
        ConfigError: an argument is out of range or ``skip_pattern`` is not a valid regex;
            in ``setup``, a model without trainable parameters or a ``band_layer`` that is not
            a convolution of the model.
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        thresholds: Thresholds = Thresholds(),
        skip_pattern: str | None = None,
        band_layer: str | None = None,
        step_check: StepCheck = "auto",
        log_to_logger: bool = True,
        write_report: bool = True,
        report_every_s: float = 300.0,
        warn: bool = True,
        max_recordings: int = 2000,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(format_error(None, f"every_n_steps must be an integer >= 1 (found {every_n_steps!r})",
                                           "set GradientFlowMonitor every_n_steps to e.g. 25"))
        if step_check not in get_args(StepCheck):
            raise ConfigError(format_error(
                None, f"step_check must be one of {get_args(StepCheck)} (found {step_check!r})",
                "set GradientFlowMonitor step_check to auto"))
        if skip_pattern is not None:
            try:
                re.compile(skip_pattern)
            except re.error as err:
                raise ConfigError(format_error(
                    None, f"skip_pattern {skip_pattern!r} is not a valid regular expression ({err})",
                    "fix the pattern, e.g. 'decoder\\.skip\\d+'")) from err
        if isinstance(max_recordings, bool) or not isinstance(max_recordings, int) or max_recordings < 10:
            raise ConfigError(format_error(None, f"max_recordings must be an integer >= 10 (found {max_recordings!r})",
                                           "set GradientFlowMonitor max_recordings to e.g. 2000"))
        if not report_every_s >= 0:
            raise ConfigError(format_error(None, f"report_every_s must be >= 0 (found {report_every_s!r})",
                                           "set GradientFlowMonitor report_every_s to e.g. 300"))
        self.every_n_steps = every_n_steps
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise ConfigError(format_error(None, f"thresholds must be a Thresholds (found {type(thresholds).__name__})",
                                           "pass geobp.callbacks.Thresholds(...) or set gradflow.thresholds keys"))
        self.thresholds = thresholds or Thresholds()
        self.skip_pattern = skip_pattern
        self.band_layer = band_layer
        self.step_check: StepCheck = step_check
        self.log_to_logger = log_to_logger
        self.write_report = write_report
        self.report_every_s = float(report_every_s)
        self.warn = warn
        self.max_recordings = max_recordings
        self.data: dict[str, Any] | None = None  # the gradflow document being recorded
        self.findings: list = []  # latest diagnosis
        self._recorder: GradientRecorder | None = None
        self._writer: ReportWriter | None = None

    @property
    def report_dir(self) -> Path | None:
        """The report folder, ``<trainer.log_dir>/gradflow`` (None before ``setup``)."""
        return self._writer.folder if self._writer is not None else None

    # ----- setup ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            rank_zero_warn(f"GradientFlowMonitor: under {strategy} parameter gradients are sharded, so layer "
                           "and total norms are those of rank 0's shard", category=GradientFlowWarning)
        if self._recorder is not None:
            self._recorder.taps.disarm()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        algorithm = trainer.gradient_clip_algorithm
        algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
        self._recorder = recorder = GradientRecorder.for_module(
            pl_module, self.skip_pattern, self.band_layer, self.every_n_steps, clip,
            clip is not None and algorithm == "value", self._add_event)
        if self.skip_pattern and not any(s.kind == "pattern" for s in recorder.taps.specs):
            rank_zero_warn(f"GradientFlowMonitor: skip_pattern {self.skip_pattern!r} matches no module of "
                           f"{type(pl_module).__name__}; check the module paths (print(model))",
                           category=GradientFlowWarning)
        self._events_diagnosed = 0
        self._armed_step: int | None = None
        self._loss: Tensor | None = None
        self._tiles: dict[int, list[tuple[Any, Any, Tensor | None]]] = {}
        self._images: tuple[int, Tensor] | None = None  # the current step's input images (until its end)
        self._snapshot_step: int | None = None
        self._warned: set[tuple[str, str]] = set()
        self._resumed = False
        self._can_resume = True  # until this fit's first step: load_state_dict may continue a series
        self.findings = []
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self._writer = ReportWriter(Path(log_dir or trainer.default_root_dir) / REPORT_DIR)
        datamodule = getattr(trainer, "datamodule", None)
        self._georef = scene_georeference(datamodule)
        channels = recorder.band[1].in_channels if recorder.band else 0
        names = getattr(datamodule, "band_names", None)
        if not (isinstance(names, (list, tuple)) and len(names) == channels and all(isinstance(n, str) for n in names)):
            names = default_band_names(channels)
        meta = {
            "model": type(pl_module).__name__,
            "precision": str(trainer.precision),
            "gradient_clip_val": clip,
            "gradient_clip_algorithm": algorithm if clip else None,
            "loss_scaler": self._scaler is not None,
            "world_size": trainer.world_size,
            "every_n_steps": self.every_n_steps,
            "step_check": self.step_check,
            "geobp_version": geobp.__version__,
        }
        self.data = new_document(
            meta, vars(self.thresholds), [{"name": x.name, "type": x.type, "numel": x.numel} for x in recorder.layers],
            recorder.band[0] if recorder.band else None,
            [{"name": s.name, "kind": s.kind, "source": s.source, "paths": list(s.paths)} for s in recorder.taps.specs],
            list(names), [{"name": x.name, "type": x.type, "numel": x.numel} for x in recorder.frozen])

    # ----- per batch -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.data is None or self._recorder is None:
            return
        step = trainer.global_step
        if isinstance(batch, Mapping) and ("scene" in batch or "window" in batch):
            image = batch.get("image")
            inputs = None
            if isinstance(image, Tensor) and image.ndim >= 3:
                tracker = self._recorder.tracker
                if tracker.started and tracker.mode == "deferred" and self.step_check != "off":
                    # an event may be found steps later: keep the summary (on the device, no sync)
                    inputs = input_max_abs(image)
                else:  # an event is found during this step: summarise the images only then
                    self._images = (step, image)
            self._tiles.setdefault(step, []).append((batch.get("scene"), batch.get("window"), inputs))
            if len(self._tiles) > 2 * RING_ROWS:  # recordings pruned nothing (no gradients?)
                del self._tiles[min(self._tiles)]
        taps = self._recorder.taps
        if step % self.every_n_steps == 0 and taps.specs and self._armed_step != step:
            taps.arm()
            self._armed_step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images = None
        # Hooks armed for a step that ended without a recording (no gradient reached the
        # optimizer hook) go once the step is over; a skipped batch keeps them for the next one.
        if self._recorder is not None and self._armed_step is not None and trainer.global_step > self._armed_step:
            self._recorder.taps.disarm()
            self._recorder.taps.collect()
            self._armed_step = None
        # The optimizer has stepped after a recording: measure how far the weights moved.
        if self._recorder is not None and self._snapshot_step is not None and trainer.global_step > self._snapshot_step:
            ratios = self._recorder.update_ratios()
            assert self.data is not None
            total = decode_float(self.data["total_norm"][-1]) if self.data["total_norm"] else math.nan
            set_update_ratio(self.data, self._snapshot_step, ratios if math.isfinite(total) else None)
            self._snapshot_step = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        recorder = self._recorder
        if self.data is None or recorder is None:
            return
        step = trainer.global_step
        planned = step % self.every_n_steps == 0
        if self.step_check == "off" and not planned:
            return
        present, grads = recorder.gradients()
        if not present:
            return
        self._can_resume = False
        if not recorder.tracker.started:
            mode = self.step_check
            if mode == "auto":
                mode = "sync" if grads[0].device.type == "cpu" or self._scaler is not None else "deferred"
            recorder.start(grads[0].device, "sync" if mode == "sync" else "deferred")
            self.data["meta"]["step_check"] = mode
        starts_bad_run = recorder.tracker.track(step, grads, present, self._scale)
        if not (planned or starts_bad_run):
            return
        mean = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None
        rec = recorder.record(step, present, grads, self._loss, self._scale,
                              bool(self._scaler and getattr(optimizer, "_step_supports_amp_scaling", False)),
                              mean, max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1))
        self._armed_step = None
        append_recording(self.data, rec)
        note_frozen(self.data, step, recorder.frozen_now())
        if planned:
            recorder.snapshot_weights()  # compared with the weights after this step's update
            self._snapshot_step = step
        thin(self.data, self.max_recordings)
        self._tiles = {s: t for s, t in self._tiles.items() if s > step}
        if trainer.is_global_zero:
            if self.log_to_logger and trainer.loggers:
                metrics = latest_scalars(self.data, recorder.clip is not None, self._scaler is not None)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
            # Diagnosis costs O(recordings x layers): after 50 recordings it runs on every
            # (recordings // 50)-th one, and on every new non-finite event, so its cost per
            # recording stays flat as the run grows.
            count = len(self.data["steps"])
            if len(self.data["nonfinite"]) > self._events_diagnosed or count <= 50 or count % (count // 50) == 0:
                self._events_diagnosed = len(self.data["nonfinite"])
                self._diagnose()

    def _scale(self) -> float | None:
        """The fp16 loss scale (a host read), or None without a scaler."""
        return float(self._scaler.get_scale()) if self._scaler is not None else None

    def _add_event(self, step: int, param_norms: list[float], scale: float | None) -> None:
        """Record a run of non-finite steps found by the tracker, from its first step's norms."""
        assert self.data is not None and self._recorder is not None
        bad, zero = self._recorder.layer_flags(param_norms)
        tiles = self._tiles.get(step)
        inputs = tiles[-1][2] if tiles else None
        if inputs is None and self._images is not None and self._images[0] == step:
            inputs = input_max_abs(self._images[1])
        append_nonfinite_event(self.data, step, [layer.name for layer in self._recorder.layers], bad, zero, scale,
                               tiles[-1][:2] if tiles else None, self._georef,
                               inputs.tolist() if inputs is not None else None)

    def _diagnose(self) -> None:
        assert self.data is not None
        self.findings = diagnose(self.data, self.thresholds)
        self.data["diagnoses"] = [f.to_dict() for f in self.findings]
        if not self.warn:
            return
        for f in self.findings:
            key = (f.kind, f.where)
            if key not in self._warned:
                self._warned.add(key)
                rank_zero_warn(
                    f"GradientFlowMonitor: {f.kind} at {f.where} (step {f.step}): {f.message}. Fix: {f.fix}.",
                    category=GradientFlowWarning)

    # ----- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run recorded so far, for a checkpoint (empty before ``setup``).

        Holds a copy of the document (series, metrics, events, diagnoses: bounded by
        ``max_recordings``), the step counters, and the findings already warned about. Steps
        still waiting on the device are counted first (one host read). It is saved under the
        class name (``state_key``), whatever the arguments, so a run resumed with another
        interval or thresholds still continues; hence one monitor per Trainer (two would also
        share one report folder).
        """
        if self.data is None or self._recorder is None:
            return {}
        tracker = self._recorder.tracker
        tracker.drain(self._scale())
        return {"data": copy_document(self.data), "counters": tracker.state_dict(),
                "warned": [list(k) for k in sorted(self._warned)], "events_diagnosed": self._events_diagnosed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the series of a checkpoint (Lightning calls it after ``setup`` when resuming).

        Ignored outside the start of a fit (e.g. ``trainer.test(ckpt_path=...)``). A series
        recorded on a different model (layers, skips or band layer) is not continued: a new one
        starts, with a warning.
        """
        if self.data is None or self._recorder is None or not self._can_resume or "data" not in state_dict:
            return
        why = layout_mismatch(state_dict["data"], self.data)
        if why is not None:
            rank_zero_warn(f"GradientFlowMonitor: the checkpoint's gradient-flow series is not continued: {why}; "
                           "a new series starts here", category=GradientFlowWarning)
            return
        self.data = continue_document(state_dict["data"], self.data)
        self._recorder.tracker.load_state_dict(state_dict["counters"])
        self._warned = {(str(kind), str(where)) for kind, where in state_dict["warned"]}
        self._events_diagnosed = int(state_dict["events_diagnosed"])
        self.findings = [Finding(**{**d, "value": decode_float(d["value"])}) for d in self.data["diagnoses"]]
        self._resumed = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed and self.data is not None:
            self.data["meta"].setdefault("resumed_at", []).append(trainer.global_step)
            self._resumed = False

    # ----- metrics and report ------------------------------------------------------------------------

    def _read_metrics(self, trainer: L.Trainer) -> None:
        """Append the trainer's callback metrics (called on every rank: reading may reduce)."""
        if self.data is not None:
            append_metrics(self.data, trainer.global_step, trainer.callback_metrics)

    def write(self, background: bool = False) -> tuple[Path, Path] | None:
        """Write ``gradflow.json`` and ``report.html`` now (see :meth:`ReportWriter.write`).

        Returns:
            ``(json_path, html_path)``, or None before ``setup``.
        """
        if self.data is None or self._writer is None:
            return None
        self._diagnose()
        return self._writer.write(self.data, background)

    def wait_for_report(self) -> None:
        """Wait for a report being rendered in the background, if any."""
        if self._writer is not None:
            self._writer.wait()

    def _maybe_write(self, trainer: L.Trainer, force: bool) -> None:
        if not (self.write_report and trainer.is_global_zero and self.data is not None and self._writer):
            return
        if not force and time.monotonic() - self._writer.last_write < self.report_every_s:
            return
        try:
            self.write(background=not force)
        except Exception as err:  # a report must never end a training run
            rank_zero_warn(f"GradientFlowMonitor: could not write the report to {self.report_dir} ({err!r})",
                           category=GradientFlowWarning)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.data is None or trainer.state.fn != "fit":
            return
        self._read_metrics(trainer)
        self._maybe_write(trainer, force=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_metrics(trainer)
        self._maybe_write(trainer, force=False)

    def _flush(self) -> None:
        """Count the steps after the last recording (and their non-finite event); set ``totals``."""
        if self.data is None or self._recorder is None or not self._recorder.tracker.started:
            return
        tracker = self._recorder.tracker
        tracker.drain(self._scale())
        clipping = self._recorder.clip is not None
        self.data["totals"] = {"steps_seen": tracker.steps_seen, "nonfinite_steps": tracker.nonfinite_steps,
                               "clipped_steps": tracker.clipped_steps if clipping else None}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._recorder is not None:
            self._recorder.taps.disarm()
        self._flush()
        self._read_metrics(trainer)
        if self.data is not None and trainer.is_global_zero:
            self._diagnose()
        self._maybe_write(trainer, force=True)
        if self.write_report and trainer.is_global_zero and self._writer is not None:
            rank_zero_info(f"GradientFlowMonitor: {len(self.findings)} finding(s); report at "
                           f"{self._writer.html_path}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._recorder is not None:
            self._recorder.taps.disarm()
        try:
            self._flush()
            if self.data is not None and trainer.is_global_zero:
                self._diagnose()
        except Exception:  # never mask the original exception
            pass
        self._maybe_write(trainer, force=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.taps.disarm()
            self._recorder.drop_snapshot()  # a weight copy whose step never ended (an exception)
        self._images = None
        self.wait_for_report()



def scene_georeference(datamodule: Any) -> dict[str, tuple[str | None, tuple[float, ...]]]:
    """Scene name to ``(crs, transform)`` from a data module's ``scenes``, or ``{}``.

    Reads ``scenes`` entries with ``name`` and ``image.crs``/``image.transform`` (a 6-number
    affine ``a, b, c, d, e, f``), as :class:`~geobp.data.datamodule.GeoTiffDataModule` holds them;
    anything else gives no georeference (tiles are then named by window only).
    """
    out: dict[str, tuple[str | None, tuple[float, ...]]] = {}
    for scene in getattr(datamodule, "scenes", None) or []:
        image = getattr(scene, "image", None)
        transform = getattr(image, "transform", None)
        name = getattr(scene, "name", None)
        try:
            values = tuple(float(v) for v in transform)[:6] if transform is not None else ()
        except (TypeError, ValueError):
            continue
        if isinstance(name, str) and len(values) == 6:
            crs = getattr(image, "crs", None)
            out[name] = (str(crs) if crs is not None else None, values)
    return out
