"""Fake torchgeo weights files in a temporary ``TORCH_HOME`` (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor


def fake_torchgeo_weights(torch_home: Path, name: str, seed: int = 0) -> tuple[Path, dict[str, Tensor]]:
    """Write a state dict in torchgeo's format for weights ``name`` where torchgeo looks for it.

    The file name is the basename of the weights' url, in ``TORCH_HOME/hub/checkpoints/``; the
    state dict is a timm ResNet's (what torchgeo's ``resnet18``/``resnet50`` load), with
    ``meta["in_chans"]`` input channels and random, seeded values.

    Returns:
        (path of the file, the state dict written).
    """
    from torchgeo.models import get_weight

    weights = get_weight(name)
    torch.manual_seed(seed)
    model = timm.create_model(weights.meta["model"], in_chans=weights.meta["in_chans"], num_classes=1000)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():  # distinctive BN statistics too (timm starts them at 0 and 1)
        if k.endswith("running_mean") or k.endswith("running_var"):
            v.copy_(torch.rand_like(v) + 0.5)
    path = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state
