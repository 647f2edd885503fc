"""What the monitor measures from a model's gradients, per step and per recording.

A *recording* stores, with fused kernels and one device-to-host copy:

- per layer (module owning parameters): gradient L2 norm and max ``|grad|``;
- per input band: the norm of the first ``nn.Conv2d``'s ``weight.grad[:, b]``;
- per skip connection (torchvision ``BasicBlock``/``Bottleneck``, geobp U-Net
  ``SkipConnection`` modules, modules matching a pattern): the gradient reaching the block input
  through each path and their ratio (see :mod:`geobp.callbacks.skips`). The hooks that measure
  this are armed only for recording steps; other steps pay nothing for them;
- the total norm, whether the step was clipped, the loss scale under fp16 and the loss;
- per layer, the update ratio ``||w_after - w_before|| / ||w_before||`` of the recorded step's
  optimizer step: the weights are copied (one fused kernel) before that step only, compared
  after it and the copy dropped, so no copy is held between recordings.

Between recordings each step's per-parameter norms wait on the device
(:mod:`geobp.callbacks.steps`). A non-finite step is named by the first layer in backward order
(the one nearest the output, by module order) whose gradient is NaN/Inf; when every layer is
non-finite the loss was, and the forward pass is to blame.

Skip norms come from activation gradients, which DDP does not synchronize: they are the
root-mean-square over ranks. Under sharded strategies (FSDP, DeepSpeed) parameter norms are per
shard. With gradient accumulation, skip norms combine the micro-batches as a root-sum-square.
With several optimizers, each call measures every parameter holding a gradient.

:class:`GradientRecorder` knows nothing of Lightning: the caller passes in the step, the loss,
the loss scale and how to average over ranks, so a hand-written loop can drive it too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
import torch
from torch import Tensor, nn

from geobp.callbacks.measure import (
    Layer,
    band_norms,
    find_band_conv,
    find_frozen,
    find_layers,
    grad_max_abs,
    layer_reduce,
    update_ratios,
    weight_snapshot,
)
from geobp.callbacks.series import Recording
from geobp.callbacks.skips import SkipTaps, find_skips
from geobp.callbacks.steps import EventFn, StepTracker, TrackMode
from geobp.errors import ConfigError, format_error


class GradientRecorder:
    """Measures gradients per layer, input band and skip path.

    Args:
        layers: the layers, in module order (:func:`~geobp.callbacks.measure.find_layers`).
        params: the flat parameter list the layers index.
        band: ``(name, conv)`` of the convolution measured per input band, or None.
        taps: the skip-connection hooks (armed by the caller before the forward pass).
        rows: steps between recordings (the per-step ring's size; see
            :class:`~geobp.callbacks.steps.StepTracker`).
        clip: the gradient clipping threshold, or None.
        clip_by_value: whether clipping is by value (counted at recordings only) or by norm.
        on_event: called for each new run of non-finite steps the tracker finds.
        frozen: the modules frozen on purpose (``requires_grad=False``), listed, not measured.
    """

    def __init__(self, layers: list[Layer], params: list[nn.Parameter], band: tuple[str, nn.Conv2d] | None,
                 taps: SkipTaps, rows: int, clip: float | None, clip_by_value: bool, on_event: EventFn,
                 frozen: list[Layer] | None = None) -> None:
        self.layers, self.params, self.band, self.taps = layers, params, band, taps
        self.frozen = frozen or []
        self._snapshot: tuple[list[Tensor], Tensor] | None = None
        self.clip, self.clip_by_value = clip, clip_by_value
        self._layer_list = [j for j, layer in enumerate(layers) for _ in layer.params]
        self._layer_of_param = torch.tensor(self._layer_list)
        ids = {id(p): i for i, p in enumerate(params)}
        self._band_param = ids.get(id(band[1].weight)) if band else None
        self.tracker = StepTracker(len(params), rows, None if clip_by_value else clip, on_event)

    @classmethod
    def for_module(cls, root: nn.Module, skip_pattern: str | None, band_layer: str | None, rows: int,
                   clip: float | None, clip_by_value: bool, on_event: EventFn) -> GradientRecorder:
        """Find the layers, input-band convolution and skips of ``root`` and record them.

        Args:
            root: the model (a LightningModule included).
            skip_pattern: regex of further skip-carrying module paths (see
                :func:`~geobp.callbacks.skips.find_skips`), or None.
            band_layer: module path of the band convolution; None takes the first ``nn.Conv2d``.
            rows, clip, clip_by_value, on_event: as for the constructor.

        Raises:
            ConfigError: ``root`` has no trainable parameters, or ``band_layer`` is not one of
                its convolutions (the message lists the candidates).
        """
        name = type(root).__name__
        layers, params = find_layers(root)
        if not params:
            raise ConfigError(format_error(None, f"{name} has no trainable parameters to monitor",
                                           "remove GradientFlowMonitor from trainer.callbacks, or unfreeze the model"))
        try:
            band = find_band_conv(root, band_layer)
        except KeyError as err:
            raise ConfigError(format_error(
                None, f"band_layer: {err.args[0]}",
                "set GradientFlowMonitor band_layer to one of the candidates, or to null")) from err
        skips = find_skips(root, skip_pattern)
        return cls(layers, params, band, SkipTaps(root, skips), rows, clip, clip_by_value, on_event,
                   find_frozen(root))

    def frozen_now(self) -> list[str]:
        """The measured layers whose parameters are all frozen at the moment (a fine-tuning schedule)."""
        return [layer.name for layer in self.layers if not any(self.params[i].requires_grad for i in layer.params)]

    def gradients(self) -> tuple[list[int], list[Tensor]]:
        """``(present, grads)``: indices of the parameters holding a gradient, and those gradients."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        return present, [self.params[i].grad for i in present]

    def start(self, device: torch.device, mode: TrackMode) -> None:
        """Prepare the device buffers (at the first gradient)."""
        self.tracker.start(device, mode)
        self._layer_of_param = self._layer_of_param.to(device)

    def snapshot_weights(self) -> None:
        """Copy the weights before the optimizer step of a recording (see :meth:`update_ratios`)."""
        self._snapshot = weight_snapshot(self.params)

    def drop_snapshot(self) -> None:
        """Forget a snapshot whose optimizer step did not happen."""
        self._snapshot = None

    def update_ratios(self) -> list[float | None] | None:
        """Per layer, ``||dw|| / ||w||`` since :meth:`snapshot_weights` (one host read), or None without one.

        The snapshot is consumed. A layer whose weights were all zero gets None.
        """
        if self._snapshot is None:
            return None
        copies, norms = self._snapshot
        self._snapshot = None
        ratios = update_ratios(self.params, copies, norms, self._layer_of_param, len(self.layers)).tolist()
        return [v if math.isfinite(v) else None for v in ratios]

    def layer_flags(self, param_norms: list[float]) -> tuple[list[bool], list[bool]]:
        """Per layer, from per-parameter norms: ``(non-finite, zero)``."""
        bad = [any(not math.isfinite(param_norms[i]) for i in layer.params) for layer in self.layers]
        zero = [all(param_norms[i] == 0 for i in layer.params) for layer in self.layers]
        return bad, zero

    def record(self, step: int, present: list[int], grads: list[Tensor], loss: Tensor | None,
               scale: Callable[[], float | None], grads_scaled: bool,
               mean_over_ranks: Callable[[Tensor], Tensor] | None, accumulate: int) -> Recording:
        """Measure everything for one recording; call after :meth:`StepTracker.track` for this step.

        Args:
            step: the optimizer step.
            present, grads: from :meth:`gradients`.
            loss: the step's (last micro-batch's) loss, or None.
            scale: gives the fp16 loss scale (read after the host copy), or None without a scaler.
            grads_scaled: the gradients are still multiplied by the loss scale (optimizers that
                unscale inside ``step()``).
            mean_over_ranks: averages a tensor over ranks (skip norms come from activation
                gradients, which DDP does not synchronize), or None on one rank.
            accumulate: gradient accumulation steps (the loss is rescaled to a batch's).

        Returns:
            The recording; the tracker's counters include this step.
        """
        tracker = self.tracker
        vec = tracker.latest()
        device = vec.device
        num_layers, num_params = len(self.layers), len(self.params)
        maxabs = grad_max_abs(grads).to(device)
        if len(present) < num_params:
            maxabs = torch.zeros(num_params, device=device).index_copy_(0, tracker.index(present, device), maxabs)
        layer_norm, layer_max = layer_reduce(vec, maxabs, self._layer_of_param, num_layers)
        band_grad = self.params[self._band_param].grad if self._band_param is not None else None
        bands = band_norms(band_grad).to(device) if band_grad is not None else torch.zeros(0, device=device)
        self.taps.disarm()
        skips = self.taps.collect()
        num_skips = len(self.taps.specs)
        if skips is not None and mean_over_ranks is not None:
            sq = mean_over_ranks(torch.where(skips < 0, torch.nan, skips.square()))
            skips = torch.where(torch.isnan(sq), -1.0, sq.sqrt())
        empty = torch.zeros(0, device=device)
        loss_t = loss.float().reshape(-1)[:1].to(device) if loss is not None else empty
        pieces = [*tracker.pieces(), layer_norm, layer_max, bands,
                  skips.flatten().to(device) if skips is not None else empty, loss_t]
        values = iter(torch.cat([p.to(torch.float64) for p in pieces]).tolist())  # the one host sync
        loss_scale = scale()  # the queue is drained: no further wait
        total = tracker.consume(values, loss_scale)

        def take(n: int) -> list[float]:
            return list(itertools.islice(values, n))

        l_norm, l_max, band_vals = take(num_layers), take(num_layers), take(bands.numel())
        skip_vals = take(2 * num_skips if skips is not None else 0)
        loss_v = take(loss_t.numel())
        divisor = loss_scale if loss_scale else 1.0
        if loss_scale and grads_scaled:
            l_norm = [v / loss_scale for v in l_norm]
            l_max = [v / loss_scale for v in l_max]
            band_vals = [v / loss_scale for v in band_vals]
            total /= loss_scale
        over = self.clip is not None and (max(l_max) if self.clip_by_value else total) > self.clip
        if over and self.clip_by_value:
            tracker.clipped_steps += 1  # value clipping is counted on recorded steps only
        has_grad = [False] * num_layers
        for i in present:
            has_grad[self._layer_list[i]] = True
        skip_norms: list[tuple[float | None, float | None]] = []
        for k in range(num_skips):
            a, b = (skip_vals[2 * k] / divisor, skip_vals[2 * k + 1] / divisor) if skip_vals else (-1.0, -1.0)
            skip_norms.append((None if a < 0 else a, None if b < 0 else b))
        return Recording(
            step=step,
            layer_norm=[v if h else None for v, h in zip(l_norm, has_grad)],
            layer_max_abs=[v if h else None for v, h in zip(l_max, has_grad)],
            total_norm=total,
            clipped=over if self.clip is not None else None,
            steps_seen=tracker.steps_seen,
            clipped_steps=tracker.clipped_steps if self.clip is not None else None,
            nonfinite_steps=tracker.nonfinite_steps,
            loss_scale=loss_scale,
            loss=loss_v[0] * accumulate / divisor if loss_v else None,
            band_norm=band_vals or None,
            skip_norms=skip_norms,
        )
