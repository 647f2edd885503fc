"""The tile dataset: a :class:`TileSpec` in, a compact sample out; :func:`finish_batch` makes the contract.

Batch contract (what every model, task and callback relies on):

- ``image``: float32 [B, C, H, W], normalised, nodata pixels set to 0;
- ``mask``: int64 [B, H, W], class ids, ``ignore_index`` on nodata and padding;
- ``scene``: list of B scene names;
- ``window``: int64 [B, 4] as (row_off, col_off, height, width) of the tile in its scene
  (height/width are the part inside the raster; the rest of the tile is padding);
- ``skipped``: int64 scalar, tiles of the batch dropped because they failed to read.

DataLoader workers send a compact form of it, less than half the bytes through shared memory:
``raw`` (the pixels in the file's dtype, e.g. uint16 [B, C, H, W], augmented but not normalised)
in place of ``image``, and ``mask`` as uint8 (see :func:`mask_dtype`). :func:`finish_batch`
turns a compact batch into the contract, on whatever device the batch is on;
:class:`~geobp.data.datamodule.GeoTiffDataModule` calls it in ``on_after_batch_transfer``, after
Lightning moved the batch to the GPU. Normalising there is exact: the flips and rotations act on
pixel positions only, and the normalisation on each pixel alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset, default_collate

from geobp.classes import invalid_labels, mask_dtype
from geobp.data.preprocessing import Preprocessing, valid_pixels
from geobp.errors import LabelError, RasterReadError, format_error
from geobp.handles import HandleCache
from geobp.raster import read_window

if TYPE_CHECKING:  # samplers import this module
    from geobp.data.samplers import Redraw

Sample = dict[str, Any]
#: augment(image HWC, mask HW, seed) -> (image, mask); seed -1 means unseeded
Augment = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class TileSpec(NamedTuple):
    """Which pixels to read: a window of one scene. Samplers yield these; the dataset reads them.

    ``aug_seed`` (>= 0) seeds this tile's augmentation, so that a tile is augmented the same way
    whichever worker reads it and whether or not the run was resumed; -1 leaves the
    augmentation's own generator running.
    """

    scene: int
    row: int
    col: int
    height: int
    width: int
    aug_seed: int = -1

    @property
    def window(self) -> Window:
        """The rasterio window."""
        return Window(self.col, self.row, self.width, self.height)


class TileDataset(Dataset[Sample]):
    """Reads tiles of image/mask pairs given by :class:`TileSpec` (map-style, keyed by spec).

    A sample is compact (see the module docstring): ``raw`` [C, H, W] in the file's dtype, the
    ``mask`` [H, W] in :func:`mask_dtype` with ``ignore_index`` on nodata and padding, ``scene``
    and ``window``. :func:`finish_batch` normalises it.

    File handles are opened lazily in the process that reads (each DataLoader worker opens its
    own) and kept open in a bounded :class:`~geobp.handles.HandleCache` (least recently used
    closed first, sized from the process's open-files limit); they are never pickled.

    Args:
        images: image paths, indexed by ``TileSpec.scene``.
        masks: mask paths (same order), or None for unlabelled data.
        names: scene names, same order.
        preprocessing: band selection, nodata and normalization.
        tile_size: output tile size; windows smaller than this are padded bottom/right.
        num_classes: number of classes; mask values must be in ``[0, num_classes)`` or ``ignore_index``.
        ignore_index: label of pixels excluded from loss and metrics.
        augment: optional joint augmentation of (raw image HWC, mask HW). It runs before
            normalisation, so it must commute with it per pixel (flips, rotations, crops).
        on_read_error: ``stop`` raises on a block that fails to decode; ``skip`` warns (naming
            the scene and window) and drops the tile from its batch; the batch's ``skipped``
            entry counts the dropped tiles.
        redraw: read-time rejection of tiles with too much nodata in the scenes it names (see
            :class:`~geobp.data.samplers.Redraw`); None reads every tile as asked.
    """

    def __init__(
        self,
        images: list[str],
        masks: list[str] | None,
        names: list[str],
        preprocessing: Preprocessing,
        tile_size: int,
        num_classes: int,
        ignore_index: int = 255,
        augment: Augment | None = None,
        on_read_error: Literal["stop", "skip"] = "stop",
        redraw: Redraw | None = None,
    ) -> None:
        self.images = images
        self.masks = masks
        self.names = names
        self.preprocessing = preprocessing
        self.tile_size = tile_size
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.augment = augment
        self.on_read_error = on_read_error
        self.redraw = redraw
        self._handles = HandleCache()  # pickled empty: each worker opens its own

    def _open(self, path: str) -> rasterio.DatasetReader:
        return self._handles.get(path)

    def close(self) -> None:
        """Close the file handles this process opened."""
        self._handles.close()

    def __len__(self) -> int:
        # Samples are addressed by TileSpec, not by position; samplers define the epoch length.
        raise TypeError("TileDataset is indexed by TileSpec; use it with a geobp tile sampler")

    def __getitem__(self, spec: TileSpec) -> Sample | None:
        try:
            return self._read(spec)
        except RasterReadError as err:
            if self.on_read_error == "stop":
                raise
            warnings.warn(f"skipping tile of scene {self.names[spec.scene]}: {err}", RuntimeWarning, stacklevel=2)
            return None

    def _read_image(self, spec: TileSpec) -> tuple[np.ndarray, np.ndarray]:
        """The tile's raw bands [C, t, t] (padded) and its valid pixels [t, t] (False in the padding)."""
        t = self.tile_size
        pre = self.preprocessing
        src = self._open(self.images[spec.scene])
        fill = pre.nodata if pre.nodata is not None else 0
        raw = read_window(src, Window(spec.col, spec.row, t, t), pre.bands, fill=fill)
        valid = valid_pixels(raw, pre.nodata)
        valid[spec.height :, :] = False  # padding outside the raster
        valid[:, spec.width :] = False
        return raw, valid

    def _accepted(self, spec: TileSpec) -> tuple[TileSpec, np.ndarray, np.ndarray]:
        """The tile to use for ``spec``: itself, or under read-time rejection the first replacement
        with enough valid pixels (the last one tried when none has)."""
        raw, valid = self._read_image(spec)
        r = self.redraw
        if r is None or spec.scene not in r.scenes:
            return spec, raw, valid
        for attempt in range(1, r.tries + 1):
            if valid[: spec.height, : spec.width].mean() >= r.min_valid:
                break
            spec = r.replace(spec, attempt)
            raw, valid = self._read_image(spec)
        return spec, raw, valid

    def _read(self, spec: TileSpec) -> Sample:
        t = self.tile_size
        spec, raw, valid = self._accepted(spec)
        window = Window(spec.col, spec.row, t, t)
        mask_type = mask_dtype(self.num_classes, self.ignore_index)
        if self.masks is not None:
            msrc = self._open(self.masks[spec.scene])
            mask = read_window(msrc, window, 1)  # padding becomes ignore_index below (not valid)
            self._check_labels(mask, spec)
            mask = mask.astype(mask_type)
            mask[~valid] = self.ignore_index
        else:
            mask = np.where(valid, 0, self.ignore_index).astype(mask_type)
        if self.augment is not None:
            hwc, mask = self.augment(np.ascontiguousarray(raw.transpose(1, 2, 0)), mask, spec.aug_seed)
            raw = hwc.transpose(2, 0, 1)
        return {
            "raw": torch.from_numpy(np.ascontiguousarray(raw)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=mask_type)),
            "scene": self.names[spec.scene],
            "window": torch.tensor([spec.row, spec.col, spec.height, spec.width], dtype=torch.int64),
        }

    def _check_labels(self, mask: np.ndarray, spec: TileSpec) -> None:
        mask = mask.astype(np.int64, copy=False)  # checked in the file's values, before the compact cast
        bad = invalid_labels(mask, self.num_classes, self.ignore_index)
        if bad.any():
            values = sorted(set(np.unique(mask[bad]).tolist()))[:5]
            raise LabelError(
                format_error(
                    self.masks[spec.scene] if self.masks else None,
                    f"mask values {values} in window (row {spec.row}, col {spec.col}) are outside the "
                    f"{self.num_classes} classes and the ignore index {self.ignore_index}",
                    "set data.num_classes to cover every label, or recode those pixels to the ignore index",
                )
            )


def finish_batch(batch: dict[str, Any], preprocessing: Preprocessing) -> dict[str, Any]:
    """Turn a compact batch (as the loaders yield it) into the batch contract, on its device.

    ``raw`` is normalised into a float32 ``image`` (:meth:`Preprocessing.normalize_tensor`) and
    the mask becomes int64. A batch already in the contract, or one that holds only
    ``skipped``, is returned unchanged, so calling this twice is harmless.

    Args:
        batch: a batch from a geobp DataLoader, on any device; changed in place.
        preprocessing: the preprocessing the tiles were read with (``TileDataset.preprocessing``).

    Returns:
        The same dict, in the batch contract.
    """
    if "raw" in batch:
        batch["image"], _ = preprocessing.normalize_tensor(batch.pop("raw"))
    mask = batch.get("mask")
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.int64:
        if mask.device.type == "cpu":
            # numpy, single-threaded: torch's parallel kernels leave their threads spinning, taking
            # the cores from the DataLoader workers
            batch["mask"] = torch.from_numpy(mask.numpy().astype(np.int64))
        else:
            batch["mask"] = mask.long()
    return batch


def collate_tiles(samples: Sequence[Sample | None]) -> dict[str, Any]:
    """Collate samples into the batch contract, dropping tiles that failed to read.

    The batch gets ``skipped`` (int64 scalar tensor), the number of dropped tiles. A batch whose
    tiles all failed holds only ``skipped``; the task skips it.
    """
    kept = [s for s in samples if s is not None]
    batch: dict[str, Any] = default_collate(kept) if kept else {}
    batch["skipped"] = torch.tensor(len(samples) - len(kept), dtype=torch.int64)
    return batch
