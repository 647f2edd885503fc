"""Start-up that does not grow with the data: sampled band statistics, cheap validity maps, shared work."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from geobp.data.bandstats import BandStats, draw_blocks, load_band_stats, sample_band_stats
from geobp.data.preprocessing import combine_stats, scan_scene
from geobp.data.ranks import computed_once
from geobp.data.validity import cheap_validity, validity_maps
from geobp.raster import read_info
from tests.conftest import write_tif


def scenes(tmp_path, n=4, size=64, nodata=None, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = (rng.normal(1000 + 100 * i, 50 + 10 * i, (3, size, size))).clip(1, None).astype("uint16")
        if nodata is not None:
            img[:, : size // 4] = nodata
        paths.append(write_tif(tmp_path / "img" / f"s{i}.tif", img, nodata=nodata, block=16))
    return [read_info(p) for p in paths]


def exact_stats(infos, nodata):
    return combine_stats([scan_scene(i.path, nodata) for i in infos], [1, 2, 3], nodata)


def test_small_data_is_read_whole_and_exact(tmp_path):
    infos = scenes(tmp_path, nodata=0)
    chosen, total = draw_blocks(infos, budget=10**9, seed=0)
    assert total == 4 * 16 and sum(map(len, chosen.values())) == total
    stats = sample_band_stats(infos, None, budget=10**9)
    assert stats.exact and stats.pixels == 4 * 64 * 64
    got = combine_stats([stats], [1, 2, 3], 0)
    want = exact_stats(infos, 0)
    assert np.allclose(got.mean, want.mean, rtol=1e-12) and np.allclose(got.std, want.std, rtol=1e-9)


def test_a_budget_reads_that_many_pixels_of_blocks_drawn_across_scenes(tmp_path):
    infos = scenes(tmp_path, n=6, size=128)
    budget = 40 * 16 * 16  # 40 of 384 blocks
    chosen, total = draw_blocks(infos, budget, seed=3)
    assert total == 6 * 64 and sum(map(len, chosen.values())) == 40
    assert len(chosen) > 1  # across scenes ...
    again, _ = draw_blocks(infos, budget, seed=3)
    assert again == chosen  # ... the same for a seed ...
    assert draw_blocks(infos, budget, seed=4)[0] != chosen  # ... another for another seed
    for s, windows in chosen.items():
        assert len({(w.row_off, w.col_off) for w in windows}) == len(windows)  # without replacement
        assert all(w.row_off % 16 == 0 and w.col_off % 16 == 0 for w in windows)  # whole blocks
    stats = sample_band_stats(infos, None, budget, seed=3)
    assert not stats.exact and stats.pixels == budget and stats.blocks == 40
    got, want = combine_stats([stats], [1, 2, 3], None), exact_stats(infos, None)
    assert np.allclose(got.mean, want.mean, rtol=0.03)
    assert np.allclose(got.std, want.std, rtol=0.15)


def test_band_stats_cache_is_reused_and_keyed_by_budget(tmp_path, monkeypatch):
    infos = scenes(tmp_path)
    first = load_band_stats(infos, None, tmp_path, budget=5 * 256, seed=0)
    import geobp.data.bandstats as mod

    monkeypatch.setattr(mod, "sample_band_stats", lambda *a, **k: pytest.fail("read again"))
    again = load_band_stats(infos, None, tmp_path, budget=5 * 256, seed=0)
    assert isinstance(again, BandStats) and again.describe() == first.describe()
    assert np.array_equal(again.total, first.total)
    with pytest.raises(pytest.fail.Exception, match="read again"):
        load_band_stats(infos, None, tmp_path, budget=6 * 256, seed=0)


def test_validity_from_the_cheapest_source(tmp_path):
    size = 64
    img = np.full((2, size, size), 500, "uint16")
    img[:, :, :24] = 0
    plain = write_tif(tmp_path / "plain.tif", img, nodata=0)
    want = scan_scene(plain, None).validity

    # no nodata, integer pixels: nothing to read
    m, src = cheap_validity(read_info(write_tif(tmp_path / "nonodata.tif", img)), None)
    assert src == "all_valid" and m.shape == want.shape and m.min() == 1.0
    # a nodata value and nothing else: only a full read can tell
    assert cheap_validity(read_info(plain), None) is None
    # an internal mask band
    masked = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(plain) as s, rasterio.open(masked, "w", **s.profile) as d:
            d.write(s.read())
            d.write_mask(s.dataset_mask())
    m, src = cheap_validity(read_info(masked), None)
    assert src == "mask" and np.allclose(m, want)
    # internal overviews
    ov = tmp_path / "ov.tif"
    with rasterio.open(plain) as s, rasterio.open(ov, "w", **s.profile) as d:
        d.write(s.read())
    with rasterio.open(ov, "r+") as d:
        d.build_overviews([2, 4, 8], Resampling.nearest)
    m, src = cheap_validity(read_info(ov), None)
    assert src == "overview" and np.allclose(m, want)
    maps, sources = validity_maps([read_info(p) for p in (plain, masked, ov)], None, tmp_path)
    assert sources == ["scan", "mask", "overview"] and all(np.allclose(x, want) for x in maps)


def test_one_process_computes_and_the_others_wait_for_its_file(tmp_path):
    cache = tmp_path / "c" / "x.txt"
    calls = []

    def compute():
        calls.append(threading.current_thread().name)
        time.sleep(0.3)
        cache.parent.mkdir(exist_ok=True)
        cache.write_text("42")
        return 42

    def load():
        return int(cache.read_text()) if cache.exists() else None

    results = {}
    waiter = threading.Thread(target=lambda: results.update(w=computed_once(cache, load, compute, owner=False, poll=0.05)),
                              name="waiter")
    waiter.start()
    results["o"] = computed_once(cache, load, compute, owner=True)
    waiter.join(5)
    assert results == {"o": 42, "w": 42} and calls == ["MainThread"]


def test_a_waiter_gives_up_after_its_timeout_with_a_warning(tmp_path):
    cache = tmp_path / "never.txt"
    with pytest.warns(RuntimeWarning, match="never.txt: waited 0 s for another process"):
        assert computed_once(cache, lambda: None, lambda: 7, owner=False, wait_seconds=0.2, poll=0.05) == 7


def test_datamodule_records_how_its_statistics_were_sampled(make_scene, tmp_path):
    from geobp.data import GeoTiffDataModule

    for i in range(3):
        make_scene(f"s{i}", seed=i, size=(64, 64))
    kw = dict(num_classes=3, tile_size=32, tiles_per_epoch=8, batch_size=4, val_fraction=0.34)
    exact = GeoTiffDataModule(str(tmp_path / "data"), **kw).preprocessing
    assert exact.statistics["exact"] and exact.statistics["pixels"] == 2 * 64 * 64
    sampled = GeoTiffDataModule(str(tmp_path / "data"), stats_budget=3 * 256, **kw).preprocessing
    assert sampled.statistics == {"blocks": 3, "total_blocks": 32, "pixels": 768, "budget": 768, "seed": 0, "exact": False}
    assert np.allclose(sampled.mean, exact.mean, rtol=0.2)
    assert sampled.to_dict()["statistics"]["blocks"] == 3  # stored in the checkpoint with the statistics
