"""AdamW for ``SegmentationTask``: fused (one kernel for all parameters) where it is safe, and
gradient clipping that works with it.

``model.fused``: ``null`` (auto) picks the fused AdamW on CUDA unless a ``16-mixed`` loss scaler
runs together with gradient clipping, else torch's default (``foreach`` on CUDA); ``true``
asks for it on any device torch supports it on (CPUs too); ``false`` never.

A fused AdamW unscales ``16-mixed`` gradients inside its own step, so the gradients are still
scaled when clipping would run; Lightning therefore refuses to clip with it under any mixed
precision plugin, ``bf16-mixed`` included, whose gradients are never scaled. Without a loss
scaler, :func:`clip_gradients` clips them as Lightning's own plugin would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import AdamW, Optimizer

from geobp.errors import ConfigError, format_error


def use_fused(fused: bool | None, device: torch.device, scaler: bool, clipping: bool) -> bool:
    """Whether the AdamW of a run is fused.

    Args:
        fused: ``model.fused`` (None: auto).
        device: the parameters' device.
        scaler: whether a loss scaler runs (``16-mixed``).
        clipping: whether gradients are clipped (``trainer.gradient_clip_val`` > 0).

    Raises:
        ConfigError: ``fused: true`` with a loss scaler and clipping.
    """
    if fused is None:
        return device.type == "cuda" and not (scaler and clipping)
    if fused and scaler and clipping:
        raise ConfigError(format_error(
            None, "model.fused: true with trainer.precision 16-mixed and trainer.gradient_clip_val: the fused AdamW "
            "unscales the gradients inside its step, after clipping would have to run on them",
            "set model.fused: null (auto) or false, use trainer.precision: bf16-mixed, or unset gradient_clip_val"))
    return bool(fused)


def build_adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float, fused: bool) -> AdamW:
    """AdamW over parameter ``groups``: fused, or torch's default implementation."""
    if fused:
        return AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    return AdamW(groups, lr=lr, weight_decay=weight_decay)


def unscales_in_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` unscales gradients inside its step (a fused Adam/AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def clip_gradients(optimizer: Optimizer, clip_val: float | None, algorithm: str | None) -> None:
    """Clip the gradients of ``optimizer``'s parameters in place: by total norm (``norm``, the
    default) or by value (``value``); nothing when ``clip_val`` is None or 0."""
    if not clip_val:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":  # Lightning passes a str enum
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip_val)


def keep_implementation(optimizer: Optimizer) -> None:
    """Give every parameter group back the implementation ``optimizer`` was built with.

    Loading a checkpoint's optimizer state replaces each group's settings with the saved ones, so
    a run resumed from a checkpoint of the other implementation (unfused before ``model.fused``,
    or trained on another device) would step with the saved one, which a fused optimizer's
    ``found_inf`` and clipping do not expect. Step counts go where the implementation keeps them
    (the parameter's device when fused or capturable, else the CPU).
    """
    for group in optimizer.param_groups:
        for key in ("fused", "foreach", "capturable"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)
