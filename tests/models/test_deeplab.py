"""DeepLabV3: shapes and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geobp.models import create_model


@pytest.mark.parametrize(("encoder", "size"), [("resnet18", (64, 64)), ("resnet34", (70, 50))])
def test_output_matches_input_size(encoder: str, size: tuple[int, int]) -> None:
    model = create_model("deeplabv3", encoder=encoder, in_channels=4, num_classes=5)
    assert model(torch.randn(2, 4, *size)).shape == (2, 5, *size)


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = create_model("deeplabv3", encoder="resnet18", in_channels=4, num_classes=3).train()
    logits = model(torch.randn(2, 4, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
