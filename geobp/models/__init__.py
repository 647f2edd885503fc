"""Segmentation models: N-band ResNet encoder, U-Net with named skips, DeepLabV3, registry."""

from geobp.models.deeplab import DeepLabV3
from geobp.models.encoder import ENCODERS, EncoderName, ResNetEncoder, adapt_first_conv, select_first_conv
from geobp.models.registry import MODELS, ModelName, create_model
from geobp.models.unet import SkipConnection, UNet

__all__ = [
    "ENCODERS",
    "MODELS",
    "DeepLabV3",
    "EncoderName",
    "ModelName",
    "ResNetEncoder",
    "SkipConnection",
    "UNet",
    "adapt_first_conv",
    "create_model",
    "select_first_conv",
]
