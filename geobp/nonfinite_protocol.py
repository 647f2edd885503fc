"""The non-finite step protocol: what a training step does when some rank cannot train on its batch.

A batch is unusable when its loss is NaN/Inf (``model.nonfinite``) or all its tiles failed to
read (``data.on_read_error: skip``). On the host path the ranks agree on one flag (one
all-reduce under DDP; the check is one device-to-host sync per step, none with
``nonfinite: ignore``), and on a skip every rank returns :func:`zero_loss`, so DDP's gradient
all-reduce still pairs up; :meth:`NonFiniteProtocol.drop_gradients` then drops the gradients,
the optimizer updates nothing and the loss scaler of ``16-mixed`` is restored to its state
before the step (:meth:`NonFiniteProtocol.after_optimizer_step`). Lightning's own skip
(returning None from ``training_step``) is refused under DDP, hence this protocol.

Where it applies (:func:`geobp.nonfinite.applies`), ``skip`` is decided on the device instead
(:class:`geobp.nonfinite.DeviceSkip`): no host read per step, the skipped steps are counted on
the device and read once per epoch.

The protocol keeps its own state (:class:`NonFiniteProtocol`); the LightningModule calls it from
its hooks and passes itself in (for ``log``, ``all_gather``, its parameters and its trainer).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from geobp.errors import NonFiniteError, format_error
from geobp.nonfinite import DeviceSkip, applies as device_skip_applies

NonFiniteMode = Literal["skip", "stop", "ignore"]


class NonFiniteProtocol:
    """The state of ``model.nonfinite`` over a run: steps skipped, the step being skipped, the device skip.

    Args:
        mode: ``skip`` (count and skip the step), ``stop`` (raise :class:`NonFiniteError`
            naming the step, its tiles and the first module whose output went non-finite) or
            ``ignore`` (no check).
        ignore_index: the label whose pixels count nowhere (a device-skipped step's pixels get it).

    Attributes:
        steps: optimizer steps skipped so far (read from the device at epoch ends there).
        skipping: True between a skipped step's ``training_step`` and its optimizer step.
        device_skip: the device decision, when it applies to this run (from ``on_train_start``).
    """

    def __init__(self, mode: NonFiniteMode, ignore_index: int) -> None:
        self.mode = mode
        self.ignore_index = ignore_index
        self.steps = 0
        self.skipping = False
        self.device_skip: DeviceSkip | None = None
        self._scaler_state: dict[str, Any] | None = None
        self._bad_loss = float("nan")

    # ----- inside the shared step ---------------------------------------------------------------

    def host_rejects(self, loss: Tensor) -> bool:
        """Whether a training loss is refused on the host (not finite, and ``mode`` is not ``ignore``).

        One device-to-host read; the refused value is kept for the messages.
        """
        if self.mode == "ignore" or bool(torch.isfinite(loss)):
            return False
        self._bad_loss = float(loss.detach())
        return True

    def mask_on_device(self, module: L.LightningModule, loss: Tensor, mask: Tensor,
                       value: Tensor) -> tuple[Tensor, Tensor]:
        """Decide on the device: a non-finite step's pixels become ``ignore_index`` and its loss 0
        (so they count nowhere), and the fused AdamW skips its update; logs the device count.

        Returns:
            ``(mask, value)`` for the metrics and the loss mean.
        """
        assert self.device_skip is not None
        bad = self.device_skip.decide(loss)
        mask = torch.where(bad, self.ignore_index, mask)
        value = torch.where(bad, 0.0, value)
        module.log("train/nonfinite_steps", self.device_skip.count.float(), on_step=True, on_epoch=False)
        return mask, value

    # ----- training_step -------------------------------------------------------------------------

    def training_loss(self, module: L.LightningModule, trainer: L.Trainer | None, batch: dict[str, Any],
                      loss: Tensor | None) -> Tensor | None:
        """The loss ``training_step`` returns: ``loss``, or on a step some rank cannot train on,
        a zero loss every rank returns (see the module docstring).

        Args:
            module: the LightningModule.
            trainer: its trainer, or None for a bare call (nothing to agree with).
            batch: the step's batch.
            loss: the shared step's loss; None when this rank's batch is unusable.

        Raises:
            NonFiniteError: under ``stop``, when the loss of some rank is not finite.
        """
        if loss is not None and self.device_skip is not None:
            return loss  # decided on the device
        unusable = loss is None
        if trainer is None or (self.mode == "ignore" and trainer.world_size == 1 and not unusable):
            return loss  # (a bare call, as in tests: nothing to agree with)
        if not trainer.strategy.reduce_boolean_decision(unusable, all=False):
            return loss
        return self._skip_step(module, trainer, batch, local_nonfinite="image" in batch and unusable)

    def _skip_step(self, module: L.LightningModule, trainer: L.Trainer, batch: dict[str, Any],
                   local_nonfinite: bool) -> Tensor:
        """Count and report a step some rank cannot train on (or stop, under ``nonfinite: stop``)."""
        flags = module.all_gather(torch.tensor(local_nonfinite, device=module.device)).reshape(-1).tolist()
        nonfinite_anywhere = any(flags)
        if nonfinite_anywhere:
            self.steps += 1
            module.log("train/nonfinite_steps", float(self.steps), on_step=True, on_epoch=False)
        if nonfinite_anywhere and self.mode == "stop":
            if not local_nonfinite:
                raise NonFiniteError(format_error(
                    None, f"step {trainer.global_step}: training loss is not finite on another process (rank)",
                    "see that rank's error; lower model.lr, set trainer.gradient_clip_val, or set model.nonfinite: skip"))
            where = first_nonfinite_module(getattr(module, "model", module), batch["image"])
            raise NonFiniteError(
                format_error(
                    None,
                    f"step {trainer.global_step}: training loss is {self._bad_loss} on tiles {describe_tiles(batch)}; "
                    f"first non-finite output: {where or 'none in forward (inputs or loss)'}",
                    "check those tiles with `geobp check`, lower model.lr, set trainer.gradient_clip_val, "
                    "or set model.nonfinite: skip; see the gradient-flow report of the run",
                )
            )
        # one warning a run, from the lowest rank affected
        if nonfinite_anywhere and self.steps == 1 and flags.index(True) == trainer.global_rank:
            rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
            warnings.warn(
                f"{rank}step {trainer.global_step}: loss is {self._bad_loss}; step skipped ({describe_tiles(batch)}). "
                "Later skips are counted in train/nonfinite_steps, not warned again",
                UserWarning, stacklevel=3,
            )
        self.skipping = True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler_state = scaler.state_dict() if scaler is not None else None
        return zero_loss(module)

    # ----- hooks after the step ------------------------------------------------------------------

    def drop_gradients(self, module: torch.nn.Module) -> None:
        """``on_after_backward``: on a skipped step (gradients all-reduced by now under DDP) the
        optimizer gets no gradient, so AdamW leaves every parameter and its moments as they are."""
        if self.skipping:
            for p in module.parameters():
                p.grad = None

    def after_optimizer_step(self, trainer: L.Trainer) -> None:
        """After ``optimizer_step``: count a device skip, and after a host skip restore the loss
        scale (a skipped step does not grow or shrink it)."""
        if self.device_skip is not None:
            self.device_skip.after_step()
        if self.skipping:
            self.skipping = False
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and self._scaler_state is not None:
                scaler.load_state_dict(self._scaler_state)
            self._scaler_state = None

    def start(self, trainer: L.Trainer, device: torch.device) -> None:
        """``on_train_start``: decide ``skip`` on the device where that applies (:func:`geobp.nonfinite.applies`)."""
        opt = trainer.optimizers[0] if trainer.optimizers else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if opt is not None and device_skip_applies(self.mode, trainer.world_size, device, opt, scaler):
            self.device_skip = DeviceSkip(opt, device)

    def read_device_skips(self, global_step: int) -> None:
        """Count the steps skipped on the device since the last read (one host read); warn the first time."""
        if self.device_skip is None:
            return
        _, new = self.device_skip.read()
        if new and self.steps == 0:
            warnings.warn(
                f"the training loss was not finite on {new} step(s) by step {global_step}; skipped. Decided on the "
                "device, so the tiles are not named: set model.nonfinite: stop to stop at the first and name them. "
                "Later skips are counted in train/nonfinite_steps, not warned again", UserWarning, stacklevel=2)
        self.steps += new

    def end(self, trainer: L.Trainer) -> None:
        """``on_train_end``: read the last device skips and take the flag off the optimizer."""
        self.read_device_skips(trainer.global_step)
        if self.device_skip is not None:
            DeviceSkip.detach(trainer.optimizers[0])
            self.device_skip = None


def zero_loss(module: torch.nn.Module) -> Tensor:
    """A loss of 0 whose gradient is exactly 0 for every trainable parameter, NaN-free whatever
    the batch held (it reads one element of each parameter, not the model's output)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


def describe_tiles(batch: dict[str, Any], limit: int = 4) -> str:
    """``scene (row, col)`` of the first tiles of a batch, for messages."""
    scenes, windows = batch.get("scene"), batch.get("window")
    if scenes is None or windows is None:
        return "unknown tiles"
    parts = [f"{s} (row {int(w[0])}, col {int(w[1])})" for s, w in zip(scenes[:limit], windows[:limit])]
    more = len(scenes) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


@torch.no_grad()
def first_nonfinite_module(model: torch.nn.Module, x: Tensor) -> str | None:
    """Re-run the forward pass and return the name of the first module whose output is NaN/Inf.

    Modules finish in forward order, children before their parent, so the first hit is the
    innermost module where the values went bad.

    Returns:
        The module's name, ``"the input image"`` when ``x`` itself is not finite, or None.
    """
    if not bool(torch.isfinite(x).all()):
        return "the input image"
    found: list[str] = []
    hooks = []

    def hook(name: str) -> Any:
        def fn(_m: torch.nn.Module, _i: Any, out: Any) -> None:
            if not found and isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
                found.append(name)

        return fn

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None
