"""UNet: shapes for any input size, gradients everywhere, hookable named skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geobp.errors import ConfigError
from geobp.models import ResNetEncoder, SkipConnection, UNet, create_model


@pytest.mark.parametrize(("encoder", "size"), [
    ("resnet18", (64, 64)),
    ("resnet34", (70, 50)),
    ("resnet50", (32, 32)),
    ("resnet18", (1, 33)),
])
def test_output_matches_input_size(encoder: str, size: tuple[int, int]) -> None:
    model = create_model("unet", encoder=encoder, in_channels=3, num_classes=4)
    assert model(torch.randn(2, 3, *size)).shape == (2, 4, *size)


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = create_model("unet", encoder="resnet18", in_channels=6, num_classes=3).train()
    logits = model(torch.randn(2, 6, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_skips_are_named_modules_with_documented_sources() -> None:
    model = UNet(ResNetEncoder("resnet18", 3), num_classes=2)
    assert model.skip_names == ["layer3", "layer2", "layer1", "stem"]
    assert list(model.skips) == model.skip_names
    assert all(isinstance(m, SkipConnection) for m in model.skips.values())
    assert model.skip_sources == {"layer3": "encoder.layer3", "layer2": "encoder.layer2",
                                  "layer1": "encoder.layer1", "stem": "encoder.relu"}
    for source in model.skip_sources.values():
        model.get_submodule(source)  # raises if the documented name is wrong


# The module that consumes each skip source on the deeper encoder path.
DEEPER = {"layer3": "encoder.layer4", "layer2": "encoder.layer3",
          "layer1": "encoder.layer2", "stem": "encoder.maxpool"}


@pytest.mark.parametrize("skip", list(DEEPER))
def test_hooks_split_source_gradient_into_skip_and_deeper_path(skip: str) -> None:
    model = create_model("unet", encoder="resnet18", in_channels=3, num_classes=2)
    grads: dict[str, torch.Tensor] = {}

    def keep(key: str, which: str):
        def hook(_module, grad_input, grad_output):
            grads[key] = (grad_input if which == "in" else grad_output)[0]
        return hook

    model.skips[skip].register_full_backward_hook(keep("skip", "in"))
    model.get_submodule(model.skip_sources[skip]).register_full_backward_hook(keep("total", "out"))
    model.get_submodule(DEEPER[skip]).register_full_backward_hook(keep("deeper", "in"))
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert grads["skip"].abs().sum() > 0
    torch.testing.assert_close(grads["total"], grads["skip"] + grads["deeper"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, r"num_classes must be >= 2 \(found 1\)"),
    ({"num_classes": 2, "decoder_channels": (64, 32)}, r"decoder_channels must be 5 positive"),
])
def test_invalid_arguments_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UNet(ResNetEncoder("resnet18", 3), **kwargs)
