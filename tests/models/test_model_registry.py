"""create_model: registry lookup, argument checks, channels_last."""

from __future__ import annotations

import re

import pytest
import torch

from geobp.errors import ConfigError
from geobp.models import MODELS, DeepLabV3, UNet, create_model


def test_registry_holds_both_models() -> None:
    assert MODELS == {"unet": UNet, "deeplabv3": DeepLabV3}
    assert isinstance(create_model("deeplabv3", encoder="resnet18", in_channels=3, num_classes=2),
                      DeepLabV3)


@pytest.mark.parametrize(("args", "message"), [
    ({"name": "segformer"}, re.escape("unknown model (expected one of ['deeplabv3', 'unet'], "
                                      "found 'segformer')")),
    ({"encoder": "vgg16"}, re.escape("expected one of ['resnet18', 'resnet34', 'resnet50'], "
                                     "found 'vgg16'")),
    ({"in_channels": 0}, r"in_channels must be >= 1 \(found 0\)"),
    ({"num_classes": 1}, r"num_classes must be >= 2 \(found 1\)"),
    ({"dropout": 0.1}, re.escape("unknown option for model 'unet' (expected some of "
                                 "['decoder_channels'], found ['dropout'])")),
])
def test_bad_arguments_raise_config_error(args: dict, message: str) -> None:
    kwargs = {"name": "unet", "encoder": "resnet18", "in_channels": 3, "num_classes": 2, **args}
    with pytest.raises(ConfigError, match=message):
        create_model(**kwargs)


def test_options_reach_the_model() -> None:
    model = create_model("unet", encoder="resnet18", in_channels=3, num_classes=2,
                         decoder_channels=(32, 16, 16, 8, 8))
    assert model.head.in_channels == 8


@pytest.mark.parametrize("name", ["unet", "deeplabv3"])
def test_channels_last_gives_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, encoder="resnet18", in_channels=4, num_classes=3).eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
