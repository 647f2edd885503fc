"""ResNet encoder for N-band imagery, with optional local pretrained weights.

The encoder is a torchvision ResNet without its classifier (``avgpool``/``fc``). It keeps
torchvision's submodule names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, each block a
``BasicBlock`` or ``Bottleneck``), so torchvision state dicts load as they are and monitors
can find the residual blocks by type. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchvision import models

from geobp.classes import check_in_channels
from geobp.errors import ConfigError, format_error

EncoderName = Literal["resnet18", "resnet34", "resnet50"]

#: Encoder name -> torchvision constructor (always called with ``weights=None``).
ENCODERS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}
assert set(ENCODERS) == set(get_args(EncoderName))

_WEIGHTS_FIX = (
    "download the torchvision weights on a machine with internet and pass the .pth path, "
    "or set weights: null"
)


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Reuse pretrained RGB stem filters for an ``in_channels``-band input.

    The filters' input channels are repeated cyclically (R, G, B, R, G, B, ...) up to
    ``in_channels`` and scaled by ``3 / in_channels`` (generally ``I / N`` for ``I`` saved
    channels), so an input whose bands look alike gives activations of the same magnitude.

    Args:
        weight: conv weight ``[out, I, kh, kw]`` (``I`` is 3 for torchvision RGB weights).
        in_channels: wanted number of input channels ``N``.

    Returns:
        The weight unchanged when ``N == I``; the sum over input channels (``[out, 1, kh, kw]``)
        when ``N == 1``; otherwise the repeated, rescaled weight ``[out, N, kh, kw]``.

    Raises:
        ConfigError: if ``in_channels < 1``.
    """
    check_in_channels(in_channels)
    saved = weight.shape[1]
    if in_channels == saved:
        return weight
    w = weight.float()
    if in_channels == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        index = torch.arange(in_channels, device=weight.device) % saved
        out = w[:, index] * (saved / in_channels)
    return out.to(weight.dtype)


class ResNetEncoder(nn.Module):
    """ResNet feature extractor for ``in_channels``-band images.

    Contract, for an input ``x: [B, C, H, W]`` with ``C == in_channels``, ``forward`` returns
    five features from high to low resolution (sizes rounded up for odd ``H``, ``W``):

    ====  ==================================  =========  ==================  ==================
    idx   source module (``feature_sources``)  size       resnet18/34 ch      resnet50 ch
    ====  ==================================  =========  ==================  ==================
    0     ``relu`` (conv1 -> bn1 -> relu)      H/2, W/2   64                  64
    1     ``layer1``                           H/4        64                  256
    2     ``layer2``                           H/8        128                 512
    3     ``layer3``                           H/16       256                 1024
    4     ``layer4``                           H/32       512                 2048
    ====  ==================================  =========  ==================  ==================

    ``out_channels`` lists the channel counts in that order. The stem ReLU is not in-place
    (unlike torchvision's), so full backward hooks can be registered on ``bn1`` and ``relu``.

    Args:
        name: which ResNet to build.
        in_channels: number of input bands (>= 1).
        weights: None for random (kaiming) initialisation, or the path of a local file holding
            a torchvision ResNet state dict of the same architecture (as written by
            ``torch.save(torchvision.models.resnet18().state_dict(), path)``). Its ``conv1``
            filters are adapted to ``in_channels`` with :func:`adapt_first_conv`; ``fc.*`` is
            dropped; every other tensor must match exactly.

    Raises:
        ConfigError: unknown ``name``, ``in_channels < 1``, missing or unreadable weights file,
            or a weights file of another architecture.
    """

    #: Names of the submodules whose outputs are the five features, in ``forward`` order.
    feature_sources: tuple[str, ...] = ("relu", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, name: EncoderName, in_channels: int, weights: str | None = None) -> None:
        super().__init__()
        if name not in ENCODERS:
            raise ConfigError(format_error(
                None, f"unknown encoder (expected one of {sorted(ENCODERS)}, found {name!r})",
                f"set encoder to one of {', '.join(sorted(ENCODERS))}"))
        check_in_channels(in_channels)
        self.name = name
        self.in_channels = in_channels
        net = ENCODERS[name](weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = net.maxpool
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3, self.layer4 = net.layer3, net.layer4
        self.out_channels: list[int] = [64] + [_stage_channels(getattr(self, f"layer{i}"))
                                               for i in range(1, 5)]
        if weights is not None:
            self.load_torchvision_weights(weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the five features ``[stem, layer1, layer2, layer3, layer4]`` (see class doc)."""
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, f1, f2, f3, f4]

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a local torchvision ResNet state dict, adapting ``conv1`` to ``in_channels``.

        Args:
            path: file written by ``torch.save(resnet.state_dict(), path)``.

        Raises:
            ConfigError: the file is missing, unreadable, or of another architecture.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(format_error(
                path, "encoder weights file not found (expected a torchvision ResNet state dict)",
                _WEIGHTS_FIX))
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(format_error(
                path, f"cannot read encoder weights ({reason})", _WEIGHTS_FIX)) from exc
        is_state = isinstance(saved, Mapping) and all(isinstance(v, Tensor) for v in saved.values())
        if not is_state:
            raise ConfigError(format_error(
                path,
                f"not a state dict (expected a dict of tensors, found {type(saved).__name__})",
                "save the weights with torch.save(model.state_dict(), path)"))
        state = {k: v for k, v in saved.items() if not k.startswith("fc.")}
        if "conv1.weight" in state and state["conv1.weight"].ndim == 4:
            state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], self.in_channels)
        problem = _mismatch(self.state_dict(), state)
        if problem:
            raise ConfigError(format_error(
                path, f"weights do not fit a {self.name} encoder ({problem})",
                f"pass weights saved from torchvision.models.{self.name}(), "
                "or set encoder to the architecture the file was saved from"))
        self.load_state_dict(state, strict=True)


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BatchNorm)."""
    bns = [m for m in stage[-1].modules() if isinstance(m, nn.BatchNorm2d)]
    return bns[-1].num_features


def _mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """Describe key and shape differences between two state dicts ('' when they fit).

    A missing ``num_batches_tracked`` is tolerated, as ``load_state_dict`` does for old files.
    """
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
              for k, v in found.items() if k in expected and v.shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:2])}")
    return "; ".join(parts)
