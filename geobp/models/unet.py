"""U-Net decoder over a :class:`ResNetEncoder`, with every skip connection a named module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geobp.classes import check_num_classes
from geobp.errors import ConfigError, format_error
from geobp.models.encoder import ResNetEncoder

#: Total downsampling of the encoder; inputs are padded to a multiple of it.
STRIDE = 32


class SkipConnection(nn.Identity):
    """A do-nothing module that carries one encoder feature into the decoder.

    It exists only to be found and hooked: a full backward hook on it sees the gradient that
    flows back through this skip alone, apart from the gradient through the deeper encoder path.
    """


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate an optional skip feature, then two 3x3 conv-BN-ReLU.

    Args:
        in_channels: channels of the incoming decoder tensor.
        skip_channels: channels of the skip feature (0 for a block without skip).
        out_channels: channels produced.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """``x: [B, in, h, w]``, ``skip: [B, skip, 2h, 2w]`` -> ``[B, out, 2h, 2w]``."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNet(nn.Module):
    """U-Net: ResNet encoder, five decoder blocks, 1x1 classification head.

    Shapes: ``x: [B, in_channels, H, W] -> logits [B, num_classes, H, W]`` for any ``H``,
    ``W``; the input is zero-padded at the bottom and right to a multiple of 32 and the logits
    are cropped back.

    Decoder block ``i`` (``self.decoder[i]``) doubles the resolution and produces
    ``decoder_channels[i]`` channels: blocks 0-3 concatenate a skip feature, block 4 reaches
    full resolution without one. The skips, ordered deep to shallow (``skip_names``):

    =======  ==========================  ===================  ==============  ==========
    name     module (``skips[name]``)     ``skip_sources``     resolution      into block
    =======  ==========================  ===================  ==============  ==========
    layer3   ``skips.layer3``             ``encoder.layer3``   H/16            0
    layer2   ``skips.layer2``             ``encoder.layer2``   H/8             1
    layer1   ``skips.layer1``             ``encoder.layer1``   H/4             2
    stem     ``skips.stem``               ``encoder.relu``     H/2             3
    =======  ==========================  ===================  ==============  ==========

    The gradient at the output of ``skip_sources[name]`` is the sum of the gradient through
    ``skips[name]`` and the gradient through the deeper encoder path, so a monitor can compare
    the two with one hook on each module.

    Args:
        encoder: feature extractor following the :class:`ResNetEncoder` contract.
        num_classes: number of output classes (>= 2).
        decoder_channels: output channels of the five decoder blocks, deep to shallow.

    Raises:
        ConfigError: ``num_classes < 2`` or ``decoder_channels`` not five positive integers.
    """

    def __init__(self, encoder: ResNetEncoder, num_classes: int,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()
        check_num_classes(num_classes)
        decoder_channels = tuple(decoder_channels)
        if len(decoder_channels) != 5 or any(c < 1 for c in decoder_channels):
            raise ConfigError(format_error(
                None, f"decoder_channels must be 5 positive integers (found {decoder_channels})",
                "use e.g. decoder_channels: [256, 128, 64, 32, 16]"))
        self.encoder = encoder
        self.num_classes = num_classes
        # Encoder features 3, 2, 1, 0 feed the skips, deep to shallow.
        sources = encoder.feature_sources
        self.skip_names: list[str] = ["layer3", "layer2", "layer1", "stem"]
        self.skip_sources: dict[str, str] = {
            name: f"encoder.{sources[i]}" for name, i in zip(self.skip_names, (3, 2, 1, 0))}
        self.skips = nn.ModuleDict({name: SkipConnection() for name in self.skip_names})

        skip_channels = [encoder.out_channels[i] for i in (3, 2, 1, 0)] + [0]
        in_channels = [encoder.out_channels[4], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(in_channels, skip_channels, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, num_classes, H, W]`` for ``x: [B, in_channels, H, W]``."""
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % STRIDE, (-width) % STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.encoder(x)
        y = features[4]
        for block, name, feature in zip(self.decoder, self.skip_names, features[3::-1]):
            y = block(y, self.skips[name](feature))
        y = self.decoder[-1](y)
        return self.head(y)[..., :height, :width]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias), BatchNorm, ReLU (not in-place, so modules stay hookable)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
    )
