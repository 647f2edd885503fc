"""Segmentation losses that honour an ignore index: cross-entropy, soft Dice, focal.

Cross-entropy is PyTorch's. Dice and focal are written here because neither torch nor
torchmetrics ships a differentiable multi-class version with an ignore index.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class SegmentationLoss(nn.Module):
    """One of ``ce``, ``dice``, ``focal`` or ``ce+dice``, with class weights and an ignore index."""

    def __init__(self, name: LossName = "ce", ignore_index: int = 255, class_weights: list[float] | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        self.name = name
        self.ignore_index = ignore_index
        self.gamma = gamma
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.name == "focal":
            return focal_loss(logits, target, self.ignore_index, self.gamma, self.weight)
        if self.name == "dice":
            return dice_loss(logits, target, self.ignore_index)
        ce = cross_entropy(logits, target, self.ignore_index, self.weight)
        if self.name == "ce+dice":
            return ce + dice_loss(logits, target, self.ignore_index)
        return ce


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
