import numpy as np
import pytest
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from geobp.data import GeoTiffDataModule, Preprocessing, TileDataset
from geobp.classes import mask_dtype
from geobp.data.dataset import TileSpec, collate_tiles, finish_batch
from geobp.errors import BandMismatchError, ConfigError, DataNotFoundError, LabelError, RasterMismatchError
from geobp.raster import read_window
from tests.conftest import write_tif


def make_dm(root, **kw):
    args = dict(root=str(root), num_classes=3, tile_size=16, tiles_per_epoch=20, batch_size=4, val_fraction=0.34, augment=False)
    args.update(kw)
    return GeoTiffDataModule(**args)


def test_batch_contract_and_link_properties(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data")
    assert dm.num_bands == 3 and dm.num_classes == 3
    compact = next(iter(dm.train_dataloader()))
    # the loader sends raw pixels and uint8 labels; the hook Lightning calls on the device normalises
    assert compact["raw"].dtype == torch.uint16 and compact["mask"].dtype == torch.uint8 and "image" not in compact
    batch = dm.on_after_batch_transfer(compact, 0)
    assert "raw" not in batch
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 16, 16)
    assert batch["window"].shape == (4, 4) and len(batch["scene"]) == 4
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2}
    # normalised with the training statistics: roughly zero mean, unit std
    assert abs(batch["image"].mean().item()) < 1.0


def test_band_selection_and_normalisation_stats(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, bands=4)
    dm = make_dm(tmp_path / "data", bands=[4, 2])
    pre = dm.preprocessing
    assert pre.bands == [4, 2] and dm.num_bands == 2
    # band k is k times brighter in the factory: band 4 is twice band 2
    assert pre.mean[0] == pytest.approx(2 * pre.mean[1], rel=0.02)
    with pytest.raises(ConfigError, match=r"band selection \[5\] is invalid for a raster with 4 bands"):
        make_dm(tmp_path / "data", bands=[5])


def test_val_grid_covers_val_scenes_exactly(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, size=(40, 50))
    dm = make_dm(tmp_path / "data")
    tiles = dm.grid_tiles("val")
    scenes = {t.scene for t in tiles}
    assert len(scenes) == 1
    covered = np.zeros((40, 50), int)
    for t in tiles:
        covered[t.row : t.row + t.height, t.col : t.col + t.width] += 1
    assert (covered > 0).all()
    train_scenes = {i for i, _ in dm.regions["train"]}
    assert scenes.isdisjoint(train_scenes)


def test_block_split_is_disjoint_and_reproducible(make_scene, tmp_path):
    make_scene("only", size=(64, 64))
    dm = make_dm(tmp_path / "data", split="blocks", split_block_size=16, val_fraction=0.25)
    val = {(w.row_off, w.col_off) for _, w in dm.regions["val"]}
    train = {(w.row_off, w.col_off) for _, w in dm.regions["train"]}
    assert val and train and val.isdisjoint(train)
    assert len(val) + len(train) == 16
    again = make_dm(tmp_path / "data", split="blocks", split_block_size=16, val_fraction=0.25)
    assert {(w.row_off, w.col_off) for _, w in again.regions["val"]} == val
    # training tiles never reach into validation blocks
    for spec in dm.train_dataloader().sampler.draw(0):
        assert (spec.row // 16 * 16, spec.col // 16 * 16) in train


def test_single_scene_split_by_scene_error(make_scene, tmp_path):
    make_scene("only")
    with pytest.raises(ConfigError, match="cannot be split by scene.*split: blocks"):
        make_dm(tmp_path / "data")


def test_nodata_becomes_ignore_and_is_excluded_from_stats(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, nodata=0, nodata_rows=20)
    dm = make_dm(tmp_path / "data", max_nodata_fraction=1.0)
    assert dm.preprocessing.nodata == 0
    # zeros would drag the mean down a lot if they were counted
    assert min(dm.preprocessing.mean) > 150
    ds = dm._dataset(False)
    s = ds[TileSpec(0, 8, 0, 16, 16)]
    assert s["mask"].dtype == torch.uint8  # the ignore index survives the compact mask
    assert (s["mask"][:12] == 255).all() and (s["mask"][12:] != 255).all()
    batch = dm.on_after_batch_transfer(collate_tiles([s]), 0)
    assert batch["mask"].dtype == torch.int64
    assert (batch["mask"][0, :12] == 255).all() and (batch["mask"][0, 12:] != 255).all()
    assert (batch["image"][0, :, :12] == 0).all() and (batch["image"][0, :, 12:] != 0).all()


def test_tiles_above_nodata_fraction_are_skipped(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, nodata=0, nodata_rows=32)
    dm = make_dm(tmp_path / "data", max_nodata_fraction=0.25)
    for spec in dm.train_dataloader().sampler.draw(0):
        assert spec.row >= 32  # tiles in the nodata half are never drawn


def test_padding_for_scene_smaller_than_tile(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, size=(10, 12), block=None)
    dm = make_dm(tmp_path / "data")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["image"].shape[-2:] == (16, 16)
    assert (batch["mask"][:, 10:, :] == 255).all() and (batch["mask"][:, :, 12:] == 255).all()
    assert batch["window"][0].tolist() == [0, 0, 10, 12]


def test_ddp_shards_are_disjoint_and_follow_epoch(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data", tiles_per_epoch=40)
    loader = dm.train_dataloader()
    from geobp.data.samplers import GridTileSampler, RandomTileSampler

    cells = dm.train_cells()
    shards = [list(RandomTileSampler(cells, 16, 40, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    full = RandomTileSampler(cells, 16, 40, seed=0).draw(0)
    assert len(shards[0]) == len(shards[1]) == 20
    assert sorted(shards[0] + shards[1]) == sorted(full)
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    s = RandomTileSampler(cells, 16, 40, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    tiles = dm.grid_tiles("val")
    parts = [list(GridTileSampler(tiles, 3, r)) for r in range(3)]
    assert sorted(t for p in parts for t in p) == sorted(tiles)
    assert not set(parts[0]) & set(parts[1])
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)


def test_random_tiles_are_block_aligned(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, size=(64, 64), block=32)
    dm = make_dm(tmp_path / "data", tile_size=16)
    for spec in dm.train_dataloader().sampler.draw(0):
        # a 16 px tile never straddles a 32 px block boundary
        assert spec.row // 32 == (spec.row + 15) // 32 and spec.col // 32 == (spec.col + 15) // 32


def test_augment_is_joint(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data", augment=True)
    ds_aug, ds_plain = dm._dataset(True), dm._dataset(False)
    spec = TileSpec(0, 0, 0, 16, 16)
    plain = ds_plain[spec]
    seen = set()
    for _ in range(12):
        s = ds_aug[spec]
        seen.add(tuple(s["mask"][0, :3].tolist()))
        # the same geometric transform moved image and mask: band 0 still orders the classes
        cls = s["mask"]
        means = [s["raw"][0][cls == k].float().mean() for k in range(3)]
        assert means[0] < means[1] < means[2]
        assert s["raw"].dtype == torch.uint16 and s["mask"].dtype == torch.uint8
    assert len(seen) > 1  # different draws gave different orientations
    assert plain["raw"].shape == s["raw"].shape


def test_augmented_tiles_normalise_like_augmented_normalised_tiles(make_scene, tmp_path):
    """Flipping/rotating raw pixels, then normalising, equals normalising, then flipping/rotating."""
    for i in range(3):
        make_scene(f"s{i}", seed=i, nodata=0, nodata_rows=5)
    dm = make_dm(tmp_path / "data", augment=True, max_nodata_fraction=1.0)
    ds = dm._dataset(True)
    spec = TileSpec(0, 0, 0, 16, 16)
    reference, _ = dm.preprocessing(ds._open(ds.images[0]).read(window=spec.window))
    orientations = {np.rot90(np.flip(reference, axes), k, (1, 2)).tobytes()
                    for axes in ((), (1,), (2,), (1, 2)) for k in range(4)}
    for _ in range(8):
        image = dm.on_after_batch_transfer(collate_tiles([ds[spec]]), 0)["image"][0].numpy()
        assert image.tobytes() in orientations


def test_mismatched_mask_errors_name_the_file(make_scene, tmp_path):
    img, msk = make_scene("a")
    write_tif(msk, np.zeros((64, 64), np.uint8), transform=from_origin(500005.0, 5000000.0, 10.0, 10.0))
    with pytest.raises(RasterMismatchError, match=r"masks/a.tif: transform differs from its image"):
        make_dm(tmp_path / "data")
    write_tif(msk, np.zeros((60, 64), np.uint8))
    with pytest.raises(RasterMismatchError, match=r"masks/a.tif: shape differs.*expected 64x64, found 60x64"):
        make_dm(tmp_path / "data")
    write_tif(msk, np.zeros((64, 64), np.uint8), crs="EPSG:4326")
    with pytest.raises(RasterMismatchError, match=r"masks/a.tif: CRS differs"):
        make_dm(tmp_path / "data")


def test_transform_compared_with_tolerance(make_scene, tmp_path):
    img, msk = make_scene("a")
    make_scene("b")
    make_scene("c")
    write_tif(msk, np.zeros((64, 64), np.uint8), transform=from_origin(500000.0 + 1e-7, 5000000.0, 10.0, 10.0))
    make_dm(tmp_path / "data")  # sub-micrometre difference is the same grid


def test_missing_mask_and_missing_folder(make_scene, tmp_path):
    img, msk = make_scene("a")
    msk.unlink()
    with pytest.raises(DataNotFoundError, match=r"masks/a.tif: mask for image .* not found"):
        make_dm(tmp_path / "data")
    with pytest.raises(DataNotFoundError, match=r"nowhere/images: folder not found"):
        make_dm(tmp_path / "nowhere")


def test_band_count_mismatch_between_scenes(make_scene, tmp_path):
    make_scene("a", bands=3)
    make_scene("b", bands=4)
    with pytest.raises(BandMismatchError, match=r"b.tif: band count/dtype differs.*expected 3 x uint16, found 4 x uint16"):
        make_dm(tmp_path / "data")


def test_out_of_range_labels_error(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, classes=3)
    dm = make_dm(tmp_path / "data", num_classes=2)
    with pytest.raises(LabelError, match=r"mask values \[2\] in window .* outside the 2 classes"):
        dm._dataset(False)[TileSpec(0, 0, 0, 16, 16)]


def test_stats_are_cached(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    make_dm(tmp_path / "data").preprocessing
    cached = list((tmp_path / "data" / ".geobp_cache").glob("*.npz"))
    assert [p.name.split(".")[0] for p in cached] == ["bandstats"]  # one file for the training scenes
    before = [p.stat().st_mtime_ns for p in cached]
    make_dm(tmp_path / "data").preprocessing
    assert [p.stat().st_mtime_ns for p in cached] == before


def test_percentile_normalisation_in_unit_range(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data", normalization="percentile")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1


@pytest.mark.parametrize(("normalization", "size"), [("meanstd", (40, 50)), ("percentile", (40, 50)), ("meanstd", (12, 14))])
def test_device_normalisation_equals_the_cpu_preprocessing(make_scene, tmp_path, normalization, size):
    """Loader + on_after_batch_transfer gives what Preprocessing (numpy, per tile) gives, padding included."""
    for i in range(3):
        make_scene(f"s{i}", seed=i, size=size, nodata=0, nodata_rows=6, block=16 if size[0] >= 16 else None)
    dm = make_dm(tmp_path / "data", normalization=normalization, max_nodata_fraction=1.0)
    pre, ds = dm.preprocessing, dm._dataset(False)
    loader = dm.val_dataloader()
    specs = list(loader.sampler)
    assert any(s.height < 16 for s in specs) == (size[0] < 16)  # tiles of small scenes are padded
    batches = [dm.on_after_batch_transfer(b, 0) for b in loader]
    images = torch.cat([b["image"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    for spec, image, mask in zip(specs, images, masks, strict=True):
        raw = read_window(ds._open(ds.images[spec.scene]), Window(spec.col, spec.row, 16, 16), pre.bands, fill=0)
        expected, valid = pre(raw)
        np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6, atol=1e-6)
        valid[spec.height :] = False
        valid[:, spec.width :] = False
        labels = read_window(ds._open(ds.masks[spec.scene]), Window(spec.col, spec.row, 16, 16), 1, fill=255)
        assert torch.equal(mask, torch.from_numpy(np.where(valid, labels, 255).astype(np.int64)))


def test_mask_dtype_is_the_smallest_that_holds_the_labels():
    assert mask_dtype(3, 255) == np.uint8 and mask_dtype(256, 255) == np.uint8
    assert mask_dtype(300, 255) == np.int16 and mask_dtype(3, 1000) == np.int16 and mask_dtype(3, -1) == np.int16
    assert mask_dtype(3, 70000) == np.int64


def test_large_ignore_index_survives_the_compact_mask(make_scene, tmp_path):
    make_scene("a", size=(10, 12), block=None)
    ds = TileDataset([str(tmp_path / "data/images/a.tif")], [str(tmp_path / "data/masks/a.tif")], ["a"],
                     Preprocessing(bands=[1, 2, 3], mean=[0.0] * 3, std=[1.0] * 3), tile_size=16,
                     num_classes=3, ignore_index=1000)
    s = ds[TileSpec(0, 0, 0, 10, 12)]
    assert s["mask"].dtype == torch.int16
    assert (s["mask"][10:] == 1000).all() and (s["mask"][:, 12:] == 1000).all() and (s["mask"][:10, :12] < 3).all()
    batch = finish_batch(collate_tiles([s]), ds.preprocessing)
    assert batch["mask"].dtype == torch.int64 and int(batch["mask"].max()) == 1000
    assert finish_batch(batch, ds.preprocessing) is batch and batch["image"].dtype == torch.float32  # idempotent


def test_workers_read_tiles(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data", num_workers=2, tiles_per_epoch=16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b["raw"].shape == (4, 3, 16, 16) for b in batches)
    # what the workers send through shared memory: the file's uint16 pixels and uint8 labels
    assert all(b["raw"].dtype == torch.uint16 and b["mask"].dtype == torch.uint8 for b in batches)


@pytest.mark.parametrize("workers, prefetch", [(0, None), (2, None), (2, 4)])
def test_loader_settings_pinned_on_cuda_persistent_workers_prefetch(make_scene, tmp_path, workers, prefetch):
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = make_dm(tmp_path / "data", num_workers=workers, prefetch_factor=prefetch)
    for accelerator, pinned in ((CUDAAccelerator(), True), (CPUAccelerator(), False)):
        dm.trainer = SimpleNamespace(accelerator=accelerator, world_size=1, global_rank=0, current_epoch=0)
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert loader.pin_memory is pinned
            assert loader.num_workers == workers and loader.persistent_workers is (workers > 0)
            assert loader.prefetch_factor == (None if workers == 0 else prefetch or 2)
            # workers come from the fork server, not forked from this (threaded) process
            assert workers == 0 or loader.multiprocessing_context.get_start_method() == "forkserver"


def test_prefetch_factor_needs_workers(make_scene, tmp_path):
    make_scene("s0")
    with pytest.raises(ConfigError, match="data.prefetch_factor.*num_workers"):
        make_dm(tmp_path / "data", prefetch_factor=4)
