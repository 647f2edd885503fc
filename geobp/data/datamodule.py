"""``GeoTiffDataModule``: scenes on disk to train/val/test DataLoaders of tiles, DDP-aware."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from rasterio.windows import Window
from torch.utils.data import DataLoader

from geobp.classes import check_num_classes, class_names_for
from geobp.data.alignment import find_labelled_scenes
from geobp.data.dataset import TileDataset, TileSpec, collate_tiles, finish_batch
from geobp.data.bandstats import STATS_BUDGET, BandStats, load_band_stats
from geobp.data.classbalance import balance_factors, expected_shares, load_cell_histograms, window_class_counts
from geobp.data.labels import LabelOptions, LabelReport
from geobp.data.preprocessing import NormMethod, Preprocessing, combine_stats, pretrained_normalization, window_valid_fraction
from geobp.data.samplers import GridTileSampler, RandomTileSampler, Redraw, SceneCells, window_to_spec
from geobp.data.scenes import Scene, find_scenes, resolve_bands
from geobp.data.transforms import Augment
from geobp.data.validity import ValidityMode, validity_maps
from geobp.errors import BandMismatchError, ConfigError, format_error
from geobp.bands import canonical_band, default_band_name
from geobp.pretrained import PretrainedWeights, is_pretrained_name, match_bands, resolve_pretrained
from geobp.tiling import cell_window, check_tile_args, grid_windows, origin_cells, split_blocks

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class ResumableTileLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch by Lightning (``state_dict``/``load_state_dict``).

    Lightning stores ``state_dict()`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
    and, when a run restarts inside an epoch, calls ``load_state_dict`` before iterating again. The
    state is the sampler's epoch and the number of batches handed out in that epoch; restored, the
    next iteration over the same epoch starts at the following tile of the (seed, epoch) draw, so the
    resumed run trains on exactly the batches the interrupted one had left. Without it a plain
    DataLoader restarts the epoch's iterator: Lightning's batch counter goes on while the batches
    are the epoch's first ones again.

    The count is exact because Lightning does not prefetch from loaders with a length, and a
    checkpoint is taken between batches (every N steps, on SIGTERM, at validation); only an
    interrupt inside a training step (Ctrl-C) makes that batch count as done.

    The sampler must be a :class:`RandomTileSampler`. Iteration is lazy: the underlying iterator
    (and its workers' first index requests) is made at the first ``next``, after Lightning's
    ``set_epoch``, so a run resumed in epoch ``e > 0`` with ``num_workers > 0`` draws epoch ``e``.

    Args:
        current_epoch: returns the trainer's ``current_epoch`` (None without a trainer); the epoch
            drawn is its value at the first batch. Lightning 2.6 calls ``set_epoch`` with its count
            of processed epochs, which after resuming from a checkpoint saved by an epoch-end
            validation runs one ahead of ``current_epoch`` (it replays that epoch's end, without
            batches): the resumed run would draw other tiles than an uninterrupted one.
    """

    def __init__(self, *args: Any, current_epoch: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch
        self._epoch = 0
        self._batches = 0
        self._restore: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, RandomTileSampler)
        epoch = self.current_epoch() if self.current_epoch is not None else None
        if epoch is not None:
            sampler.set_epoch(epoch)
        self._epoch, self._batches = sampler.epoch, 0
        restore, self._restore = self._restore, None
        if restore is not None and restore["epoch"] == sampler.epoch:
            self._batches = restore["batches"]
            sampler.start = self._batches * int(self.batch_size or 1)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches handed out in it (saved by Lightning in every checkpoint)."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next iteration over ``state_dict["epoch"]`` after its first ``batches`` batches."""
        self._restore = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


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

    Args:
        root: dataset folder (``root/images`` and ``root/masks``, matched by name); with
            ``images``/``labels`` set it is only where the cache goes.
        images: a folder, glob or list of GeoTIFFs (one scene per file); ``root/images`` when None.
        labels: label rasters (folder, glob or list; any grid and CRS, paired with the images by
            footprint), one label map covering many images, or a vector file in any CRS;
            ``root/masks`` matched by name when None and ``images`` is None.
        label_field: for vector labels, the attribute holding the class (an integer id or a name
            in ``class_names``); every feature is class 1 when None.
        label_background: for vector labels, the class of pixels outside every feature; the
            ignore index when None.
        all_touched: for vector labels, label every pixel a feature touches (thin features).
        label_map: raw label value to class id or ``ignore_index``, e.g. ``{-1: 255}``.
        num_classes: number of classes (required); mask values are ``0..num_classes-1`` or ``ignore_index``.
        bands: 1-based band indices to use; all bands when None.
        class_names: names for logs and outputs; ``class_<i>`` when None.
        ignore_index: label excluded from loss and metrics (nodata pixels get it too).
        tile_size: tile size in pixels (square).
        overlap: overlap of the evaluation grid tiles, in pixels.
        tiles_per_epoch: random training tiles per epoch, over all ranks.
        batch_size: tiles per batch, per rank.
        num_workers: DataLoader worker processes per rank (kept alive between epochs). Batches
            are put in pinned memory when the trainer runs on CUDA (faster, asynchronous copies).
        prefetch_factor: batches each worker loads ahead (torch's default, 2, when None); only
            with ``num_workers > 0``.
        split: ``scene`` (whole scenes per split) or ``blocks`` (square blocks within every scene,
            so that correlated neighbouring pixels do not leak from train to validation).
        val_fraction: share of scenes (or blocks) for validation.
        test_fraction: share of scenes (or blocks) for testing.
        split_block_size: block size for ``split: blocks``, in pixels (at least ``tile_size``).
        seed: seed of the split and of the random tiles.
        normalization: ``meanstd`` or ``percentile`` (2nd to 98th percentile scaled to [0, 1]);
            None (the default): the pretrained weights' own normalisation when
            ``pretrained_weights`` names torchgeo weights, ``meanstd`` otherwise.
        nodata: image nodata value; the files' nodata tag when None.
        max_nodata_fraction: training tiles with more nodata than this are skipped.
        augment: random flips and 90-degree rotations of training tiles.
        cache_dir: where band statistics are cached; ``root`` when None.
        on_read_error: a block that fails to decode during training either stops the run
            (``stop``, naming the scene and window) or is skipped with a warning and counted in
            ``train/skipped_tiles`` (``skip``).
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
        band_names: one name per band of the files (before ``bands`` selects some), for files
            without band descriptions; overrides the descriptions when given.
        pretrained_weights: the encoder's torchgeo weights name (the CLI links it from
            ``model.weights``; a local file path is ignored): its bands are matched with
            :attr:`band_names` and its normalisation is the default. The data module reads the
            weights' metadata only (:mod:`geobp.pretrained`), never the model.
        sampling: how training tile places are drawn: ``uniform`` (every place equally likely) or
            ``balanced`` (places holding rare classes more often; see
            :func:`geobp.data.classbalance.balance_factors`). ``balanced`` reads the masks once
            (cached) for their class histograms.
        balance_power: how far ``balanced`` goes, from 0 (uniform) to 1 (a place holding a class
            k times rarer is drawn k times as often, up to a cap).
    """

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        bands: list[int] | None = None,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        tile_size: int = 256,
        overlap: int = 0,
        tiles_per_epoch: int = 2000,
        batch_size: int = 16,
        num_workers: int = 0,
        split: Literal["scene", "blocks"] = "scene",
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_block_size: int = 1024,
        seed: int = 0,
        normalization: NormMethod | None = None,
        nodata: float | None = None,
        max_nodata_fraction: float = 0.5,
        augment: bool = True,
        cache_dir: str | None = None,
        on_read_error: Literal["stop", "skip"] = "stop",
        stats_budget: int = STATS_BUDGET,
        validity: ValidityMode = "auto",
        band_names: list[str] | None = None,
        pretrained_weights: str | None = None,
        images: str | list[str] | None = None,
        labels: str | list[str] | None = None,
        label_field: str | None = None,
        label_background: int | None = None,
        all_touched: bool = False,
        label_map: dict[int | str, int] | None = None,
        sampling: Literal["uniform", "balanced"] = "uniform",
        balance_power: float = 0.5,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_tile_args(tile_size, overlap)
        if prefetch_factor is not None and (prefetch_factor < 1 or num_workers == 0):
            raise ConfigError(format_error(
                None, f"data.prefetch_factor: {prefetch_factor} needs data.num_workers > 0 and a value >= 1 "
                f"(found num_workers {num_workers})",
                "set data.num_workers to a number of processes, or data.prefetch_factor: null"))
        if num_classes is None:
            raise ConfigError(format_error(None, "num_classes is not set", "set data.num_classes"))
        check_num_classes(num_classes)
        if not 0 <= ignore_index < 256 or ignore_index < num_classes:
            raise ConfigError(
                format_error(
                    None,
                    f"ignore_index must be in [num_classes, 255] (found {ignore_index} with {num_classes} classes)",
                    "use 255 unless your masks use another value for unlabelled pixels",
                )
            )
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                format_error(None, "val_fraction and test_fraction must be in [0, 1) and sum to less than 1", "fix them in the config")
            )
        if not 0.0 <= balance_power <= 1.0:
            raise ConfigError(
                format_error(None, f"balance_power must be in [0, 1] (found {balance_power})",
                             "set data.balance_power between 0 (uniform) and 1 (fully balanced)")
            )
        self.class_names = class_names_for(class_names, num_classes)
        #: per scene, what label alignment found (None for the images/ + masks/ layout)
        self.label_reports: list[LabelReport] | None = None
        if images is None and labels is None:
            if root is None:
                raise ConfigError(format_error(None, "no data given", "set data.root, or data.images and data.labels"))
            self.root = Path(root)
            self.scenes: list[Scene] = find_scenes(self.root, cache_dir=cache_dir)
        else:
            if labels is None and root is None:
                raise ConfigError(format_error(None, "data.images is set but not data.labels", "set data.labels (or data.root)"))
            options = LabelOptions(num_classes, ignore_index, self.class_names, label_map, label_field, label_background, all_touched)
            images_spec = images if images is not None else str(Path(root) / "images")  # type: ignore[arg-type]
            labels_spec = labels if labels is not None else str(Path(root) / "masks")  # type: ignore[arg-type]
            self.scenes, self.label_reports = find_labelled_scenes(
                images_spec, labels_spec, options, cache_dir or root, progress=True
            )
            self.root = Path(root) if root is not None else Path(self.scenes[0].image.path).parent
        first = self.scenes[0].image
        self.bands = resolve_bands(bands, first.count, first.path)
        self.nodata = nodata if nodata is not None else next((s.image.nodata for s in self.scenes if s.image.nodata is not None), None)
        self.regions = self._split_regions()
        self.pretrained: PretrainedWeights | None = (
            resolve_pretrained(pretrained_weights) if is_pretrained_name(pretrained_weights) else None
        )
        self._band_names = self._resolve_band_names(band_names)
        if self.pretrained is not None:
            match_bands(self._band_names, self.pretrained)  # too few bands in common: stop now, before statistics
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
        ``band_<i>`` (``i`` the 1-based band index in the files).
        """
        return list(self._band_names)

    def _resolve_band_names(self, names: list[str] | None) -> list[str]:
        """Names of the selected bands (see :attr:`band_names`); checks that the scenes agree.

        Raises:
            ConfigError: ``names`` has not one name per band of the files.
            BandMismatchError: scenes describe their bands differently (another order, say)
                while pretrained weights match bands by name.
        """
        first = self.scenes[0].image
        if names is not None:
            if len(names) != first.count:
                raise ConfigError(format_error(
                    None, f"data.band_names has {len(names)} names for the {first.count} bands of the files",
                    "give one name per band of the files, in file order (data.bands then selects from them)"))
            full = [str(n) for n in names]
        else:
            described = first.descriptions or (None,) * first.count
            full = [d or default_band_name(i) for i, d in enumerate(described, start=1)]
            for scene in self.scenes[1:]:
                other = scene.image.descriptions
                if [canonical_band(d or "") for d in other] == [canonical_band(d or "") for d in first.descriptions]:
                    continue
                problem = f"band descriptions {list(other)} differ from {list(first.descriptions)} of {first.path}"
                fix = "write the same band order and descriptions into every image, or set data.band_names"
                if self.pretrained is not None:
                    raise BandMismatchError(format_error(scene.image.path, problem, fix))
                warnings.warn(format_error(scene.image.path, problem, fix), UserWarning, stacklevel=2)
                break
        return [full[b - 1] for b in self.bands]

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output channels)."""
        return int(self.hparams["num_classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        """Band selection and names, nodata and normalization of the training scenes (computed once, cached).

        The normalisation is ``data.normalization``'s over the training scenes, or, when it is
        None and the encoder starts from torchgeo weights, the weights' own
        (:func:`~geobp.data.preprocessing.pretrained_normalization`).
        """
        if self._preprocessing is None:
            stats = self.band_stats
            method = self.hparams["normalization"]
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
            train = sorted({i for i, _ in self.regions["train"]})
            budget = self.hparams["stats_budget"]
            infos = [self.scenes[i].image for i in train]
            cache = self.hparams["cache_dir"] or self.root
            self._band_stats = load_band_stats(infos, self.nodata, cache, budget if budget > 0 else 2**62, self.hparams["seed"],
                                               progress=True)
        return self._band_stats

    @property
    def validity(self) -> list[np.ndarray]:
        """Per scene, the valid-pixel fraction of each cell of :data:`VALIDITY_FACTOR` pixels, from
        the cheapest source the file offers (:mod:`geobp.data.validity`)."""
        if self._validity is None:
            cache = self.hparams["cache_dir"] or self.root
            self._validity, self.validity_sources = validity_maps(
                [s.image for s in self.scenes], self.nodata, cache, progress=len(self.scenes) > 1,
                mode=self.hparams["validity"])
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
            cache = self.hparams["cache_dir"] or self.root
            self._cell_histograms = load_cell_histograms([s.mask for s in self.scenes], self.num_classes, cache,  # type: ignore[misc]
                                               progress=len(self.scenes) > 1)
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
        counts = self._place_counts(cells, windows)
        uniform = np.array([w for sc in cells for w in sc.weights])
        weights = self._balanced(cells, counts) if self.hparams["sampling"] == "balanced" else uniform
        return {
            "names": list(self.class_names),
            "pixels": pixels,
            "share": [p / total for p in pixels],
            "uniform": expected_shares(counts, uniform).tolist() if len(uniform) else [0.0] * self.num_classes,
            "sampled": expected_shares(counts, weights).tolist() if len(weights) else [0.0] * self.num_classes,
        }

    def _place_counts(self, cells: list[SceneCells], windows: list[list[Window]]) -> np.ndarray:
        """[N, K] pixels per class under the tiles of every origin cell, scene after scene."""
        counts = [window_class_counts(self.cell_histograms[sc.scene], w, sc.height, sc.width)
                  for sc, ws in zip(cells, windows) for w in ws]
        return np.array(counts).reshape(len(counts), self.num_classes)

    def _balanced(self, cells: list[SceneCells], counts: np.ndarray) -> np.ndarray:
        """The origin cells' weights under ``sampling: balanced``, flat."""
        uniform = np.array([w for sc in cells for w in sc.weights])
        return uniform * balance_factors(counts, self.hparams["balance_power"])

    # ----- splits and tiles ----------------------------------------------------------------

    def _split_regions(self) -> dict[Split, list[tuple[int, Window]]]:
        hp = self.hparams
        fractions = (1.0 - hp["val_fraction"] - hp["test_fraction"], hp["val_fraction"], hp["test_fraction"])
        regions: dict[Split, list[tuple[int, Window]]] = {s: [] for s in SPLITS}
        if hp["split"] == "scene":
            n = len(self.scenes)
            counts = [int(round(f * n)) if f > 0 else 0 for f in fractions[1:]]
            counts = [max(c, 1) if f > 0 else 0 for c, f in zip(counts, fractions[1:])]
            if n - sum(counts) < 1:
                raise ConfigError(
                    format_error(
                        self.root,
                        f"{n} scene(s) cannot be split by scene into train/val/test with fractions {fractions}",
                        "add scenes, lower the fractions, or set data.split: blocks to split within scenes",
                    )
                )
            order = np.random.default_rng(hp["seed"]).permutation(n).tolist()
            val, test = order[: counts[0]], order[counts[0] : counts[0] + counts[1]]
            for i, s in enumerate(self.scenes):
                split: Split = "val" if i in val else "test" if i in test else "train"
                regions[split].append((i, Window(0, 0, s.image.width, s.image.height)))
        else:
            if hp["split_block_size"] < hp["tile_size"]:
                raise ConfigError(
                    format_error(None, "split_block_size must be at least tile_size", "raise data.split_block_size")
                )
            for i, s in enumerate(self.scenes):
                parts = split_blocks(s.image.height, s.image.width, hp["split_block_size"], fractions, hp["seed"], s.name)
                for split, windows in zip(SPLITS, parts):
                    regions[split] += [(i, w) for w in windows]
        return regions

    def train_cells(self) -> list[SceneCells]:
        """Block-aligned origin cells of the training regions, minus those above the nodata limit,
        weighted by their number of origins (times the class balance under ``sampling: balanced``)."""
        cells, windows = self._train_places()
        if self.hparams["sampling"] == "balanced":
            flat = self._balanced(cells, self._place_counts(cells, windows)).tolist()
            k = 0
            for sc in cells:
                sc.weights[:] = flat[k : k + len(sc.weights)]
                k += len(sc.weights)
        return cells

    def _train_places(self) -> tuple[list[SceneCells], list[list[Window]]]:
        """Origin cells weighted by their number of origins, and the window each cell's tiles cover."""
        t, limit = self.hparams["tile_size"], 1.0 - self.hparams["max_nodata_fraction"]
        by_scene: dict[int, tuple[SceneCells, list[Window]]] = {}
        for i, region in self.regions["train"]:
            info = self.scenes[i].image
            sc, windows = by_scene.setdefault(i, (SceneCells(i, info.height, info.width, [], []), []))
            for cell in origin_cells(region, t, info.block_height, info.block_width):
                window = cell_window(cell, t, region)
                if window_valid_fraction(self.validity[i], window) >= limit:
                    sc.cells.append(cell)
                    sc.weights.append(float(cell.count))
                    windows.append(window)
        return [sc for sc, _ in by_scene.values()], [w for _, w in by_scene.values()]

    def grid_tiles(self, split: Split) -> list[TileSpec]:
        """Grid tiles covering the split's regions; tiles with no valid pixel are left out."""
        t, overlap = self.hparams["tile_size"], self.hparams["overlap"]
        tiles = []
        for i, region in self.regions[split]:
            info = self.scenes[i].image
            for w in grid_windows(info.height, info.width, t, overlap, region):
                if window_valid_fraction(self.validity[i], w) > 0:
                    tiles.append(window_to_spec(i, w))
        return tiles

    # ----- Lightning hooks -----------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Normalise a compact batch on its device into the batch contract (:func:`finish_batch`)."""
        if isinstance(batch, dict):
            return finish_batch(batch, self.preprocessing)
        return batch

    def _dataset(self, augment: bool, redraw: Redraw | None = None) -> TileDataset:
        hp = self.hparams
        return TileDataset(
            images=[s.image.path for s in self.scenes],
            # find_scenes requires a mask per image, so masks line up with images by index
            masks=[s.mask.path for s in self.scenes],  # type: ignore[union-attr]
            names=[s.name for s in self.scenes],
            preprocessing=self.preprocessing,
            tile_size=hp["tile_size"],
            num_classes=hp["num_classes"],
            ignore_index=hp["ignore_index"],
            augment=Augment() if augment else None,
            on_read_error=hp["on_read_error"],
            redraw=redraw,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: TileDataset, sampler: GridTileSampler | RandomTileSampler, drop_last: bool) -> DataLoader:
        workers = self.hparams["num_workers"]
        kwargs: dict[str, Any] = dict(
            batch_size=self.hparams["batch_size"],
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_cuda(),
            drop_last=drop_last,
            collate_fn=collate_tiles,
        )
        if workers > 0 and self.hparams.get("prefetch_factor") is not None:
            kwargs["prefetch_factor"] = self.hparams["prefetch_factor"]
        if isinstance(sampler, RandomTileSampler):
            return ResumableTileLoader(dataset, current_epoch=self._current_epoch, **kwargs)  # type: ignore[arg-type]
        return DataLoader(dataset, **kwargs)  # type: ignore[arg-type]

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
        hp = self.hparams
        cells = self.train_cells()
        if not any(c.cells for c in cells):
            raise ConfigError(
                format_error(
                    self.root,
                    f"no training tile has at most {hp['max_nodata_fraction']:.0%} nodata",
                    "check the nodata value, or raise data.max_nodata_fraction",
                )
            )
        sampler = RandomTileSampler(cells, hp["tile_size"], hp["tiles_per_epoch"], hp["seed"], world, rank)
        unscanned = {c.scene: c for c in cells if c.cells and self.validity_sources[c.scene] == "at_read"}
        redraw = Redraw(unscanned, hp["tile_size"], 1.0 - hp["max_nodata_fraction"], hp["seed"]) if unscanned else None
        return self._loader(self._dataset(hp["augment"], redraw), sampler, drop_last=len(sampler) > hp["batch_size"])

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
