"""``GradientFlowMonitor``: gradient flow per layer, skip connection and input band, with diagnosis."""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

import geobp
from geobp.callbacks.diagnosis import GradientFlowWarning, Thresholds, diagnose, encode_float
from geobp.callbacks.measure import band_norms, find_band_conv, find_layers, grad_max_abs, layer_reduce
from geobp.callbacks.report import (
    HTML_NAME,
    JSON_NAME,
    REPORT_DIR,
    SCHEMA,
    SCHEMA_VERSION,
    atomic_write_text,
    render_html,
    write_json,
)
from geobp.callbacks.skips import SkipTaps, find_skips
from geobp.errors import ConfigError, format_error

StepCheck = Literal["auto", "sync", "deferred", "off"]

#: Non-finite steps kept in full in the JSON (all are counted).
MAX_EVENTS = 100
#: Most steps whose per-parameter norms wait on the device for the next host read.
RING_ROWS = 256


class GradientFlowMonitor(L.Callback):
    """Measure gradient flow during training, diagnose it, and write a report per run.

    Works on any LightningModule. Measurements are taken in ``on_before_optimizer_step``, where
    Lightning hands over gradients that are unscaled (AMP) and not yet clipped, and, under DDP,
    already averaged across ranks. Every ``every_n_steps`` optimizer steps (step 0 included) a
    *recording* stores, with fused kernels and one device-to-host copy:

    - per layer (module owning parameters): gradient L2 norm and max ``|grad|``;
    - per input band: the norm of the first ``nn.Conv2d``'s ``weight.grad[:, b]``;
    - per skip connection (torchvision ``BasicBlock``/``Bottleneck``, geobp U-Net
      ``SkipConnection`` modules, modules matching ``skip_pattern``): the gradient reaching the
      block input through each path and their ratio (see :mod:`geobp.callbacks.skips`). The
      hooks that measure this exist only during recording steps; other steps pay nothing;
    - the total norm, the clip threshold and whether the step was clipped, the loss scale
      under fp16 and the training loss.

    Between recordings, ``step_check`` decides what is done on each step:

    - ``deferred``: the per-parameter gradient norms (one fused ``torch._foreach_norm``) are
      written into a row of a small device buffer: two kernels, no host sync. The next
      recording reads all rows at once: the number of clipped and non-finite steps, and the
      first step of each run of non-finite steps with its per-layer norms, so that step is
      reported with its layer and its batch's tiles even though it was not recorded, up to
      ``every_n_steps - 1`` steps late (without a loss scaler the weights are NaN by then
      anyway). The buffer holds at most 256 steps; recordings further apart also read it
      whenever it fills.
    - ``sync``: the same, plus one host read per step of the step's finiteness, so a non-finite
      step (the first of a run of them) is recorded in full at once. Free on CPU, and nearly so
      under fp16, whose loss scaler already syncs on every step.
    - ``auto`` (default): ``sync`` on CPU or with a loss scaler, else ``deferred``.
    - ``off``: nothing between recordings (clip and non-finite counts cover recorded steps only).

    With ``gradient_clip_algorithm="value"`` clipping is counted on recorded steps only.

    A non-finite recording names the first layer in backward order (the one nearest the
    output, by module order) whose gradient is NaN/Inf; when every layer is non-finite the loss
    was, and the forward pass is to blame. It also names the tiles of the step's batch when the
    batch is a dict with ``scene`` and ``window`` (geobp's batch contract). Under DDP these are
    rank 0's tiles.

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

    Skip norms come from activation gradients, which DDP does not synchronize: they are the
    root-mean-square over ranks. Under sharded strategies (FSDP, DeepSpeed) parameter norms
    are per shard. With gradient accumulation, skip norms combine the micro-batches as a
    root-sum-square. Several optimizers: each call measures every parameter holding a gradient.

    Args:
        every_n_steps: optimizer steps between recordings. A recording of a ResNet-18 U-Net
            costs about 6.5 ms on an H100 (25 ms steps at 16x6x256x256) and about 40 ms on a
            2-core CPU, so 25 spreads it to about 1% of step time; the per-step check adds
            one fused norm over all gradients (see ``tests/callbacks/bench_gradflow_overhead.py``).
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

    Raises:
        ConfigError: an argument is out of range or ``skip_pattern`` is not a valid regex;
            in ``setup``, a model without trainable parameters or a ``band_layer`` that is not
            a convolution of the model.
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        thresholds: Thresholds | None = None,
        skip_pattern: str | None = None,
        band_layer: str | None = None,
        step_check: StepCheck = "auto",
        log_to_logger: bool = True,
        write_report: bool = True,
        report_every_s: float = 300.0,
        warn: bool = True,
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
        if not report_every_s >= 0:
            raise ConfigError(format_error(None, f"report_every_s must be >= 0 (found {report_every_s!r})",
                                           "set GradientFlowMonitor report_every_s to e.g. 300"))
        self.every_n_steps = every_n_steps
        self.thresholds = thresholds or Thresholds()
        self.skip_pattern = skip_pattern
        self.band_layer = band_layer
        self.step_check: StepCheck = step_check
        self.log_to_logger = log_to_logger
        self.write_report = write_report
        self.report_every_s = float(report_every_s)
        self.warn = warn
        self.data: dict[str, Any] | None = None  # the gradflow document being recorded
        self.findings: list = []  # latest diagnosis
        self.report_dir: Path | None = None
        self._taps: SkipTaps | None = None
        self._render_thread: threading.Thread | None = None
        self._render_error: Exception | None = None

    # ----- setup ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers, params = find_layers(pl_module)
        if not params:
            raise ConfigError(format_error(None, f"{type(pl_module).__name__} has no trainable parameters to monitor",
                                           "remove GradientFlowMonitor from trainer.callbacks, or unfreeze the model"))
        try:
            band = find_band_conv(pl_module, self.band_layer)
        except KeyError as err:
            raise ConfigError(format_error(
                None, f"band_layer: {err.args[0]}",
                "set GradientFlowMonitor band_layer to one of the candidates, or to null")) from err
        skips = find_skips(pl_module, self.skip_pattern)
        if self.skip_pattern and not any(s.kind == "pattern" for s in skips):
            rank_zero_warn(f"GradientFlowMonitor: skip_pattern {self.skip_pattern!r} matches no module of "
                           f"{type(pl_module).__name__}; check the module paths (print(model))",
                           category=GradientFlowWarning)
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            rank_zero_warn(f"GradientFlowMonitor: under {strategy} parameter gradients are sharded, so layer "
                           "and total norms are those of rank 0's shard", category=GradientFlowWarning)
        self._layers, self._params = layers, params
        self._layer_list = [j for j, layer in enumerate(layers) for _ in layer.params]
        self._layer_of_param = torch.tensor(self._layer_list)
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        ids = {id(p): i for i, p in enumerate(params)}
        self._band = band
        self._band_param = ids.get(id(band[1].weight)) if band else None
        if self._taps is not None:
            self._taps.disarm()
        self._taps = SkipTaps(pl_module, skips)
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        clip = trainer.gradient_clip_val
        self._clip = float(clip) if clip else None
        algorithm = trainer.gradient_clip_algorithm
        algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
        self._clip_by_value = self._clip is not None and algorithm == "value"
        self._mode: StepCheck = self.step_check
        self._ring: Tensor | None = None
        self._ring_steps: list[int] = []
        self._steps_seen = self._nonfinite_steps = self._clipped_steps = 0
        self._events_diagnosed = 0
        self._last_bad = False  # sync mode: whether the previous step was non-finite
        self._window_ended_bad = False  # whether the last step of the previous ring window was
        self._armed_step: int | None = None
        self._loss: Tensor | None = None
        self._tiles: dict[int, list[tuple[Any, Any]]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._last_write = -math.inf
        self.findings = []
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self.report_dir = Path(log_dir or trainer.default_root_dir) / REPORT_DIR
        self.data = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "meta": {
                "model": type(pl_module).__name__,
                "precision": str(trainer.precision),
                "gradient_clip_val": self._clip,
                "gradient_clip_algorithm": algorithm if self._clip else None,
                "loss_scaler": self._scaler is not None,
                "world_size": trainer.world_size,
                "every_n_steps": self.every_n_steps,
                "step_check": self.step_check,
                "geobp_version": geobp.__version__,
            },
            "thresholds": dict(vars(self.thresholds)),
            "layers": [{"name": x.name, "type": x.type, "numel": x.numel} for x in layers],
            "steps": [], "layer_norm": [], "layer_max_abs": [], "total_norm": [], "clipped": [],
            "steps_seen": [], "clipped_steps": [], "nonfinite_steps": [], "loss_scale": [], "loss": [],
            "bands": {"layer": band[0], "norm": []} if band else None,
            "skips": [{"name": s.name, "kind": s.kind, "source": s.source, "paths": list(s.paths),
                       "norms": [], "ratio": []} for s in skips],
            "metrics": {},
            "nonfinite": [],
            "diagnoses": [],
        }

    # ----- per batch -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.data is None or self._taps is None:
            return
        step = trainer.global_step
        if isinstance(batch, Mapping) and ("scene" in batch or "window" in batch):
            self._tiles.setdefault(step, []).append((batch.get("scene"), batch.get("window")))
            if len(self._tiles) > 2 * RING_ROWS:  # recordings pruned nothing (no gradients?)
                del self._tiles[min(self._tiles)]
        if step % self.every_n_steps == 0 and self._taps.specs and self._armed_step != step:
            self._taps.arm()
            self._armed_step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Hooks armed for a step that ended without a recording (no gradient reached the
        # optimizer hook) go once the step is over; a skipped batch keeps them for the next one.
        if self._taps is not None and self._armed_step is not None and trainer.global_step > self._armed_step:
            self._taps.disarm()
            self._taps.collect()
            self._armed_step = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.data is None:
            return
        step = trainer.global_step
        planned = step % self.every_n_steps == 0
        if self._mode == "off" and not planned:
            return
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return
        grads = [self._params[i].grad for i in present]
        if self._ring is None:
            self._start(grads[0].device)
        assert self._ring is not None
        if len(self._ring_steps) == len(self._ring):  # recordings far apart, or a planned one missed
            self._consume_ring(iter(torch.cat(self._ring_pieces()).tolist()), None)
        # The per-step work: one fused norm per parameter, written into the ring (2 kernels).
        row = self._ring[len(self._ring_steps)]
        norms = torch._foreach_norm(grads)
        if len(present) == len(self._params):
            torch.stack(norms, out=row)
        else:
            row.zero_().index_copy_(0, self._index(present, row.device), torch.stack(norms).to(row.dtype))
        self._ring_steps.append(step)
        record = planned
        if self._mode == "sync":
            bad = not bool(torch.isfinite(torch.linalg.vector_norm(row)))  # the one host read per step
            record = planned or (bad and not self._last_bad)
            self._last_bad = bad
        if record:
            self._record(trainer, step, grads, present, optimizer)

    # ----- recording -------------------------------------------------------------------------------

    def _start(self, device: torch.device) -> None:
        if self._mode == "auto":
            self._mode = "sync" if device.type == "cpu" or self._scaler is not None else "deferred"
        self._layer_of_param = self._layer_of_param.to(device)
        # One row of per-parameter norms per step since the last recording; with recordings more
        # than RING_ROWS steps apart the ring is also read (one host copy) each time it is full.
        self._ring = torch.zeros(min(self.every_n_steps, RING_ROWS), len(self._params), device=device)
        assert self.data is not None
        self.data["meta"]["step_check"] = self._mode

    def _index(self, present: list[int], device: torch.device) -> Tensor:
        """Device index of the parameters that hold a gradient (cached: the set rarely changes)."""
        key = tuple(present)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 8:
                self._index_cache.clear()
            index = self._index_cache[key] = torch.tensor(present, device=device)
        return index

    def _ring_pieces(self) -> list[Tensor]:
        """Summaries of the ring's rows, float64, for one host read (see ``_consume_ring``)."""
        assert self._ring is not None
        rows = self._ring[: len(self._ring_steps)]
        totals = torch.linalg.vector_norm(rows, dim=1)
        bad = ~torch.isfinite(totals)
        if self._clip is not None and not self._clip_by_value:
            clipped = (totals > self._clip).sum()
        else:
            clipped = torch.zeros((), device=rows.device)
        # A non-finite event is the first step of a run of non-finite steps (a NaN that reached the
        # weights makes every later step non-finite too: one event, not one per window).
        before = bad.roll(1, 0)
        before[0] = self._window_ended_bad
        starts = bad & ~before
        first = starts.to(torch.int32).argmax().reshape(1)  # index_select, not rows[first]: no host sync
        pieces = [totals[-1:], bad.sum().reshape(1), clipped.reshape(1), starts.any().reshape(1), first,
                  bad[-1:], rows.index_select(0, first).reshape(-1)]
        return [p.to(torch.float64) for p in pieces]

    def _consume_ring(self, values: Iterator[float], scale: float | None) -> float:
        """Update the step counters and non-finite events from ``_ring_pieces`` values; empty the ring.

        Returns:
            The total norm of the latest step.
        """
        total, n_bad, n_clip, any_start, first, ended_bad = itertools.islice(values, 6)
        snapshot = list(itertools.islice(values, len(self._params)))
        self._steps_seen += len(self._ring_steps)
        self._nonfinite_steps += int(n_bad)
        self._clipped_steps += int(n_clip)
        self._window_ended_bad = bool(ended_bad)
        if any_start:
            self._add_event(self._ring_steps[int(first)], snapshot, scale)
        self._ring_steps = []
        return total

    def _record(self, trainer: L.Trainer, step: int, grads: list[Tensor], present: list[int],
                optimizer: Any) -> None:
        assert self.data is not None and self._ring is not None and self._taps is not None
        device = self._ring.device
        num_layers, num_params = len(self._layers), len(self._params)
        vec = self._ring[len(self._ring_steps) - 1]
        maxabs = grad_max_abs(grads).to(device)
        if len(present) < num_params:
            maxabs = torch.zeros(num_params, device=device).index_copy_(0, self._index(present, device), maxabs)
        layer_norm, layer_max = layer_reduce(vec, maxabs, self._layer_of_param, num_layers)
        band_grad = self._params[self._band_param].grad if self._band_param is not None else None
        bands = band_norms(band_grad).to(device) if band_grad is not None else torch.zeros(0, device=device)
        self._taps.disarm()
        skips = self._taps.collect()
        self._armed_step = None
        num_skips = len(self._taps.specs)
        if skips is not None and trainer.world_size > 1:
            sq = torch.where(skips < 0, torch.nan, skips.square())
            sq = trainer.strategy.reduce(sq, reduce_op="mean")
            skips = torch.where(torch.isnan(sq), -1.0, sq.sqrt())
        has_skips = skips is not None
        empty = torch.zeros(0, device=device)
        loss = self._loss.float().reshape(-1)[:1].to(device) if self._loss is not None else empty
        pieces = [*self._ring_pieces(), layer_norm, layer_max, bands,
                  skips.flatten().to(device) if has_skips else empty, loss]
        values = iter(torch.cat([p.to(torch.float64) for p in pieces]).tolist())  # the one host sync
        scale = float(self._scaler.get_scale()) if self._scaler is not None else None  # queue already drained
        total_v = self._consume_ring(values, scale)

        def take(n: int) -> list[float]:
            return list(itertools.islice(values, n))

        l_norm, l_max, band_vals = take(num_layers), take(num_layers), take(bands.numel())
        skip_vals = take(2 * num_skips if has_skips else 0)
        loss_v = take(loss.numel())
        divisor = scale if scale else 1.0
        if scale and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Optimizers that unscale inside step() hand over scaled gradients.
            l_norm = [v / scale for v in l_norm]
            l_max = [v / scale for v in l_max]
            band_vals = [v / scale for v in band_vals]
            total_v /= scale
        over = self._clip is not None and (max(l_max) if self._clip_by_value else total_v) > self._clip
        if over and self._clip_by_value:
            self._clipped_steps += 1  # value clipping is counted on recorded steps only
        has_grad = [False] * num_layers
        for i in present:
            has_grad[self._layer_list[i]] = True
        d = self.data
        d["steps"].append(step)
        d["layer_norm"].append([encode_float(v) if h else None for v, h in zip(l_norm, has_grad)])
        d["layer_max_abs"].append([encode_float(v) if h else None for v, h in zip(l_max, has_grad)])
        d["total_norm"].append(encode_float(total_v))
        d["clipped"].append(over if self._clip is not None else None)
        d["steps_seen"].append(self._steps_seen)
        d["clipped_steps"].append(self._clipped_steps if self._clip is not None else None)
        d["nonfinite_steps"].append(self._nonfinite_steps)
        d["loss_scale"].append(scale)
        accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        d["loss"].append(encode_float(loss_v[0] * accumulate / divisor) if loss_v else None)
        if d["bands"] is not None:
            d["bands"]["norm"].append([encode_float(v) for v in band_vals] if band_vals else None)
        for k, entry in enumerate(d["skips"]):
            a, b = (skip_vals[2 * k] / divisor, skip_vals[2 * k + 1] / divisor) if has_skips else (-1.0, -1.0)
            a_v, b_v = (None if a < 0 else a), (None if b < 0 else b)
            entry["norms"].append([encode_float(a_v), encode_float(b_v)])
            ratio = a_v / b_v if a_v is not None and b_v not in (None, 0.0) else None
            entry["ratio"].append(encode_float(ratio))
        self._tiles = {s: t for s, t in self._tiles.items() if s > step}
        if trainer.is_global_zero:
            if self.log_to_logger and trainer.loggers:
                self._log(trainer, step)
            # Diagnosis costs O(recordings x layers): after 50 recordings it runs on every
            # (recordings // 50)-th one, and on every new non-finite event, so its cost per
            # recording stays flat as the run grows.
            count = len(d["steps"])
            if len(d["nonfinite"]) > self._events_diagnosed or count <= 50 or count % (count // 50) == 0:
                self._events_diagnosed = len(d["nonfinite"])
                self._diagnose()

    def _add_event(self, step: int, param_norms: list[float], scale: float | None) -> None:
        assert self.data is not None
        layer_bad = [any(not math.isfinite(param_norms[i]) for i in layer.params) for layer in self._layers]
        layer_zero = [all(param_norms[i] == 0 for i in layer.params) for layer in self._layers]
        bad_names = [layer.name for layer, b in zip(self._layers, layer_bad) if b]
        if len(self.data["nonfinite"]) >= MAX_EVENTS or not bad_names:
            return
        scenes, windows = None, None
        tiles = self._tiles.get(step)
        if tiles:
            scene, window = tiles[-1]
            if scene is not None:
                scenes = [str(s) for s in (scene if isinstance(scene, (list, tuple)) else [scene])]
            if window is not None:
                windows = window.tolist() if isinstance(window, Tensor) else [list(w) for w in window]
        self.data["nonfinite"].append({
            "step": step,
            "layer": bad_names[-1],  # nearest the output: backward visits it first
            "all_layers": all(b or z for b, z in zip(layer_bad, layer_zero)),  # zero: no gradient
            "nonfinite_layers": len(bad_names),
            "loss_scale": scale,
            "scenes": scenes,
            "windows": windows,
        })

    def _log(self, trainer: L.Trainer, step: int) -> None:
        assert self.data is not None
        d = self.data

        def last(key: str) -> float:
            v = d[key][-1]
            return math.nan if v is None else float(v)

        metrics: dict[str, float] = {"gradflow/total_norm": last("total_norm"),
                                     "gradflow/nonfinite_steps": last("nonfinite_steps")}
        ratio = _early_head_ratio(d)
        if ratio is not None:
            metrics["gradflow/early_head_ratio"] = ratio
        if self._clip is not None:
            metrics["gradflow/clip_fraction"] = last("clipped_steps") / max(self._steps_seen, 1)
        if self._scaler is not None:
            metrics["gradflow/loss_scale"] = last("loss_scale")
            metrics["gradflow/skipped_steps"] = last("nonfinite_steps")
        for entry in d["skips"]:
            if entry["ratio"][-1] is not None:
                metrics[f"gradflow/skip_ratio/{entry['name']}"] = float(entry["ratio"][-1])
        if d["bands"] is not None and d["bands"]["norm"][-1] is not None:
            for b, v in enumerate(d["bands"]["norm"][-1]):
                metrics[f"gradflow/band_norm/{b}"] = float(v)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

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

    # ----- metrics and report ------------------------------------------------------------------------

    def _read_metrics(self, trainer: L.Trainer) -> None:
        """Append the trainer's callback metrics (called on every rank: reading may reduce)."""
        if self.data is None:
            return
        step = trainer.global_step
        for name, value in trainer.callback_metrics.items():
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
            series = self.data["metrics"].setdefault(name, [])
            if series and series[-1][0] == step:
                series[-1][1] = encode_float(v)
            else:
                series.append([step, encode_float(v)])

    def write(self, background: bool = False) -> tuple[Path, Path] | None:
        """Write ``gradflow.json`` and ``report.html`` now (each atomically); None before ``setup``.

        Args:
            background: render the page in a thread from a snapshot of the data, so training
                goes on meanwhile (rendering takes a few seconds); the JSON is written at once.
                If the previous rendering is still running, this one is skipped.

        Returns:
            ``(json_path, html_path)``.
        """
        if self.data is None or self.report_dir is None:
            return None
        self._diagnose()
        json_path = write_json(self.data, self.report_dir / JSON_NAME)
        html_path = self.report_dir / HTML_NAME
        self._last_write = time.monotonic()
        if not background:
            self.wait_for_report()
            atomic_write_text(html_path, render_html(self.data))
        elif self._render_thread is None or not self._render_thread.is_alive():
            snapshot = json.loads(json_path.read_text(encoding="utf-8"))
            self._render_thread = threading.Thread(target=self._render, args=(snapshot, html_path),
                                                   name="gradflow-report", daemon=True)
            self._render_thread.start()
        return json_path, html_path

    def _render(self, data: dict[str, Any], html_path: Path) -> None:
        try:
            atomic_write_text(html_path, render_html(data))
        except Exception as err:  # reported by the next write
            self._render_error = err

    def wait_for_report(self) -> None:
        """Wait for a report being rendered in the background, if any."""
        if self._render_thread is not None:
            self._render_thread.join()
            self._render_thread = None

    def _maybe_write(self, trainer: L.Trainer, force: bool) -> None:
        if not (self.write_report and trainer.is_global_zero and self.data is not None):
            return
        if not force and time.monotonic() - self._last_write < self.report_every_s:
            return
        try:
            self.write(background=not force)
            if self._render_error is not None:
                err, self._render_error = self._render_error, None
                raise err
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
        if self.data is None or self._ring is None:
            return
        if self._ring_steps:
            scale = float(self._scaler.get_scale()) if self._scaler is not None else None
            self._consume_ring(iter(torch.cat(self._ring_pieces()).tolist()), scale)
        self.data["totals"] = {"steps_seen": self._steps_seen, "nonfinite_steps": self._nonfinite_steps,
                               "clipped_steps": self._clipped_steps if self._clip is not None else None}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._taps is not None:
            self._taps.disarm()
        self._flush()
        self._read_metrics(trainer)
        if self.data is not None and trainer.is_global_zero:
            self._diagnose()
        self._maybe_write(trainer, force=True)
        if self.write_report and trainer.is_global_zero and self.report_dir is not None:
            rank_zero_info(f"GradientFlowMonitor: {len(self.findings)} finding(s); report at "
                           f"{self.report_dir / HTML_NAME}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._taps is not None:
            self._taps.disarm()
        try:
            self._flush()
            if self.data is not None and trainer.is_global_zero:
                self._diagnose()
        except Exception:  # never mask the original exception
            pass
        self._maybe_write(trainer, force=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._taps is not None:
            self._taps.disarm()
        self.wait_for_report()


def _early_head_ratio(data: Mapping[str, Any]) -> float | None:
    """RMS gradient of the first tenth of the layers over that of the last tenth (medians)."""
    layers = data["layers"]
    row = data["layer_norm"][-1]
    k = max(1, len(layers) // 10)
    if len(layers) < 2:
        return None

    def rms(j: int) -> float:
        v = row[j]
        return math.nan if v is None else float(v) / math.sqrt(max(layers[j]["numel"], 1))

    early = sorted(rms(j) for j in range(k))[k // 2]
    head = sorted(rms(j) for j in range(len(layers) - k, len(layers)))[k // 2]
    if not (math.isfinite(early) and math.isfinite(head)) or head == 0:
        return None
    return early / head
