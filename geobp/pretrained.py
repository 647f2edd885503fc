"""torchgeo's pretrained ResNet weights: names, band lists, normalisation, the local file.

This is a bottom-layer module (beside :mod:`geobp.raster`): it reads torchgeo's weights enums
(``torchgeo.models.ResNet18_Weights`` ...) without building a model, so both the data module
(which needs the weights' normalisation and band list) and the encoder (which needs the state
dict) use it without importing each other.

A weights name is what :func:`torchgeo.models.get_weight` reads, e.g.
``ResNet18_Weights.SENTINEL2_ALL_MOCO``. Files are never downloaded: torchgeo's ``get_state_dict``
reads torch's hub cache (``$TORCH_HOME/hub/checkpoints/<file name of the url>``), and a file
missing there is an error naming the path and the URL to fetch it from.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from geobp.bands import canonical_band
from geobp.errors import ConfigError, DataNotFoundError, format_error

#: A torchgeo weights name: ``<Enum>_Weights.<MEMBER>``; anything else is a local file path.
_NAME = re.compile(r"^[A-Za-z0-9]+_Weights\.[A-Z0-9_]+$")
#: The torchgeo weights enums the geobp encoders can take, by encoder name.
ENUM_OF_ENCODER = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}


def is_pretrained_name(weights: str | None) -> bool:
    """True when ``weights`` names torchgeo weights (``ResNet18_Weights.X``), not a file path."""
    return weights is not None and bool(_NAME.match(weights)) and not Path(weights).is_file()


@dataclass(frozen=True)
class PretrainedWeights:
    """What geobp needs to know about one set of torchgeo ResNet weights.

    Attributes:
        name: the weights name, e.g. ``ResNet18_Weights.SENTINEL2_ALL_MOCO``.
        encoder: the architecture the weights are for (``resnet18`` or ``resnet50``).
        bands: the weights' input bands, in the order of the first convolution's channels.
        mean, std: per weights band, the normalisation ``(x - mean) / std`` the weights were
            trained with (torchgeo's ``Normalize`` transforms, composed).
        url: where the file is published.
        sensor: a short description (``meta["dataset"]`` and ssl method) for listings.
    """

    name: str
    encoder: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    url: str
    sensor: str

    @property
    def cache_path(self) -> Path:
        """Where torch's hub cache (and so torchgeo) expects the file: ``$TORCH_HOME/hub/checkpoints/<name>``."""
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(self.url).path)

    def state_dict(self) -> dict[str, Tensor]:
        """Load the weights' state dict through torchgeo (``get_state_dict``), never downloading.

        The file is read with ``weights_only=True`` (tensors and plain containers only).

        Returns:
            The timm ResNet state dict (``conv1.weight`` ``[64, len(bands), 7, 7]``, ``layer1.0...``,
            ``fc.*``), whose keys are torchvision's.

        Raises:
            DataNotFoundError: the file is not in the hub cache (message: path and URL).
            ConfigError: the file cannot be read or is not a dict of tensors.
        """
        path = self.cache_path
        if not path.is_file():
            raise DataNotFoundError(format_error(
                path, f"pretrained weights {self.name} not found in torch's hub cache (nothing is downloaded)",
                f"fetch {self.url} on a machine with internet and copy it to that path "
                "(or set TORCH_HOME to the folder that holds hub/checkpoints/)"))
        try:
            state = _enum_member(self.name).get_state_dict(
                model_dir=str(path.parent), map_location="cpu", progress=False, weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(format_error(
                path, f"cannot read pretrained weights {self.name} ({reason})",
                f"delete the file and fetch it again from {self.url}")) from exc
        if not (isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())):
            raise ConfigError(format_error(
                path, f"not a state dict (expected a dict of tensors, found {type(state).__name__})",
                f"delete the file and fetch it again from {self.url}"))
        return dict(state)


def _enum_member(name: str) -> Any:
    """The torchgeo weights enum member called ``name`` (one line error when unknown)."""
    from torchgeo.models import get_weight  # torchgeo's import is slow: only when weights are named

    try:
        return get_weight(name)
    except ValueError:
        names = [w.name for w in list_pretrained()]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(format_error(
            None, f"unknown torchgeo weights {name!r}",
            f"{hint}run `geobp weights` for the names (docs/training.md, 'Pretrained encoders')")) from None


def resolve_pretrained(name: str) -> PretrainedWeights:
    """Describe the torchgeo weights ``name`` (no file is read).

    Raises:
        ConfigError: unknown name, weights of an architecture no geobp encoder has, weights
            without a band list, or transforms other than torchgeo's resizing, cropping and
            ``Normalize``.
    """
    member = _enum_member(name)
    enum_name = type(member).__name__
    encoder = next((e for e, n in ENUM_OF_ENCODER.items() if n == enum_name), None)
    if encoder is None:
        raise ConfigError(format_error(
            None, f"{name} are weights for another architecture (geobp's encoders take "
            f"{', '.join(ENUM_OF_ENCODER.values())})", "pick a ResNet18_Weights or ResNet50_Weights entry"))
    meta = member.meta
    bands = meta.get("bands")
    if not bands:
        raise ConfigError(format_error(
            None, f"{name} has no band list in torchgeo's metadata, so its bands cannot be matched by name",
            "pick weights with a band list (`geobp weights` lists them)"))
    mean, std = compose_normalize(member.transforms, len(bands), name)
    sensor = " ".join(str(v) for v in (meta.get("dataset"), meta.get("ssl_method")) if v)
    return PretrainedWeights(name=str(member), encoder=encoder, bands=tuple(bands), mean=mean, std=std,
                             url=member.url, sensor=sensor)


def compose_normalize(transforms: nn.Module | None, n_bands: int, name: str = "weights") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fold torchgeo's value transforms into one per-band ``(x - mean) / std``.

    torchvision's ``Normalize(m, s)`` maps ``x`` to ``(x - m) / s``; two in a row,
    ``((x - m1) / s1 - m2) / s2``, equal one with mean ``m1 + m2 * s1`` and std ``s1 * s2``.
    Spatial transforms (resize, crop) do not change values and are skipped; ``Identity`` is
    ``(x - 0) / 1``.

    Args:
        transforms: the weights' ``transforms`` (a module, an ``nn.Sequential`` of them, or None).
        n_bands: number of bands (scalar means and stds are broadcast to it).
        name: the weights' name, for messages.

    Returns:
        (mean, std), each one float per band.

    Raises:
        ConfigError: a transform that changes values in another way.
    """
    import torchvision.transforms.v2 as T

    mean = torch.zeros(n_bands, dtype=torch.float64)
    std = torch.ones(n_bands, dtype=torch.float64)
    modules = list(transforms) if isinstance(transforms, nn.Sequential) else [transforms]
    for module in modules:
        if module is None or isinstance(module, (nn.Identity, T.Resize, T.CenterCrop)):
            continue
        if not isinstance(module, T.Normalize):
            raise ConfigError(format_error(
                None, f"{name}: cannot derive the normalisation from a {type(module).__name__} transform",
                "set data.normalization (meanstd or percentile) explicitly"))
        m = torch.as_tensor(module.mean, dtype=torch.float64).expand(n_bands)
        s = torch.as_tensor(module.std, dtype=torch.float64).expand(n_bands)
        mean, std = mean + m * std, std * s
    return tuple(mean.tolist()), tuple(std.tolist())


def match_bands(data_bands: Sequence[str], weights: PretrainedWeights) -> list[int | None]:
    """Index in the weights' bands of each data band, by name (None for bands the weights lack).

    Names are compared by :func:`canonical_band`, so ``B8A``, ``b8a`` and ``B08A`` are one band, and
    without the source of a scene of several sources (``s2:B04`` is ``B04``).

    Raises:
        ConfigError: fewer than half of the data's bands are in the weights (lists both).
    """
    index = {canonical_band(b): i for i, b in enumerate(weights.bands)}
    matched = [index.get(canonical_band(b.rpartition(":")[2])) for b in data_bands]
    hits = sum(i is not None for i in matched)
    if 2 * hits < len(data_bands):
        raise ConfigError(format_error(
            None, f"only {hits} of the data's {len(data_bands)} bands are in {weights.name} "
            f"(data bands {list(data_bands)}; weights bands {list(weights.bands)})",
            "name the bands in the files' band descriptions or with data.band_names, using the "
            "weights' names, or pick weights of your sensor (`geobp weights`)"))
    return matched


def warn_unmatched(data_bands: Sequence[str], matched: Sequence[int | None], weights: PretrainedWeights) -> None:
    """Warn, naming them, about data bands the weights lack (their filters start untrained)."""
    missing = [b for b, i in zip(data_bands, matched) if i is None]
    if missing:
        warnings.warn(
            f"bands {missing} are not in {weights.name} (bands {list(weights.bands)}): their first-layer "
            "filters start from the stem adaptation of the pretrained filters, not from trained ones",
            UserWarning, stacklevel=3)


def list_pretrained() -> list[PretrainedWeights]:
    """Every torchgeo ResNet-18/50 weights entry geobp's encoders accept (with a band list)."""
    import torchgeo.models as tm

    found = []
    for enum_name in ENUM_OF_ENCODER.values():
        for member in getattr(tm, enum_name):
            if member.meta.get("bands"):
                found.append(resolve_pretrained(str(member)))
    return found
