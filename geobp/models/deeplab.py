"""DeepLabV3: torchvision's ASPP head on the last feature of a :class:`ResNetEncoder`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from geobp.classes import check_num_classes
from geobp.models.encoder import ResNetEncoder


class DeepLabV3(nn.Module):
    """DeepLabV3 without dilation: ASPP on ``layer4`` (output stride 32), bilinear upsampling.

    Shapes: ``x: [B, in_channels, H, W] -> logits [B, num_classes, H, W]`` for any ``H``, ``W``.
    The ASPP image-pooling branch has a BatchNorm over a 1x1 map, so training needs batch >= 2.

    Args:
        encoder: feature extractor following the :class:`ResNetEncoder` contract.
        num_classes: number of output classes (>= 2).
        atrous_rates: dilation rates of the three ASPP convolution branches.

    Raises:
        ConfigError: ``num_classes < 2``.
    """

    def __init__(self, encoder: ResNetEncoder, num_classes: int,
                 atrous_rates: tuple[int, int, int] = (12, 24, 36)) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.encoder = encoder
        self.num_classes = num_classes
        self.head = DeepLabHead(encoder.out_channels[-1], num_classes, tuple(atrous_rates))

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, num_classes, H, W]`` for ``x: [B, in_channels, H, W]``."""
        logits = self.head(self.encoder(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
