"""Shared fixtures: tiny GeoTIFFs written by seeded factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

CRS = "EPSG:32633"


def save_untrained_checkpoint(path: Path, preprocessing: dict, class_names: list[str], tile_size: int = 32) -> Path:
    """A checkpoint as `geobp fit` writes it (weights and hyper-parameters) of an untrained ResNet-18
    U-Net with seeded weights: for inference tests that need a model, not a good one."""
    import torch

    from geobp.task import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=len(preprocessing["bands"]), num_classes=len(class_names),
                            class_names=class_names, preprocessing=preprocessing, tile_size=tile_size)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = CRS,
    transform=None,
    nodata: float | None = None,
    block: int | None = 16,
) -> Path:
    """Write ``data`` ([C, H, W] or [H, W]) as a tiled GeoTIFF and return the path."""
    if data.ndim == 2:
        data = data[None]
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=str(data.dtype))
    if crs is not None:
        profile["crs"] = crs
    profile["transform"] = transform if transform is not None else from_origin(500000.0, 5000000.0, 10.0, 10.0)
    if nodata is not None:
        profile["nodata"] = nodata
    if block is not None and height >= block and width >= block:
        profile.update(tiled=True, blockxsize=block, blockysize=block, compress="deflate")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def make_scene(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: write ``root/images/NAME.tif`` and ``root/masks/NAME.tif`` and return both paths.

    The image is learnable: each class has its own value per band plus a little noise.
    """

    def _make(
        name: str = "a",
        size: tuple[int, int] = (64, 64),
        bands: int = 3,
        classes: int = 3,
        dtype: str = "uint16",
        seed: int = 0,
        root: Path | None = None,
        nodata: float | None = None,
        nodata_rows: int = 0,
        block: int | None = 16,
        transform=None,
    ) -> tuple[Path, Path]:
        root = root or tmp_path / "data"
        rng = np.random.default_rng(seed)
        h, w = size
        mask = (np.add.outer(np.arange(h) // 8, np.arange(w) // 8) % classes).astype(np.uint8)
        image = 100.0 * (mask[None] + 1) * np.arange(1, bands + 1)[:, None, None] + rng.normal(0, 5, (bands, h, w))
        image = image.astype(dtype)
        if nodata_rows:
            image[:, :nodata_rows] = nodata
            mask[:nodata_rows] = 255
        img = write_tif(root / "images" / f"{name}.tif", image, nodata=nodata, block=block, transform=transform)
        msk = write_tif(root / "masks" / f"{name}.tif", mask, block=block, transform=transform)
        return img, msk

    return _make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first: under pytest-xdist (``-n auto``) the long ones then start at once and the
    short ones fill the workers' gaps at the end, instead of one long test finishing alone.

    The order within each group is kept; tests depend on no order.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes on one thread: the workers already take one core
    each, and torch's default (every core per process) would have them contend for the same cores.
    Tests that need a thread count set their own (``--threads``, ``torch.set_num_threads``)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)

