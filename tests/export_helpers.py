"""A tiny trained checkpoint and rasters for the export tests (tests/inference/test_export.py,
tests/cli/test_export_cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from geobp.task import SegmentationTask
from tests.conftest import write_tif

NAMES = ["water", "forest", "urban"]
#: uint16 scenes with nodata 0, standardised as `geobp fit` records it
PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0, 280.0, 320.0], "std": [100.0, 90.0, 110.0],
       "low": [], "high": [], "dtype": "uint16", "band_names": ["red", "green", "nir"]}


def tiny_checkpoint(path: Path, preprocessing: dict[str, Any] = PRE, steps: int = 2, seed: int = 0) -> Path:
    """A ResNet-18 U-Net with a narrow decoder after ``steps`` training steps (batch-norm
    statistics and weights moved away from their start), saved as `geobp fit` saves it."""
    torch.manual_seed(seed)
    n = len(preprocessing["bands"])
    task = SegmentationTask(encoder="resnet18", in_channels=n, num_classes=len(NAMES), class_names=NAMES,
                            preprocessing=preprocessing, tile_size=32, in_band_names=preprocessing.get("band_names") or None,
                            model_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05)
    task.train()
    for _ in range(steps):
        x = torch.randn(4, n, 32, 32)
        mask = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        loss = task.criterion(task(x), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.eval()
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def uint16_raster(path: Path, size: tuple[int, int] = (90, 70), seed: int = 0) -> Path:
    """A 3-band uint16 raster with nodata 0: a nodata corner and a nodata stripe."""
    img = np.random.default_rng(seed).integers(1, 700, (3, *size)).astype("uint16")
    img[:, :6, :9] = 0
    img[:, 40:43, :] = 0
    return write_tif(path, img, nodata=0)
