"""Segmentation losses that honour an ignore index, and their registry (``model.loss``).

To add a loss, define ``fn(logits, target, ignore_index, weight=None, **options)`` here (or
anywhere imported before the task is built) and decorate it with ``@register_loss("name")``;
``model.loss: name`` then selects it, and :func:`create_loss` checks its options against its
signature. Built in: ``ce``, ``dice``, ``focal``, ``ce+dice``.

Cross-entropy is PyTorch's. Dice and focal are written here because neither torch nor
torchmetrics ships a differentiable multi-class version with an ignore index.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geobp.errors import ConfigError, format_error

#: The built-in losses (:data:`LOSSES` may hold more).
LossName = Literal["ce", "dice", "focal", "ce+dice"]


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int, eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice over the classes present in the target or predicted, ignoring ``ignore_index`` pixels.

    Args:
        logits: [B, K, H, W].
        target: [B, H, W] int64.
    """
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(0, k - 1) * valid.squeeze(1), k).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice.mean()


def focal_loss(logits: Tensor, target: Tensor, ignore_index: int, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Focal loss (cross-entropy scaled by ``(1 - p_t) ** gamma``), mean over valid pixels."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    loss = (1 - torch.exp(-ce)) ** gamma * ce
    if weight is not None:
        loss = loss * weight[target.clamp(0, len(weight) - 1)]
    return loss[valid].sum() / valid.sum().clamp(min=1)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy averaged over the labelled pixels (weighted by their class weights), and 0,
    not NaN, for a batch with no labelled pixel (labels that cover part of a scene leave such
    batches; torch's mean reduction divides 0 by 0 there)."""
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        denom = (weight[target.clamp(0, len(weight) - 1)] * valid).sum()
    return total / denom.clamp(min=torch.finfo(total.dtype).tiny)


#: The contract of a registered loss: ``fn(logits, target, *, ignore_index, weight, **options)``
#: returns a scalar; ``logits`` is [B, K, H, W], ``target`` [B, H, W] int64, ``weight`` the
#: per-class weights [K] or None; pixels labelled ``ignore_index`` count nowhere.
LossFn = Callable[..., Tensor]

#: Loss name -> loss function (see :data:`LossFn`); :func:`register_loss` adds one.
LOSSES: dict[str, LossFn] = {}

#: The parameters every loss receives from :class:`SegmentationLoss`; the others are its options.
_FIXED = ("logits", "target", "ignore_index", "weight")


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator that registers a loss function under ``name`` (usable as ``model.loss: <name>``).

    The function is called as ``fn(logits, target, ignore_index=..., weight=..., **options)``
    (see :data:`LossFn`); its other keyword parameters, with defaults, are its options.

    Raises:
        ConfigError: ``name`` is taken, or the function lacks a parameter of the contract.
    """

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ConfigError(format_error(None, f"loss {name!r} is registered already (by {LOSSES[name].__qualname__})",
                                           "register the new loss under another name"))
        params = inspect.signature(fn).parameters
        missing = [p for p in _FIXED if p not in params]
        if missing:
            raise ConfigError(format_error(
                None, f"loss {name!r}: {fn.__qualname__} lacks the parameter(s) {missing} of the loss contract",
                "define it as fn(logits, target, ignore_index, weight=None, **options)"))
        LOSSES[name] = fn
        return fn

    return add


def loss_options(name: str) -> list[str]:
    """The option names of the registered loss ``name`` (its parameters beyond the contract's)."""
    return [p for p in inspect.signature(LOSSES[name]).parameters if p not in _FIXED]


@register_loss("ce")
def _ce(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    return cross_entropy(logits, target, ignore_index, weight)


@register_loss("dice")
def _dice(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    return dice_loss(logits, target, ignore_index)  # unweighted: Dice averages over classes already


@register_loss("focal")
def _focal(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None, gamma: float = 2.0) -> Tensor:
    return focal_loss(logits, target, ignore_index, gamma, weight)


@register_loss("ce+dice")
def _ce_dice(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    return cross_entropy(logits, target, ignore_index, weight) + dice_loss(logits, target, ignore_index)


class SegmentationLoss(nn.Module):
    """A registered loss (:data:`LOSSES`) with its class weights, ignore index and options.

    Args:
        name: a key of :data:`LOSSES` (``ce``, ``dice``, ``focal``, ``ce+dice`` or a registered one).
        ignore_index: the label of pixels that count nowhere.
        class_weights: per-class weights (passed to the loss as ``weight``), or None.
        **options: the loss's own options (e.g. ``gamma`` for ``focal``).

    Raises:
        ConfigError: unknown loss name (the message lists the valid ones), or an option the loss
            does not take.
    """

    def __init__(self, name: str = "ce", ignore_index: int = 255, class_weights: list[float] | None = None,
                 **options: Any) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ConfigError(format_error(
                None, f"unknown loss (expected one of {sorted(LOSSES)}, found {name!r})",
                f"set model.loss to one of {', '.join(sorted(LOSSES))}, or register the loss with "
                "geobp.losses.register_loss"))
        valid = loss_options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(format_error(
                None, f"unknown option for loss {name!r} (expected some of {valid}, found {unknown})",
                f"remove {', '.join(unknown)} or use one of {', '.join(valid) or 'no options'}"))
        self.name = name
        self.ignore_index = ignore_index
        self.options = dict(options)
        self.fn = LOSSES[name]
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of logits [B, K, H, W] against target [B, H, W] (a scalar)."""
        return self.fn(logits, target, ignore_index=self.ignore_index, weight=self.weight, **self.options)


def create_loss(name: str, *, ignore_index: int = 255, class_weights: list[float] | None = None,
                **options: Any) -> SegmentationLoss:
    """Build the registered loss ``name`` (see :class:`SegmentationLoss`).

    Args:
        name: a key of :data:`LOSSES`.
        ignore_index: the label of pixels that count nowhere.
        class_weights: per-class weights, or None.
        **options: the loss's own options, checked against its signature.

    Returns:
        The loss module.

    Raises:
        ConfigError: unknown name (the valid ones are listed) or option.
    """
    return SegmentationLoss(name, ignore_index, class_weights, **options)


def class_weights_from_counts(counts: list[int] | list[float]) -> list[float]:
    """Loss weights from training pixels per class: inverse square root of the frequency,
    normalised to mean 1 (``model.class_weights: auto``).

    A class with no training pixel gets the weight of the rarest class present (it never occurs
    in the loss's targets, so its weight matters only for the normalisation).

    Raises:
        ValueError: no class has a pixel.
    """
    c = torch.tensor([float(x) for x in counts], dtype=torch.float64)
    if not (c > 0).any():
        raise ValueError("class_weights: auto needs labelled training pixels, and the training masks have none")
    c = torch.where(c > 0, c, c[c > 0].min())
    w = (c / c.sum()).rsqrt()
    return (w / w.mean()).tolist()
