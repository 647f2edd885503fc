"""Band statistics and normalization: streamed over scenes, nodata-aware, cached next to the data.

A :class:`Preprocessing` is everything needed to turn raw pixels into model input. It is stored
in the checkpoint's hyperparameters (as a plain dict), so inference applies exactly the
training preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rasterio.windows import Window

from geobp.errors import CheckpointError, format_error
from geobp.atomic import atomic_path
from geobp.pretrained import PretrainedWeights, match_bands
from geobp.raster import open_raster, read_window
from geobp.sources.locations import cache_root as cache_root_for
from geobp.sources.locations import file_stamp, file_stem, location

NormMethod = Literal["meanstd", "percentile"]

#: Downsampling factor of the per-scene validity map (valid-pixel fraction per cell of this size).
VALIDITY_FACTOR = 8
#: Pixels per scene kept (at random) for percentile estimates.
PERCENTILE_SAMPLES = 100_000
CACHE_DIR = ".geobp_cache"
CACHE_VERSION = 1


def valid_pixels(image: np.ndarray, nodata: float | None) -> np.ndarray:
    """Boolean [H, W]: pixels that are finite in every band and not nodata in all bands.

    A pixel counts as nodata only when every band holds the nodata value, so that a legitimate
    zero in one band (dark water in the near infrared, say) is not thrown away.
    """
    valid = np.ones(image.shape[-2:], dtype=bool)
    if np.issubdtype(image.dtype, np.floating):
        valid &= np.isfinite(image).all(axis=0)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        valid &= ~(image == np.asarray(nodata, dtype=image.dtype)).all(axis=0)
    return valid


@dataclass
class SceneStats:
    """Per-scene, all-band statistics from one streaming pass (what the cache holds)."""

    count: np.ndarray  # [bands] valid pixels
    total: np.ndarray  # [bands] sum over valid pixels (float64)
    total_sq: np.ndarray  # [bands] sum of squares
    sample: np.ndarray  # [bands, n] random valid pixels, for percentiles
    validity: np.ndarray  # [ceil(H/f), ceil(W/f)] float32 valid fraction per cell


def scan_scene(path: str | Path, nodata: float | None, seed: int = 0, chunk_rows: int = 512) -> SceneStats:
    """Stream over a raster in row chunks and gather its band statistics and validity map.

    Raises:
        RasterReadError: the file cannot be read; the message names the file and window.
    """
    f = VALIDITY_FACTOR
    with open_raster(path) as src:
        nodata = src.nodata if nodata is None else nodata
        h, w, c = src.height, src.width, src.count
        block_h = src.block_shapes[0][0]
        step = max(f, (max(chunk_rows, block_h) // math.lcm(block_h, f)) * math.lcm(block_h, f))
        rng = np.random.default_rng(seed)
        keep_p = min(1.0, PERCENTILE_SAMPLES / max(h * w, 1))
        count = np.zeros(c, np.int64)
        total = np.zeros(c, np.float64)
        total_sq = np.zeros(c, np.float64)
        samples: list[np.ndarray] = []
        validity = np.zeros((-(-h // f), -(-w // f)), np.float32)
        for row in range(0, h, step):
            rows = min(step, h - row)
            data = read_window(src, Window(0, row, w, rows))
            valid = valid_pixels(data, nodata)
            pix = data[:, valid].astype(np.float64)
            count += pix.shape[1]
            total += pix.sum(axis=1)
            total_sq += np.square(pix).sum(axis=1)
            if pix.shape[1]:
                pick = rng.random(pix.shape[1]) < keep_p
                samples.append(pix[:, pick].astype(np.float32))
            padded = np.zeros((-(-rows // f) * f, validity.shape[1] * f), np.float32)
            padded[:rows, :w] = valid
            cells = padded.reshape(padded.shape[0] // f, f, -1, f).mean(axis=(1, 3))
            validity[row // f : row // f + cells.shape[0]] = cells
    sample = np.concatenate(samples, axis=1) if samples else np.zeros((c, 0), np.float32)
    return SceneStats(count, total, total_sq, sample, validity)


def _cache_key(path: str | Path, nodata: float | None) -> str:
    raw = f"{CACHE_VERSION}|{file_stamp(path)}|{nodata}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def scene_cache_file(path: str | Path, nodata: float | None, cache_root: str | Path | None = None) -> Path:
    """Where :func:`load_scene_stats` keeps the statistics of ``path`` (keyed by its
    :func:`~geobp.sources.locations.file_stamp`; for remote data in the local cache folder)."""
    path = location(path)
    return cache_root_for([path], cache_root) / CACHE_DIR / f"{file_stem(path)}.{_cache_key(path, nodata)}.npz"


def load_scene_stats(path: str | Path, nodata: float | None, cache_root: str | Path | None = None) -> SceneStats:
    """:func:`scan_scene` with an on-disk cache in ``cache_root/.geobp_cache`` (keyed by file size and mtime).

    The cache file is written to a temporary name and renamed, so concurrent ranks never read a
    half-written cache. A cache folder that is not writable is skipped silently (stats are recomputed).
    """
    path = location(path)
    cache_file = scene_cache_file(path, nodata, cache_root)
    if cache_file.exists():
        try:
            with np.load(cache_file) as z:
                return SceneStats(**{k: z[k] for k in SceneStats.__dataclass_fields__})
        except (OSError, ValueError, KeyError):
            pass  # a broken cache entry is recomputed below
    stats = scan_scene(path, nodata)
    try:
        with atomic_path(cache_file, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **asdict(stats))
    except OSError:
        pass
    return stats


@dataclass
class Preprocessing:
    """Band selection, nodata and normalization: raw pixels in, model input out.

    Attributes:
        bands: 1-based band indices read from the images.
        nodata: value marking missing pixels (in every band), or None.
        method: ``meanstd`` (standardise) or ``percentile`` (clip to [low, high] and scale to [0, 1]).
        mean, std: per selected band, for ``meanstd``.
        low, high: per selected band, for ``percentile``.
        dtype: data type of the training images (inference refuses another), when known.
        statistics: how the statistics were gathered (blocks and pixels read, budget, seed,
            whether exact; see :mod:`geobp.data.bandstats`); empty in older checkpoints.
        band_names: one name per selected band (the files' band descriptions or
            ``data.band_names``; ``band_<i>`` when neither names it); empty in older checkpoints.
    """

    bands: list[int]
    nodata: float | None = None
    method: NormMethod = "meanstd"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    dtype: str | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    band_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and YAML-safe dict, as stored in checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> Preprocessing:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            CheckpointError: keys are missing or statistics do not match the band count.
        """
        try:
            pre = cls(**data)
        except TypeError as err:
            raise CheckpointError(
                format_error(source, f"preprocessing entry is malformed ({err})", "retrain with this geobp version")
            ) from err
        n = len(pre.bands)
        stats = (pre.mean, pre.std) if pre.method == "meanstd" else (pre.low, pre.high)
        if any(len(s) != n for s in stats):
            raise CheckpointError(
                format_error(source, f"normalization statistics do not cover the {n} bands", "retrain with this geobp version")
            )
        return pre

    def _constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Float32 per-band constants, shaped [C, 1, 1]: (offset, scale, clip high or None).

        ``meanstd``: ``(mean, 1/std, None)``; ``percentile``: ``(low, 1/(high-low), high)``, the
        pixels being clipped to [low, high] first. Both normalisations (numpy and torch) use them,
        so they compute the same float32 numbers.
        """
        if self.method == "meanstd":
            offset = np.asarray(self.mean, np.float32)[:, None, None]
            return offset, (1.0 / np.asarray(self.std, np.float32))[:, None, None], None
        low = np.asarray(self.low, np.float32)[:, None, None]
        high = np.asarray(self.high, np.float32)[:, None, None]
        return low, 1.0 / (high - low), high

    def normalization_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The float32 per-band constants of the normalisation, shaped [C, 1, 1]: (offset, scale,
        clip high or None); the normalised value is ``(clip(x, offset, high) - offset) * scale``.

        What an exported model (:mod:`geobp.inference.export`) builds into its graph, so that it
        computes the float32 numbers this class does.
        """
        return self._constants()

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalise raw pixels of the selected bands (numpy; what inference uses).

        Args:
            image: [C, H, W] raw values, C == len(bands).

        Returns:
            (float32 [C, H, W] normalised image with invalid pixels set to 0, bool [H, W] valid mask).
        """
        x = np.empty(image.shape, np.float32)
        return x, self._normalize_into(image, x)

    def _normalize_into(self, image: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Write the normalised ``image`` [C, H, W] into float32 ``x`` of the same shape; return the valid mask."""
        valid = valid_pixels(image, self.nodata)
        # One float32 copy, then in-place arithmetic: temporaries of a whole tile cost as much as
        # the arithmetic itself.
        np.copyto(x, image, casting="unsafe")
        offset, scale, high = self._constants()
        if high is not None:
            np.clip(x, offset, high, out=x)
        x -= offset
        x *= scale
        if not valid.all():
            np.copyto(x, 0.0, where=~valid)
        return valid

    def normalize_tensor(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` for a batch of tensors, on the tensor's device (a GPU, after batch transfer).

        Gives the same float32 values as :meth:`__call__`: the same validity rule (nodata in every
        band, or a non-finite band), the same constants and the same order of operations. On the
        CPU it runs :meth:`__call__`'s numpy code tile by tile: single-threaded and cache-sized, it
        is faster there than whole-batch torch operations, whose threads would compete with the
        DataLoader workers for the cores.

        Args:
            raw: [..., C, H, W] raw values of the selected bands in any dtype (uint8, uint16,
                int16, float32 ...); leading dimensions (the batch) are kept. Not modified.

        Returns:
            (float32 [..., C, H, W] normalised image with invalid pixels set to 0,
            bool [..., H, W] valid mask).
        """
        if raw.device.type != "cpu":
            return self._normalize_torch(raw)
        tiles = raw.detach().reshape((-1,) + tuple(raw.shape[-3:])).numpy()
        x = np.empty(tiles.shape, np.float32)
        valid = np.empty((tiles.shape[0],) + tiles.shape[-2:], bool)
        for i, tile in enumerate(tiles):
            valid[i] = self._normalize_into(tile, x[i])
        return torch.from_numpy(x).reshape(raw.shape), torch.from_numpy(valid).reshape(raw.shape[:-3] + raw.shape[-2:])

    def _device_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_constants` as tensors on ``device``, made once per device and statistics.

        A copy from pageable host memory to a GPU waits for the GPU's queued work: made for every
        batch, it would stall the training loop once per step.
        """
        key = (str(device), self.method, *(tuple(v) for v in (self.mean, self.std, self.low, self.high)))
        cache = self.__dict__.setdefault("_on_device", {})
        if key not in cache:
            cache[key] = tuple(None if a is None else torch.from_numpy(a).to(device) for a in self._constants())
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        # device tensors stay in this process (DataLoader workers get the statistics only)
        state = self.__dict__.copy()
        state.pop("_on_device", None)
        return state

    def _normalize_torch(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`normalize_tensor` in torch operations on the tensor's device (GPUs)."""
        # Work in float32 from the start: integer pixels are exact in it, and comparisons of
        # uint16 tensors are not implemented on every device.
        x = raw.to(dtype=torch.float32, copy=True)
        # Band-wise extremes decide both rules at once, and reduce faster than all() over bands:
        # every band is nodata iff max == min == nodata; a NaN or +-inf band makes max or min non-finite.
        top, bottom = x.amax(dim=-3), x.amin(dim=-3)
        valid = torch.ones_like(top, dtype=torch.bool)
        if raw.is_floating_point():
            valid &= torch.isfinite(top) & torch.isfinite(bottom)
        nodata = self.nodata
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            # the nodata value as the raw dtype holds it (as valid_pixels compares), then as float32
            np_dtype = torch.empty(0, dtype=raw.dtype).numpy().dtype
            value = float(np.asarray(nodata, dtype=np_dtype).astype(np.float32))
            valid &= (top != value) | (bottom != value)
        offset, scale, high = self._device_constants(x.device)
        if high is not None:
            torch.clamp(x, offset, high, out=x)
        x.sub_(offset).mul_(scale)
        x.masked_fill_(~valid.unsqueeze(-3), 0.0)
        return x, valid


def combine_stats(
    stats: Sequence[SceneStats],
    bands: list[int],
    nodata: float | None,
    method: NormMethod = "meanstd",
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> Preprocessing:
    """Combine per-scene statistics (of the training scenes) into a :class:`Preprocessing`.

    A band with no variation gets std (or range) 1, so that it normalises to 0 rather than NaN.
    """
    idx = [b - 1 for b in bands]
    count = np.sum([s.count[idx] for s in stats], axis=0).astype(np.float64)
    total = np.sum([s.total[idx] for s in stats], axis=0)
    total_sq = np.sum([s.total_sq[idx] for s in stats], axis=0)
    n = np.maximum(count, 1)
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6 * np.maximum(np.abs(mean), 1.0)] = 1.0
    pre = Preprocessing(bands=list(bands), nodata=nodata, method=method, mean=mean.tolist(), std=std.tolist())
    if method == "percentile":
        sample = np.concatenate([s.sample[idx] for s in stats], axis=1)
        if sample.shape[1] == 0:
            low, high = np.zeros(len(idx)), np.ones(len(idx))
        else:
            low, high = np.percentile(sample, percentiles, axis=1)
        high = np.where(high - low > 0, high, low + 1.0)
        pre.low, pre.high = low.tolist(), high.tolist()
    return pre


def window_valid_fraction(validity: np.ndarray, window: Window) -> float:
    """Mean valid fraction over the validity-map cells a window touches."""
    f = VALIDITY_FACTOR
    r0, c0 = int(window.row_off) // f, int(window.col_off) // f
    r1 = -(-int(window.row_off + window.height) // f)
    c1 = -(-int(window.col_off + window.width) // f)
    cells = validity[max(r0, 0) : r1, max(c0, 0) : c1]
    return float(cells.mean()) if cells.size else 0.0



def pretrained_normalization(data_stats: Preprocessing, band_names: Sequence[str], weights: PretrainedWeights) -> Preprocessing:
    """The data's preprocessing with pretrained weights' own normalisation (``meanstd``).

    Each selected band that the weights know (matched by name, :func:`geobp.pretrained.match_bands`)
    gets the weights' mean and std of that band, e.g. ``(x - 0) / 10000`` for SSL4EO Sentinel-2.
    A band the weights lack gets the weights' normalisation when it is the same for every band
    (a sensor-wide scale), and otherwise the data's own mean and std.

    Args:
        data_stats: the ``meanstd`` preprocessing computed from the training scenes.
        band_names: one name per selected band.
        weights: the pretrained weights.

    Returns:
        A copy of ``data_stats`` with the weights' means and stds.

    Raises:
        ConfigError: fewer than half of the bands are in the weights.
    """
    matched = match_bands(band_names, weights)
    uniform = len(set(zip(weights.mean, weights.std))) == 1
    mean, std = [], []
    for j, i in enumerate(matched):
        if i is None and not uniform:
            mean.append(data_stats.mean[j])
            std.append(data_stats.std[j])
        else:
            mean.append(weights.mean[0 if i is None else i])
            std.append(weights.std[0 if i is None else i])
    return dataclasses.replace(data_stats, method="meanstd", mean=mean, std=std, low=[], high=[],
                               band_names=list(band_names))
