"""A zoo of small models with known gradient pathologies, their data, and a capturing logger."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import BasicBlock


class TileSet(Dataset):
    """Seeded samples carrying tile metadata like geobp's batch contract.

    ``image`` is ``[bands, size, size]`` (or ``[features]`` when ``size`` is 0) with a class
    signal in its mean; ``target`` the class; ``scene`` and ``window`` name the tile.
    ``dead_band`` sets one band to zero everywhere; ``scaled_band`` ``(band, factor)`` multiplies
    one band (a band left in raw digital numbers); ``nan_pixel`` ``(sample, band)`` puts a NaN in
    one pixel of one band of one sample.
    """

    def __init__(self, n: int = 64, bands: int = 3, size: int = 8, classes: int = 4, seed: int = 0,
                 dead_band: int | None = None, scaled_band: tuple[int, float] | None = None,
                 nan_pixel: tuple[int, int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (n, bands, size, size) if size else (n, bands)
        self.target = torch.randint(0, classes, (n,), generator=g)
        signal = (self.target.float() - classes / 2).view(n, *([1] * (len(shape) - 1)))
        self.image = torch.randn(shape, generator=g) + 0.5 * signal
        if dead_band is not None:
            self.image[:, dead_band] = 0.0
        if scaled_band is not None:
            self.image[:, scaled_band[0]] *= scaled_band[1]
        if nan_pixel is not None:
            self.image[nan_pixel[0], nan_pixel[1], 0, 0] = float("nan")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.image[i], "target": self.target[i], "scene": f"scene_{i % 4}",
                "window": torch.tensor([16 * i, 8 * (i % 3), 16, 16])}


@dataclass(frozen=True)
class ZooRaster:
    """What the monitor reads of a scene's image: CRS and affine transform (as ``geobp.raster.RasterInfo``)."""

    crs: str
    transform: tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class ZooScene:
    name: str
    image: ZooRaster


class ZooData(L.LightningDataModule):
    """A data module over a :class:`TileSet` with what the monitor reads: ``band_names`` and ``scenes``.

    Scene ``scene_<k>`` is a 10 m UTM 33N grid whose origin moves 10 km east per scene.
    """

    def __init__(self, data: Dataset, band_names: list[str] | None, batch_size: int = 8) -> None:
        super().__init__()
        self.data, self.batch_size = data, batch_size
        if band_names is not None:
            self.band_names = band_names
        self.scenes = [ZooScene(f"scene_{k}", ZooRaster("EPSG:32633", (10.0, 0.0, 400000.0 + 10000.0 * k,
                                                                         0.0, -10.0, 5500000.0)))
                       for k in range(4)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class ZooModule(L.LightningModule):
    """Classifier around any ``net``; cross-entropy on ``batch["image"]`` -> ``batch["target"]``."""

    def __init__(self, net: nn.Module, lr: float = 0.05, optimizer: str = "sgd",
                 exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer = optimizer
        self.exclude = exclude  # parameter name prefixes left out of the optimizer (a classic slip)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        for module in self.net.modules():
            if hasattr(module, "step"):
                module.step = self.global_step
        loss = F.cross_entropy(self(batch["image"]).float(), batch["target"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if not n.startswith(self.exclude)]
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr)


class _GradTimes(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (NaN or Inf here)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class NaNGradAt(nn.Module):
    """Identity whose backward returns NaN at optimizer step ``at`` (``step`` set by ZooModule)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.step = -1

    def forward(self, x: Tensor) -> Tensor:
        return _GradTimes.apply(x, float("nan")) if self.step == self.at else x


class OverflowingBackward(nn.Module):
    """Identity whose backward overflows (Inf) on every step, as an fp16 overflow would at any scale."""

    def forward(self, x: Tensor) -> Tensor:
        return _GradTimes.apply(x, float("inf"))


class NaNForwardAt(nn.Module):
    """Identity that outputs NaN at optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.step = -1

    def forward(self, x: Tensor) -> Tensor:
        return x * float("nan") if self.step == self.at else x


def small_resnet(bands: int = 3, classes: int = 4, width: int = 8) -> nn.Sequential:
    """Stem, three torchvision BasicBlocks (the second with a downsample), pooled linear head."""
    down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
    return nn.Sequential(
        nn.Conv2d(bands, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2, downsample=down),
        BasicBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def deep_sigmoid_mlp(features: int = 16, depth: int = 20, classes: int = 4) -> nn.Sequential:
    """A deep plain network: Linear + Sigmoid, no normalization, no skips."""
    layers: list[nn.Module] = [nn.Linear(features, 32), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, classes))


def badly_scaled_mlp(features: int = 16, depth: int = 6, gain: float = 8.0, classes: int = 4) -> nn.Sequential:
    """A ReLU MLP whose weights are ``gain`` times too large."""
    layers: list[nn.Module] = []
    width = features
    for _ in range(depth):
        layers += [nn.Linear(width, 32), nn.ReLU()]
        width = 32
    net = nn.Sequential(*layers, nn.Linear(32, classes))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
    return net


class CaptureLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))
