"""``GeoTiffDataModule``: scenes on disk to train/val/test DataLoaders of tiles, DDP-aware.

The constructor turns the flat ``data.<name>`` options into frozen groups once
(:mod:`geobp.data.options`); the work is done by the modules below it: scenes and labels
(:mod:`~geobp.data.scenes`, :mod:`~geobp.data.alignment`), band names
(:mod:`~geobp.data.bandnames`), splits (:mod:`~geobp.data.splits`), statistics and validity
(:mod:`~geobp.data.bandstats`, :mod:`~geobp.data.validity`), tile places
(:mod:`~geobp.data.places`, :mod:`~geobp.data.classbalance`) and loaders (:mod:`~geobp.data.loader`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from rasterio.windows import Window
from torch.utils.data import DataLoader

from geobp.data.alignment import find_labelled_scenes
from geobp.data.bandnames import pretrained_for, resolve_band_names
from geobp.data.bandstats import BandStats, load_band_stats
from geobp.data.classbalance import balanced_weights, expected_shares, load_cell_histograms, place_class_counts, window_class_counts
from geobp.data.dataset import TileDataset, TileSpec, finish_batch
from geobp.data.labels import LabelOptions, LabelReport
from geobp.data.loader import tile_loader
from geobp.data.options import (
    LoaderOptions, ReadErrorPolicy, SamplingMode, SamplingOptions, SplitMode, SplitOptions, StatsOptions, TilingOptions,
    check_split_tiles,
)
from geobp.data.places import grid_tiles, train_places
from geobp.data.preprocessing import NormMethod, Preprocessing, combine_stats, pretrained_normalization
from geobp.data.samplers import GridTileSampler, RandomTileSampler, Redraw, SceneCells
from geobp.data.scenes import Scene, find_scenes, resolve_bands
from geobp.data.splits import Split, split_regions
from geobp.data.transforms import Augment
from geobp.data.validity import ValidityMode, validity_maps
from geobp.errors import ConfigError, format_error
from geobp.pretrained import PretrainedWeights
from geobp.processes import StartMethod
from geobp.sources.imagery import resolve_images
from geobp.sources.stack import warp_block_for
from geobp.sources.locations import cache_root, folder_of, join, location, redacted
from geobp.sources.urls import is_remote

__all__ = ["GeoTiffDataModule", "Split"]


#: The options that name files (URLs among them): redacted where they are written down.
PATH_OPTIONS = ("root", "images", "labels")


class GeoTiffDataModule(L.LightningDataModule):
    """Tiles of multi-band GeoTIFF scenes with label masks, for segmentation.

    The dataset folder ``root`` holds ``images/<name>.tif`` and ``masks/<name>.tif``; or ``images``
    and ``labels`` name the files, with labels in any form :mod:`geobp.data.labels` accepts (label
    rasters on other grids paired by footprint, one land-cover map, a vector file), aligned once
    onto each image's grid into the cache. Each scene is tiled in
    its own CRS and grid. Training draws ``tiles_per_epoch`` random tiles aligned to the files'
    internal blocks; validation and test use a grid that covers their part of every scene. Under
    DDP every rank gets a disjoint share of the tiles.

    The DataLoaders yield compact batches (raw pixels in the file's dtype under ``raw``, uint8
    masks: see :mod:`geobp.data.dataset`); :meth:`on_after_batch_transfer`, which Lightning calls
    once the batch is on the device, normalises them into the batch contract (float32 ``image``,
    int64 ``mask``). Lightning calls it when the trainer is given this data module
    (``trainer.fit(task, datamodule=dm)``); a loop of your own calls it on each batch.

    The flat options below (``data.<name>`` in configs) are turned once, in the constructor,
    into the frozen groups of :mod:`geobp.data.options`, kept as attributes and passed whole to
    the modules that use them; each value is checked there, once.

    Attributes:
        label_options: :class:`~geobp.data.labels.LabelOptions` (``num_classes`` to ``all_touched``).
        tiling_options: :class:`~geobp.tiling.TilingOptions` (``tile_size``, ``overlap``).
        sampling_options: :class:`~geobp.data.options.SamplingOptions` (``tiles_per_epoch`` to ``augment``).
        split_options: :class:`~geobp.data.options.SplitOptions` (``split`` to ``split_block_size``).
        stats_options: :class:`~geobp.data.options.StatsOptions` (``normalization`` to ``validity``).
        loader_options: :class:`~geobp.data.options.LoaderOptions` (``batch_size`` to ``worker_start``).

    Args:
        root: dataset folder (``root/images`` and ``root/masks``, matched by name); with
            ``images``/``labels`` set it is only where the cache goes.
        images: a folder, glob or list of GeoTIFFs (one scene per file); ``root/images`` when None.
        labels: label rasters (folder, glob or list; any grid and CRS, paired with the images by
            footprint), one label map covering many images, or a vector file in any CRS;
            ``root/masks`` matched by name when None and ``images`` is None.
        bands: 1-based band indices to use; all bands when None.
        band_names: one name per band of the files (before ``bands`` selects some), for files
            without band descriptions; overrides the descriptions when given.
        pretrained_weights: the encoder's torchgeo weights name (the CLI links it from
            ``model.weights``; a local file path is ignored): its bands are matched with
            :attr:`band_names` and its normalisation is the default. The data module reads the
            weights' metadata only (:mod:`geobp.pretrained`), never the model.
        cache_dir: where statistics, validity maps, class histograms and aligned labels are cached; ``root`` when None,
            or for remote data (URLs) the local ``$XDG_CACHE_HOME/geobp`` (``~/.cache/geobp``).
        num_classes: number of classes (required); mask values are ``0..num_classes-1`` or ``ignore_index``.
        class_names: names for logs and outputs; ``class_<i>`` when None.
        ignore_index: label excluded from loss and metrics (nodata pixels get it too).
        label_map: raw label value to class id or ``ignore_index``, e.g. ``{-1: 255}``.
        label_field: for vector labels, the attribute holding the class (an integer id or a name
            in ``class_names``); every feature is class 1 when None.
        label_background: for vector labels, the class of pixels outside every feature; the
            ignore index when None.
        all_touched: for vector labels, label every pixel a feature touches (thin features).
        tile_size: tile size in pixels (square).
        overlap: overlap of the evaluation grid tiles, in pixels.
        tiles_per_epoch: random training tiles per epoch, over all ranks.
        sampling: how training tile places are drawn: ``uniform`` (every place equally likely) or
            ``balanced`` (places holding rare classes more often; see
            :func:`geobp.data.classbalance.balance_factors`). ``balanced`` reads the masks once
            (cached) for their class histograms.
        balance_power: how far ``balanced`` goes, from 0 (uniform) to 1 (a place holding a class
            k times rarer is drawn k times as often, up to a cap).
        max_nodata_fraction: training tiles with more nodata than this are skipped.
        augment: random flips and 90-degree rotations of training tiles.
        split: ``scene`` (whole scenes per split) or ``blocks`` (square blocks within every scene,
            so that correlated neighbouring pixels do not leak from train to validation).
        val_fraction: share of scenes (or blocks) for validation.
        test_fraction: share of scenes (or blocks) for testing.
        split_block_size: block size for ``split: blocks``, in pixels (at least ``tile_size``).
        normalization: ``meanstd`` or ``percentile`` (2nd to 98th percentile scaled to [0, 1]);
            None (the default): the pretrained weights' own normalisation when
            ``pretrained_weights`` names torchgeo weights, ``meanstd`` otherwise.
        nodata: image nodata value; the files' nodata tag when None.
        stats_budget: pixels read for the band statistics, as whole file blocks drawn across the
            training scenes (:mod:`geobp.data.bandstats`); training data with fewer pixels is
            read whole (exact statistics); 0 reads everything.
        validity: how the nodata of scenes without a mask band or overviews is found (files with
            them, or integer files without a nodata value, need no pixel read): ``scan`` decodes
            them once at start-up (cached); ``at_read`` reads nothing and rejects training tiles
            with too much nodata when they are read, drawing another place (up to 16 times);
            ``auto`` scans while those scenes hold at most 1 GiB of decoded pixels
            (:mod:`geobp.data.validity`). Under ``at_read``, evaluation tiles are not screened:
            all-nodata ones are read and count for nothing.
        batch_size: tiles per batch, per rank.
        num_workers: DataLoader worker processes per rank (kept alive between epochs). Batches
            are put in pinned memory when the trainer runs on CUDA (faster, asynchronous copies).
        prefetch_factor: batches each worker loads ahead (torch's default, 2, when None); only
            with ``num_workers > 0``.
        on_read_error: a block that fails to decode during training either stops the run
            (``stop``, naming the scene and window) or is skipped with a warning and counted in
            ``train/skipped_tiles`` (``skip``).
        worker_start: how the worker processes start: ``forkserver`` (the default: forked from a
            clean server process, so no worker inherits a lock another thread of this process
            held), ``spawn``, or ``fork``.
        seed: seed of the split, of the random tiles and of the band-statistics sample.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        # --- inputs: the scenes and their labels (checked against the files) ---
        images: str | list[str] | dict[str, Any] | None = None,
        labels: str | list[str] | None = None,
        bands: list[int | str] | None = None,
        band_names: list[str] | None = None,
        pretrained_weights: str | None = None,
        cache_dir: str | None = None,
        # --- classes and labels: LabelOptions ---
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        ignore_index: int = LabelOptions.ignore_index,
        label_map: dict[int | str, int] | None = LabelOptions.label_map,
        label_field: str | None = LabelOptions.label_field,
        label_background: int | None = LabelOptions.label_background,
        all_touched: bool = LabelOptions.all_touched,
        # --- tiles: TilingOptions ---
        tile_size: int = TilingOptions.tile_size,
        overlap: int = TilingOptions.overlap,
        # --- training tiles: SamplingOptions ---
        tiles_per_epoch: int = SamplingOptions.tiles_per_epoch,
        sampling: SamplingMode = SamplingOptions.sampling,
        balance_power: float = SamplingOptions.balance_power,
        max_nodata_fraction: float = SamplingOptions.max_nodata_fraction,
        augment: bool = SamplingOptions.augment,
        # --- splits: SplitOptions ---
        split: SplitMode = SplitOptions.split,
        val_fraction: float = SplitOptions.val_fraction,
        test_fraction: float = SplitOptions.test_fraction,
        split_block_size: int = SplitOptions.split_block_size,
        # --- start-up statistics: StatsOptions ---
        normalization: NormMethod | None = StatsOptions.normalization,
        nodata: float | None = StatsOptions.nodata,
        stats_budget: int = StatsOptions.stats_budget,
        validity: ValidityMode = StatsOptions.validity,
        # --- loading: LoaderOptions ---
        batch_size: int = LoaderOptions.batch_size,
        num_workers: int = LoaderOptions.num_workers,
        prefetch_factor: int | None = LoaderOptions.prefetch_factor,
        on_read_error: ReadErrorPolicy = LoaderOptions.on_read_error,
        worker_start: StartMethod = LoaderOptions.worker_start,
        # --- the split, the random tiles and the statistics sample ---
        seed: int = 0,
    ) -> None:
        super().__init__()
        # saved in checkpoints and logs: URLs' signatures redacted (the values used below are the real ones)
        self.save_hyperparameters(ignore=list(PATH_OPTIONS))
        self.save_hyperparameters({"root": redacted(root), "images": redacted(images), "labels": redacted(labels)})
        # every option checked once, here, by its group
        self.label_options = LabelOptions.from_config(
            dict(num_classes=num_classes, class_names=class_names, ignore_index=ignore_index, label_map=label_map,
                 label_field=label_field, label_background=label_background, all_touched=all_touched))
        self.tiling_options = TilingOptions(tile_size=tile_size, overlap=overlap)
        self.sampling_options = SamplingOptions(tiles_per_epoch=tiles_per_epoch, sampling=sampling, balance_power=balance_power,
                                                max_nodata_fraction=max_nodata_fraction, augment=augment)
        self.split_options = SplitOptions(split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                                          split_block_size=split_block_size)
        self.stats_options = StatsOptions(normalization=normalization, nodata=nodata, stats_budget=stats_budget, validity=validity)
        self.loader_options = LoaderOptions(batch_size=batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor,
                                            on_read_error=on_read_error, worker_start=worker_start)
        check_split_tiles(self.split_options, self.tiling_options)
        self.seed = seed
        self.class_names: list[str] = list(self.label_options.class_names or ())

        #: per scene, what label alignment found (None for the images/ + masks/ layout)
        self.label_reports: list[LabelReport] | None = None
        if images is None and labels is None:
            if root is None:
                raise ConfigError(format_error(None, "no data given", "set data.root, or data.images and data.labels"))
            self.root: str | Path = location(root)
            self.scenes: list[Scene] = find_scenes(self.root, cache_dir=cache_dir)
        else:
            if labels is None and root is None:
                raise ConfigError(format_error(None, "data.images is set but not data.labels", "set data.labels (or data.root)"))
            images_spec = images if images is not None else str(join(location(root), "images"))  # type: ignore[arg-type]
            labels_spec = labels if labels is not None else str(join(location(root), "masks"))  # type: ignore[arg-type]
            local_root = root if root is not None and not is_remote(root) else None
            # a STAC document or several sources: one stacked scene per item/reference file, holding
            # the selected bands in the order asked (geobp.sources.imagery)
            stacked = resolve_images(images_spec, bands, warp_block=warp_block_for(self.tiling_options.tile_size))
            if stacked is not None:
                images_spec, bands = stacked, None
            self.scenes, self.label_reports = find_labelled_scenes(
                images_spec, labels_spec, self.label_options, cache_dir or local_root, progress=True
            )
            self.root = location(root) if root is not None else folder_of(self.scenes[0].image.path)
        #: local: data.cache_dir, or the dataset's root; remote data: data.cache_dir or ~/.cache/geobp
        self.cache_root = cache_root([s.image.path for s in self.scenes], cache_dir, fallback=self.root)
        first = self.scenes[0].image
        self.bands = resolve_bands(bands, first.count, first.path, band_names or first.descriptions)
        self.nodata = self.stats_options.nodata if self.stats_options.nodata is not None else next(
            (s.image.nodata for s in self.scenes if s.image.nodata is not None), None)
        self.regions = split_regions(self.scenes, self.split_options, self.seed, self.root)
        self.pretrained: PretrainedWeights | None = pretrained_for(pretrained_weights)
        self._band_names = resolve_band_names(self.scenes, band_names, self.bands, self.pretrained)
        self._band_stats: BandStats | None = None
        self._validity: list[np.ndarray] | None = None
        self.validity_sources: list[str] = []
        self._preprocessing: Preprocessing | None = None
        self._cell_histograms: list[np.ndarray] | None = None

    # ----- what the model is linked to -------------------------------------------------------

    @property
    def num_bands(self) -> int:
        """Number of input bands (the model's input channels)."""
        return len(self.bands)

    @property
    def band_names(self) -> list[str]:
        """One name per selected band, in the model's input order (linked to ``model.in_band_names``).

        From ``data.band_names`` when given, else the files' band descriptions, else
        ``band_<i>`` (``i`` the 1-based band index in the files); see :mod:`geobp.data.bandnames`.
        """
        return list(self._band_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output channels)."""
        return self.label_options.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        """Band selection and names, nodata and normalization of the training scenes (computed once, cached).

        The normalisation is ``data.normalization``'s over the training scenes, or, when it is
        None and the encoder starts from torchgeo weights, the weights' own
        (:func:`~geobp.data.preprocessing.pretrained_normalization`).
        """
        if self._preprocessing is None:
            stats = self.band_stats
            method = self.stats_options.normalization
            pre = combine_stats([stats], self.bands, self.nodata, method or "meanstd")
            pre.dtype = self.scenes[0].image.dtype
            pre.band_names = self.band_names
            pre.statistics = stats.describe()
            if method is None and self.pretrained is not None:
                pre = pretrained_normalization(pre, self.band_names, self.pretrained)
            self._preprocessing = pre
        return self._preprocessing

    @property
    def band_stats(self) -> BandStats:
        """Band statistics of the training scenes from a block sample of ``stats_budget`` pixels
        (all of them when the data is smaller), cached; see :mod:`geobp.data.bandstats`."""
        if self._band_stats is None:
            infos = [self.scenes[i].image for i in sorted({i for i, _ in self.regions["train"]})]
            self._band_stats = load_band_stats(infos, self.nodata, self.cache_root, self.stats_options.budget_pixels, self.seed,
                                               progress=True)
        return self._band_stats

    @property
    def validity(self) -> list[np.ndarray]:
        """Per scene, the valid-pixel fraction of each cell of :data:`VALIDITY_FACTOR` pixels, from
        the cheapest source the file offers (:mod:`geobp.data.validity`)."""
        if self._validity is None:
            self._validity, self.validity_sources = validity_maps(
                [s.image for s in self.scenes], self.nodata, self.cache_root, progress=len(self.scenes) > 1,
                mode=self.stats_options.validity)
            unscanned = self.validity_sources.count("at_read")
            if unscanned:
                rank_zero_info(f"{unscanned} of {len(self.scenes)} scenes have a nodata value but neither a mask band nor "
                               "overviews and were not scanned (data.validity): training tiles with too much nodata "
                               "are rejected as they are read")
        return self._validity

    @property
    def cell_histograms(self) -> list[np.ndarray]:
        """Per scene, pixels per class in each cell of its mask (read once, cached; see
        :mod:`geobp.data.classbalance`). Only built when asked for."""
        if self._cell_histograms is None:
            self._cell_histograms = load_cell_histograms([s.mask for s in self.scenes], self.num_classes,  # type: ignore[misc]
                                                         self.cache_root, progress=len(self.scenes) > 1)
        return self._cell_histograms

    @property
    def cell_histograms_loaded(self) -> bool:
        """True once :attr:`cell_histograms` has been built (by balanced sampling or class weights)."""
        return self._cell_histograms is not None

    @property
    def class_pixels(self) -> list[int]:
        """Pixels per class in the training split (from the masks; read once, cached)."""
        total = np.zeros(self.num_classes)
        for i, region in self.regions["train"]:
            info = self.scenes[i].image
            total += window_class_counts(self.cell_histograms[i], region, info.height, info.width)
        return [int(round(x)) for x in total]

    def class_summary(self) -> dict[str, list]:
        """Class frequencies of the training split and what the training sampler shows of them.

        Returns:
            ``names``; ``pixels`` (training pixels per class); ``share`` (their share of the
            labelled pixels); ``uniform`` and ``sampled`` (expected share of each class among the
            labelled pixels of the tiles drawn under uniform and under the configured sampling).
        """
        pixels = self.class_pixels
        total = max(sum(pixels), 1)
        cells, windows = self._train_places()
        counts = place_class_counts(self.cell_histograms, cells, windows, self.num_classes)
        uniform = np.array([w for sc in cells for w in sc.weights])
        balanced = self.sampling_options.sampling == "balanced"
        weights = balanced_weights(cells, counts, self.sampling_options.balance_power) if balanced else uniform
        return {
            "names": list(self.class_names),
            "pixels": pixels,
            "share": [p / total for p in pixels],
            "uniform": expected_shares(counts, uniform).tolist() if len(uniform) else [0.0] * self.num_classes,
            "sampled": expected_shares(counts, weights).tolist() if len(weights) else [0.0] * self.num_classes,
        }

    # ----- tiles -------------------------------------------------------------------------------

    def train_cells(self) -> list[SceneCells]:
        """Block-aligned origin cells of the training regions, minus those above the nodata limit,
        weighted by their number of origins (times the class balance under ``sampling: balanced``)."""
        cells, windows = self._train_places()
        if self.sampling_options.sampling == "balanced":
            counts = place_class_counts(self.cell_histograms, cells, windows, self.num_classes)
            flat = balanced_weights(cells, counts, self.sampling_options.balance_power).tolist()
            k = 0
            for sc in cells:
                sc.weights[:] = flat[k : k + len(sc.weights)]
                k += len(sc.weights)
        return cells

    def _train_places(self) -> tuple[list[SceneCells], list[list[Window]]]:
        return train_places(self.scenes, self.regions["train"], self.tiling_options.tile_size, self.validity,
                            self.sampling_options.min_valid_fraction)

    def grid_tiles(self, split: Split) -> list[TileSpec]:
        """Grid tiles covering the split's regions; tiles with no valid pixel are left out."""
        return grid_tiles(self.scenes, self.regions[split], self.tiling_options, self.validity)

    # ----- Lightning hooks -----------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Normalise a compact batch on its device into the batch contract (:func:`finish_batch`)."""
        if isinstance(batch, dict):
            return finish_batch(batch, self.preprocessing)
        return batch

    def _dataset(self, augment: bool, redraw: Redraw | None = None) -> TileDataset:
        return TileDataset(
            images=[s.image.path for s in self.scenes],
            # find_scenes requires a mask per image, so masks line up with images by index
            masks=[s.mask.path for s in self.scenes],  # type: ignore[union-attr]
            names=[s.name for s in self.scenes],
            preprocessing=self.preprocessing,
            tile_size=self.tiling_options.tile_size,
            num_classes=self.num_classes,
            ignore_index=self.label_options.ignore_index,
            augment=Augment() if augment else None,
            on_read_error=self.loader_options.on_read_error,
            redraw=redraw,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: TileDataset, sampler: GridTileSampler | RandomTileSampler, drop_last: bool) -> DataLoader:
        return tile_loader(dataset, sampler, self.loader_options, pin_memory=self._on_cuda(), drop_last=drop_last,
                           current_epoch=self._current_epoch)

    def _on_cuda(self) -> bool:
        """Whether batches go to a CUDA device: the trainer's accelerator, or, without a trainer,
        whether CUDA is available."""
        if self.trainer is None:
            return torch.cuda.is_available()
        return isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> DataLoader:
        world, rank = self._rank()
        cells = self.train_cells()
        if not any(c.cells for c in cells):
            raise ConfigError(
                format_error(
                    self.root,
                    f"no training tile has at most {self.sampling_options.max_nodata_fraction:.0%} nodata",
                    "check the nodata value, or raise data.max_nodata_fraction",
                )
            )
        tile = self.tiling_options.tile_size
        sampler = RandomTileSampler(cells, tile, self.sampling_options.tiles_per_epoch, self.seed, world, rank)
        unscanned = {c.scene: c for c in cells if c.cells and self.validity_sources[c.scene] == "at_read"}
        redraw = Redraw(unscanned, tile, self.sampling_options.min_valid_fraction, self.seed) if unscanned else None
        dataset = self._dataset(self.sampling_options.augment, redraw)
        return self._loader(dataset, sampler, drop_last=len(sampler) > self.loader_options.batch_size)

    def _eval_loader(self, split: Split) -> DataLoader:
        tiles = self.grid_tiles(split)
        if not tiles:
            raise ConfigError(
                format_error(
                    self.root,
                    f"the {split} split is empty",
                    f"set data.{'val' if split == 'val' else 'test'}_fraction > 0 (and enough scenes, or data.split: blocks)",
                )
            )
        world, rank = self._rank()
        return self._loader(self._dataset(False), GridTileSampler(tiles, world, rank), drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
