"""Synthetic land-cover scenes: seeded multi-band GeoTIFFs with masks, for the demo and the tests.

A scene is an argmax over smooth random per-class fields (regions tens of pixels wide, with
rough boundaries), overlaid with thin features: a winding river (water) and, when the urban
class is used, a few rectangular blocks and a straight road. Every class is forced to cover
at least ~5% of the valid pixels. Pixels get a reflectance-like spectral signature per class,
sampled at ``bands`` wavelengths, times a smooth illumination field and a fine texture, plus
Gaussian noise (~6% of the signal). Optional nodata is a slanted, irregular swath edge.

On disk, every image carries a nodata tag (0 for integer dtypes, -9999.0 for float32) whether
or not it has a nodata border; valid integer pixels are never 0. Masks are uint8 class ids
with 255 (the ignore index) under nodata, and no nodata tag.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine
from rich.progress import track

from geobp.choices import SynthDType
from geobp.atomic import atomic_path
from geobp.errors import ConfigError, format_error

CLASS_NAMES: tuple[str, ...] = (
    "water", "forest", "cropland", "urban", "bare_soil", "grassland", "wetland", "snow",
)
IGNORE_INDEX = 255
DType = SynthDType
DTYPES: tuple[str, ...] = get_args(DType)
NODATA: dict[str, float] = {"uint8": 0, "uint16": 0, "int16": 0, "float32": -9999.0}
_SCALE: dict[str, float] = {"uint8": 255.0, "uint16": 10000.0, "int16": 10000.0, "float32": 1.0}

# Reflectance (0..1) of each class at anchor wavelengths in micrometres (blue .. SWIR2).
_ANCHOR_WL = np.array([0.49, 0.56, 0.665, 0.705, 0.842, 1.61, 2.19])
_SIGNATURES = np.array([
    [0.070, 0.060, 0.040, 0.030, 0.020, 0.010, 0.005],  # water: dark, falling into NIR
    [0.030, 0.050, 0.030, 0.080, 0.320, 0.150, 0.070],  # forest: red edge, moderate NIR
    [0.050, 0.100, 0.050, 0.150, 0.480, 0.240, 0.120],  # cropland: strong NIR
    [0.160, 0.180, 0.200, 0.210, 0.240, 0.280, 0.260],  # urban: bright and flat
    [0.090, 0.130, 0.190, 0.220, 0.270, 0.380, 0.340],  # bare soil: rising into SWIR
    [0.060, 0.090, 0.090, 0.130, 0.300, 0.320, 0.220],  # grassland: weak edge, bright SWIR
    [0.050, 0.060, 0.050, 0.070, 0.160, 0.070, 0.040],  # wetland: dark, small NIR bump
    [0.850, 0.850, 0.820, 0.800, 0.720, 0.100, 0.060],  # snow: very bright, dark SWIR
])
_TEXTURE = np.array([0.02, 0.06, 0.05, 0.08, 0.04, 0.05, 0.04, 0.02])  # per-class texture amplitude
_SIX_BANDS = {"blue": 0.49, "green": 0.56, "red": 0.665, "nir": 0.842, "swir1": 1.61, "swir2": 2.19}
_MIN_FRACTION = 0.05  # of valid pixels, per class


def _check(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(format_error(None, problem, fix))


def band_names(bands: int) -> list[str]:
    """Names of the bands: blue .. swir2 for 6 bands, ``B1`` .. ``Bn`` otherwise."""
    return list(_SIX_BANDS) if bands == 6 else [f"B{i + 1}" for i in range(bands)]


def spectral_signatures(bands: int, classes: int) -> np.ndarray:
    """Mean reflectance (0..1) of each class in each band, float32 [classes, bands]."""
    if bands == 6:
        wl = np.array(list(_SIX_BANDS.values()))
    else:
        pos = np.linspace(0, len(_ANCHOR_WL) - 1, bands) if bands > 1 else np.array([2.0])
        wl = np.interp(pos, np.arange(len(_ANCHOR_WL)), _ANCHOR_WL)
    return np.stack([np.interp(wl, _ANCHOR_WL, s) for s in _SIGNATURES[:classes]]).astype(np.float32)


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigmas: tuple[float, ...],
            weights: tuple[float, ...]) -> np.ndarray:
    """Unit-variance noise fields [..., H, W] blurred by a weighted sum of Gaussians (via FFT)."""
    h, w = shape[-2:]
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f2 = fy**2 + fx**2
    kernel = sum(wt * np.exp(-2 * np.pi**2 * s**2 * f2) for s, wt in zip(sigmas, weights))
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(h, w)).astype(np.float32)
    field -= field.mean(axis=(-2, -1), keepdims=True)
    return field / (field.std(axis=(-2, -1), keepdims=True) + 1e-12)


def _features(rng: np.random.Generator, size: int, classes: int) -> np.ndarray:
    """Thin features as a class map, -1 where none: urban blocks and a road, then a river."""
    out = np.full((size, size), -1, dtype=np.int16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if classes > 3:  # urban blocks and a straight road
        for _ in range(rng.integers(2, 5)):
            bh, bw = rng.integers(size // 32 + 4, size // 10 + 8, size=2)
            y0, x0 = rng.integers(0, size - bh), rng.integers(0, size - bw)
            out[y0:y0 + bh, x0:x0 + bw] = 3
        angle, offset = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7) * size
        dist = np.abs((xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle) - offset + size / 2)
        out[dist < 1.0 + size / 512] = 3
    # River: a winding curve across the scene, horizontally or vertically.
    along, across = (xx, yy) if rng.random() < 0.5 else (yy, xx)
    t = np.arange(size, dtype=np.float32)
    centre = rng.uniform(0.25, 0.75) * size + rng.uniform(0.04, 0.1) * size * np.sin(
        2 * np.pi * t / rng.uniform(0.4, 1.0) / size + rng.uniform(0, 2 * np.pi))
    width = rng.uniform(2.0, 4.0) * max(1.0, size / 512)
    out[np.abs(across - centre[along.astype(np.int64)]) < width] = 0
    return out


def _nodata_region(rng: np.random.Generator, size: int, percent: int) -> np.ndarray:
    """Boolean [size, size]: an irregular slanted swath edge covering ``percent``% of the scene."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    dist = xx * np.cos(angle) + yy * np.sin(angle)
    dist += _smooth(rng, (size, size), (size / 16,), (1.0,)) * size / 64  # ragged edge
    return dist > np.quantile(dist, 1 - percent / 100)


def _check_scene_args(size: int, bands: int, classes: int, dtype: str, nodata_border: int) -> None:
    _check(size >= 16, f"size must be at least 16 pixels (found {size})", "pass size >= 16")
    _check(bands >= 1, f"bands must be at least 1 (found {bands})", "pass bands >= 1")
    _check(1 <= classes <= len(CLASS_NAMES), f"classes must be in 1..{len(CLASS_NAMES)} (found {classes})",
           f"pass classes between 1 and {len(CLASS_NAMES)}")
    _check(dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (found {dtype!r})",
           "pick one of the supported dtypes")
    _check(0 <= nodata_border <= 50, f"nodata_border must be a percent in 0..50 (found {nodata_border})",
           "pass nodata_border between 0 and 50")


def make_scene(size: int, bands: int, classes: int, *, seed: int, dtype: DType = "uint16",
               nodata_border: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic scene.

    Args:
        size: height and width in pixels (>= 16).
        bands: number of spectral bands (>= 1).
        classes: number of classes used, the first ``classes`` of ``CLASS_NAMES``.
        seed: random seed; the same seed gives identical arrays.
        dtype: uint16/int16 (reflectance x 10000), uint8 (x 255) or float32 (reflectance 0..1).
        nodata_border: percent of the scene (0..50) under a slanted nodata edge; 0 for none.

    Returns:
        image [bands, size, size] of ``dtype`` (``NODATA[dtype]`` under the border) and
        mask [size, size] uint8 class ids (255 under the border).

    Raises:
        ConfigError: an argument is out of range.
    """
    _check_scene_args(size, bands, classes, dtype, nodata_border)
    rng = np.random.default_rng(seed)
    valid = ~_nodata_region(rng, size, nodata_border) if nodata_border else np.ones((size, size), bool)
    fields = _smooth(rng, (classes, size, size), (20.0, 3.0), (1.0, 0.05))
    features = _features(rng, size, classes)
    fixed = features >= 0
    bias = np.zeros((classes, 1, 1), dtype=np.float32)
    for _ in range(60):  # raise the fields of rare classes until each has its share
        labels = np.where(fixed, features, np.argmax(fields + bias, axis=0))
        frac = np.bincount(labels[valid], minlength=classes)[:classes] / max(int(valid.sum()), 1)
        low = frac < _MIN_FRACTION
        if not low.any():
            break
        bias[low, 0, 0] += 0.1
    labels = labels.astype(np.uint8)

    signal = spectral_signatures(bands, classes)[labels].transpose(2, 0, 1)  # [bands, H, W]
    illumination = 1.0 + 0.06 * _smooth(rng, (size, size), (size / 4,), (1.0,)) + rng.uniform(-0.05, 0.05)
    texture = 1.0 + _TEXTURE[labels].astype(np.float32) * _smooth(rng, (size, size), (1.5,), (1.0,))
    signal *= illumination * texture
    signal += rng.standard_normal(signal.shape, dtype=np.float32) * (0.06 * signal + 0.002)

    nodata = NODATA[dtype]
    if dtype == "float32":
        image = np.clip(signal, 0.0, 1.0)
    else:
        image = np.clip(np.rint(signal * _SCALE[dtype]), 1, _SCALE[dtype]).astype(dtype)
    image[:, ~valid] = nodata
    labels[~valid] = IGNORE_INDEX
    return image, labels


def _write_atomic(path: Path, array: np.ndarray, profile: dict, descriptions: list[str] | None,
                  tags: dict[str, str]) -> None:
    """Write ``array`` [bands, H, W] to a temporary file beside ``path``, then move it into place."""
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            dst.descriptions = tuple(descriptions)
        dst.update_tags(**tags)


def write_scenes(out: str | Path, *, scenes: int = 4, size: int = 512, bands: int = 6, classes: int = 5,
                 seed: int = 0, dtype: DType = "uint16", block_size: int = 256, nodata_every: int = 2,
                 crs: str = "EPSG:32633", pixel_size: float = 10.0, progress: bool = False) -> list[Path]:
    """Write scenes as tiled, deflate-compressed GeoTIFFs, overwriting existing ones.

    Scene ``i`` goes to ``out/images/scene_{i:03d}.tif`` and ``out/masks/scene_{i:03d}.tif``,
    north-up at origin (400000 + i * size * pixel_size, 5500000). Scenes with
    ``i % nodata_every == 1`` get a nodata border over 10..20% of the scene.

    Args:
        out: output folder (created if missing).
        scenes: number of scenes.
        size, bands, classes, dtype: as in ``make_scene``.
        seed: base seed; each scene derives its own from (seed, i).
        block_size: tile size, a multiple of 16 (reduced to fit small scenes).
        nodata_every: period of scenes with a nodata border; 0 for none.
        crs: projected CRS of the scenes.
        pixel_size: pixel size in CRS units.
        progress: show a progress bar over scenes.

    Returns:
        The image paths, in scene order.

    Raises:
        ConfigError: an argument is out of range or the CRS is not projected.
    """
    _check_scene_args(size, bands, classes, dtype, 0)
    _check(scenes >= 0, f"scenes must be >= 0 (found {scenes})", "pass scenes >= 0")
    _check(block_size >= 16 and block_size % 16 == 0,
           f"block_size must be a positive multiple of 16 (found {block_size})", "pass e.g. block_size=256")
    _check(nodata_every >= 0, f"nodata_every must be >= 0 (found {nodata_every})", "pass 0 for no nodata")
    _check(pixel_size > 0, f"pixel_size must be positive (found {pixel_size})", "pass e.g. pixel_size=10.0")
    try:
        crs_obj = CRS.from_user_input(crs)
    except CRSError as err:
        raise ConfigError(format_error(None, f"crs {crs!r} is not a valid CRS ({err})",
                                       "pass e.g. crs='EPSG:32633'")) from err
    _check(crs_obj.is_projected, f"crs must be projected (found {crs!r})", "pass a UTM CRS such as EPSG:32633")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    block = min(block_size, size // 16 * 16)
    base = {"driver": "GTiff", "height": size, "width": size, "crs": crs_obj, "tiled": True,
            "blockxsize": block, "blockysize": block, "compress": "deflate"}
    paths = []
    for i in track(range(scenes), description="Writing scenes", disable=not progress):
        scene_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        border = 10 + scene_seed % 11 if nodata_every > 0 and i % nodata_every == 1 else 0
        image, mask = make_scene(size, bands, classes, seed=scene_seed, dtype=dtype, nodata_border=border)
        transform = Affine(pixel_size, 0.0, 400000.0 + i * size * pixel_size, 0.0, -pixel_size, 5500000.0)
        name = f"scene_{i:03d}.tif"
        image_profile = {**base, "count": bands, "dtype": dtype, "transform": transform,
                         "nodata": NODATA[dtype], "predictor": 3 if dtype == "float32" else 2}
        _write_atomic(out / "images" / name, image, image_profile, band_names(bands),
                      {"SCENE_SEED": str(scene_seed), "NODATA_PERCENT": str(border)})
        mask_profile = {**base, "count": 1, "dtype": "uint8", "transform": transform}
        _write_atomic(out / "masks" / name, mask[None], mask_profile, None,
                      {"CLASS_NAMES": ",".join(CLASS_NAMES[:classes]), "IGNORE_INDEX": str(IGNORE_INDEX)})
        paths.append(out / "images" / name)
    return paths
