"""Validity without a start-up scan: tiles with too much nodata rejected when read (``data.validity``)."""

from __future__ import annotations

import numpy as np
import pytest

from geobp.data import GeoTiffDataModule
from geobp.data.dataset import TileDataset, TileSpec
from geobp.data.preprocessing import Preprocessing
from geobp.data.samplers import Redraw, SceneCells
from geobp.data.validity import validity_maps
from geobp.raster import read_info
from geobp.tiling import origin_cells
from rasterio.windows import Window

SIZE, TILE = 96, 16


@pytest.fixture
def half_nodata(make_scene):
    """A scene whose top 64 of 96 rows are nodata (no mask band, no overviews: only a scan can tell)."""
    return make_scene("s", size=(SIZE, SIZE), nodata=0, nodata_rows=64)


def test_modes_decide_which_scenes_are_scanned(half_nodata, tmp_path):
    info = read_info(half_nodata[0])
    need = SIZE * SIZE * 3 * 2  # decoded bytes of the scene
    maps, sources = validity_maps([info], None, tmp_path / "c1", mode="at_read")
    assert sources == ["at_read"] and maps[0].min() == 1.0
    assert not (tmp_path / "c1").exists()  # nothing scanned, nothing cached
    _, sources = validity_maps([info], None, tmp_path / "c2", mode="auto", scan_budget=need - 1)
    assert sources == ["at_read"]
    maps, sources = validity_maps([info], None, tmp_path / "c3", mode="auto", scan_budget=need)
    assert sources == ["scan"] and maps[0].min() == 0.0  # the nodata rows are found
    _, sources = validity_maps([info], None, tmp_path / "c4", mode="scan", scan_budget=0)
    assert sources == ["scan"]


def _dataset(paths, redraw):
    image, mask = paths
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[0.0] * 3, std=[1.0] * 3)
    return TileDataset([str(image)], [str(mask)], ["s"], pre, TILE, num_classes=3, redraw=redraw)


def _redraw(min_valid=0.5, tries=4):
    cells = origin_cells(Window(0, 0, SIZE, SIZE), TILE, 16, 16)
    scene = SceneCells(0, SIZE, SIZE, cells, [float(c.count) for c in cells])
    return Redraw({0: scene}, TILE, min_valid=min_valid, seed=3, tries=tries)


def test_a_tile_in_the_nodata_is_replaced_by_one_with_enough_valid_pixels(half_nodata):
    ds = _dataset(half_nodata, _redraw(tries=50))
    spec = TileSpec(0, 8, 8, TILE, TILE, aug_seed=7)  # all nodata
    plain = _dataset(half_nodata, None)[spec]
    assert (plain["mask"] == 255).all()
    sample = ds[spec]
    row, col = sample["window"][:2].tolist()
    assert (row, col) != (8, 8) and row + TILE > 64  # another place, reaching below the nodata rows
    assert (sample["mask"] != 255).float().mean() >= 0.5
    again = ds[spec]  # the same replacement in any worker or run
    assert np.array_equal(again["window"], sample["window"]) and np.array_equal(again["raw"], sample["raw"])
    kept = _dataset(half_nodata, None)[TileSpec(0, 72, 8, TILE, TILE)]
    assert np.array_equal(ds[TileSpec(0, 72, 8, TILE, TILE)]["raw"], kept["raw"])  # valid tiles are kept as drawn


def test_retries_are_bounded(half_nodata):
    ds = _dataset(half_nodata, _redraw(min_valid=1.01, tries=3))  # no tile can pass
    calls = []
    read = ds._read_image
    ds._read_image = lambda spec: calls.append(spec) or read(spec)
    ds[TileSpec(0, 8, 8, TILE, TILE)]
    assert len(calls) == 4  # the tile drawn and three replacements, then the last is kept


def test_training_tiles_meet_the_nodata_limit_without_a_scan(make_scene, tmp_path, caplog):
    import logging

    make_scene("s", size=(SIZE, SIZE), nodata=0, nodata_rows=48)
    kw = dict(root=str(tmp_path / "data"), num_classes=3, tile_size=TILE, tiles_per_epoch=40, batch_size=8,
              val_fraction=0.0, augment=False, max_nodata_fraction=0.5, split="blocks", split_block_size=32)
    dm = GeoTiffDataModule(validity="at_read", **kw)
    with caplog.at_level(logging.INFO):
        loader = dm.train_dataloader()
    assert dm.validity_sources == ["at_read"]
    assert "1 of 1 scenes have a nodata value but neither a mask band nor overviews and were not scanned" in caplog.text
    drawn = list(loader.sampler)
    assert sum(s.row + s.height <= 48 for s in drawn) >= 5  # the draw does not know the nodata ...
    masks = np.concatenate([b["mask"].numpy() for b in loader])
    labelled = (masks != 255).mean(axis=(1, 2))
    assert len(labelled) == 40 and labelled.min() >= 0.5  # ... the tiles read do
    scanned = GeoTiffDataModule(validity="scan", **kw)
    scanned.train_dataloader()
    assert scanned.validity_sources == ["scan"]


def test_check_says_what_start_up_must_read(half_nodata, make_scene, tmp_path):
    import rasterio
    from rasterio.enums import Resampling

    from geobp.data.validity import startup_note

    with_overviews, _ = make_scene("o", size=(SIZE, SIZE), nodata=0, nodata_rows=10)
    with rasterio.open(with_overviews, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.nearest)
    no_nodata, _ = make_scene("n", size=(SIZE, SIZE))
    infos = [read_info(p) for p in (half_nodata[0], with_overviews, no_nodata)]
    note = startup_note(infos, None)
    assert note.startswith("1 of 3 scenes have a nodata value but neither a mask band nor overviews, so `geobp fit` "
                           "decodes them once at start-up (0 MiB, then cached)") and "gdaladdo" in note
    assert "does not scan them" in startup_note(infos, None, scan_budget=100)
    assert startup_note(infos[1:], None) is None
