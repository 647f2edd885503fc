"""Scenes on disk: find ``images/<name>.tif`` and ``masks/<name>.tif`` pairs and check they align."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geobp.errors import BandMismatchError, ConfigError, DataNotFoundError, format_error
from geobp.raster import RasterInfo, check_georeferenced, check_same_grid, read_info

RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Scene:
    """One image and its label mask, on the same grid."""

    name: str
    image: RasterInfo
    mask: RasterInfo | None


def list_rasters(folder: Path) -> dict[str, Path]:
    """Map stem to path for every GeoTIFF in ``folder`` (not recursive), sorted by name."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in RASTER_SUFFIXES and p.is_file() and not p.name.startswith(".")
    }


def find_scenes(root: str | Path, require_masks: bool = True) -> list[Scene]:
    """Find and check the scenes of a dataset folder.

    Expected layout: ``root/images/<name>.tif`` (multi-band) and ``root/masks/<name>.tif``
    (single-band class ids), matched by name. Each pair must share CRS, transform and shape;
    all images must have the same band count and dtype.

    Raises:
        DataNotFoundError: the folders are missing or empty, or an image has no mask.
        RasterMismatchError: an image and its mask are on different grids.
        BandMismatchError: band counts or dtypes differ between scenes, or a mask has several bands.
        GeoreferenceError: a raster lacks a CRS or is not north-up.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    layout_fix = "put images in ROOT/images/<name>.tif and masks in ROOT/masks/<name>.tif (see data/README.md)"
    if not images_dir.is_dir():
        raise DataNotFoundError(format_error(images_dir, "folder not found", layout_fix))
    images = list_rasters(images_dir)
    if not images:
        raise DataNotFoundError(format_error(images_dir, "no .tif files found", layout_fix))
    masks = list_rasters(masks_dir) if masks_dir.is_dir() else {}
    scenes: list[Scene] = []
    for name, image_path in images.items():
        image = read_info(image_path)
        check_georeferenced(image)
        mask = None
        if name in masks:
            mask = read_info(masks[name])
            if mask.count != 1:
                raise BandMismatchError(
                    format_error(mask.path, f"mask must have 1 band (found {mask.count})", "write class ids in a single band")
                )
            check_same_grid(image, mask)
        elif require_masks:
            raise DataNotFoundError(
                format_error(
                    masks_dir / f"{name}.tif",
                    f"mask for image {image_path} not found",
                    "add the mask with the same file name, or remove the image",
                )
            )
        scenes.append(Scene(name=name, image=image, mask=mask))
    first = scenes[0].image
    for scene in scenes[1:]:
        if (scene.image.count, scene.image.dtype) != (first.count, first.dtype):
            raise BandMismatchError(
                format_error(
                    scene.image.path,
                    f"band count/dtype differs from {first.path} (expected {first.count} x {first.dtype}, "
                    f"found {scene.image.count} x {scene.image.dtype})",
                    "give every scene the same bands in the same order and dtype",
                )
            )
    return scenes


def resolve_bands(bands: list[int] | None, count: int, source: str) -> list[int]:
    """Turn a band selection (1-based, as in GDAL) into a checked list; None selects all bands.

    Raises:
        ConfigError: an index is out of range or repeated.
    """
    if bands is None:
        return list(range(1, count + 1))
    bad = [b for b in bands if not 1 <= b <= count]
    if bad or len(set(bands)) != len(bands) or not bands:
        raise ConfigError(
            format_error(
                source,
                f"band selection {bands} is invalid for a raster with {count} bands "
                f"(expected distinct 1-based indices in 1..{count})",
                "fix data.bands in the config, or set it to null to use all bands",
            )
        )
    return list(bands)
