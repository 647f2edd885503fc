"""Build segmentation models by name from a plain dict registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from geobp.classes import check_in_channels, check_num_classes
from geobp.errors import ConfigError, format_error
from geobp.models.deeplab import DeepLabV3
from geobp.models.encoder import ENCODERS, ResNetEncoder
from geobp.models.unet import UNet

ModelName = Literal["unet", "deeplabv3"]

#: Model name -> constructor called as ``MODELS[name](encoder, num_classes, **kwargs)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "deeplabv3": DeepLabV3,
}


def create_model(name: str, *, encoder: str = "resnet34", in_channels: int, num_classes: int,
                 weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a segmentation model ``[B, in_channels, H, W] -> [B, num_classes, H, W]``.

    Args:
        name: a key of :data:`MODELS` ("unet" or "deeplabv3").
        encoder: a ResNet name ("resnet18", "resnet34" or "resnet50").
        in_channels: number of input bands (>= 1).
        num_classes: number of classes (>= 2).
        weights: None for random initialisation, or the path of a local torchvision ResNet
            state dict for the encoder (see :class:`ResNetEncoder`).
        **kwargs: options of the model class, e.g. ``decoder_channels`` for "unet" or
            ``atrous_rates`` for "deeplabv3".

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: unknown model, encoder or option; ``in_channels < 1``;
            ``num_classes < 2``; unusable weights file.
    """
    if name not in MODELS:
        raise ConfigError(format_error(
            None, f"unknown model (expected one of {sorted(MODELS)}, found {name!r})",
            f"set model name to one of {', '.join(sorted(MODELS))}"))
    if encoder not in ENCODERS:
        raise ConfigError(format_error(
            None, f"unknown encoder (expected one of {sorted(ENCODERS)}, found {encoder!r})",
            f"set encoder to one of {', '.join(sorted(ENCODERS))}"))
    check_in_channels(in_channels)
    check_num_classes(num_classes)
    builder = MODELS[name]
    options = [p for p in inspect.signature(builder).parameters
               if p not in ("self", "encoder", "num_classes")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(format_error(
            None,
            f"unknown option for model {name!r} (expected some of {options}, found {unknown})",
            f"remove {', '.join(unknown)} or use one of {', '.join(options) or 'no options'}"))
    backbone = ResNetEncoder(encoder, in_channels, weights)  # type: ignore[arg-type]
    return builder(backbone, num_classes, **kwargs)
