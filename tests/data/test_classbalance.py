"""Class-balanced tile sampling and class frequencies from the masks (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from geobp.data import GeoTiffDataModule
from geobp.data.classbalance import balance_factors, expected_shares, histogram_cache_file, cell_histograms, window_class_counts
from geobp.data.samplers import RandomTileSampler
from geobp.errors import ConfigError
from geobp.losses import class_weights_from_counts
from tests.conftest import write_tif

SIZE, RARE = 128, 2


def rare_masks(seed: int) -> np.ndarray:
    """Classes 0 and 1 in halves (with a jagged border), class 2 on one 12x12 square (~0.9%)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    split = rng.integers(40, 88)
    mask[:, split:] = 1
    r, c = rng.integers(0, SIZE - 12, size=2)
    mask[r : r + 12, c : c + 12] = RARE
    mask[0, :3] = 255  # a few unlabelled pixels: counted nowhere
    return mask


@pytest.fixture
def rare_data(tmp_path):
    root = tmp_path / "rare"
    masks = []
    for i in range(5):
        mask = rare_masks(i)
        image = (np.random.default_rng(i).integers(0, 1000, size=(2, SIZE, SIZE)) + mask * 100).astype(np.uint16)
        write_tif(root / "images" / f"s{i}.tif", image)
        write_tif(root / "masks" / f"s{i}.tif", mask)
        masks.append(mask)
    return root, masks


def make_dm(root, **kw):
    args = dict(root=str(root), num_classes=3, tile_size=16, tiles_per_epoch=400, batch_size=50, val_fraction=0.2,
                augment=False, seed=0)
    return GeoTiffDataModule(**{**args, **kw})


def batch_shares(dm: GeoTiffDataModule) -> np.ndarray:
    counts = np.zeros(3)
    for batch in dm.train_dataloader():
        m = batch["mask"].to(torch.int64).flatten()
        counts += torch.bincount(m[m < 3], minlength=3).numpy()
    return counts / counts.sum()


def test_balanced_sampling_shows_the_rare_class_3x_more(rare_data):
    root, masks = rare_data
    dm_u, dm_b = make_dm(root), make_dm(root, sampling="balanced")
    train = sorted({i for i, _ in dm_u.regions["train"]})
    rare_share = sum((masks[i] == RARE).sum() for i in train) / sum((masks[i] < 3).sum() for i in train)
    assert 0.005 < rare_share < 0.015
    uniform, balanced = batch_shares(dm_u), batch_shares(dm_b)
    assert balanced[RARE] >= 3 * uniform[RARE], (uniform, balanced)
    assert (balanced[:RARE] > 0.1).all()  # the common classes still appear
    # the start-up report's expectation agrees with what the batches show, within sampling noise
    summary = dm_b.class_summary()
    assert summary["sampled"][RARE] >= 3 * summary["uniform"][RARE]
    assert abs(summary["sampled"][RARE] - balanced[RARE]) < 0.5 * balanced[RARE]
    assert summary["share"][RARE] == pytest.approx(rare_share)


def test_balanced_draws_are_deterministic_and_rank_disjoint(rare_data):
    root, _ = rare_data
    cells = make_dm(root, sampling="balanced").train_cells()
    again = make_dm(root, sampling="balanced").train_cells()
    assert [sc.weights for sc in cells] == [sc.weights for sc in again]
    assert [sc.weights for sc in cells] != [sc.weights for sc in make_dm(root).train_cells()]
    whole = RandomTileSampler(cells, 16, 400, seed=3)
    ranks = [RandomTileSampler(again, 16, 400, seed=3, num_replicas=2, rank=r) for r in range(2)]
    draw = whole.draw(1)
    assert draw == RandomTileSampler(again, 16, 400, seed=3).draw(1) and draw != whole.draw(2)
    for s in ranks:
        s.set_epoch(1)
    shares = [list(s) for s in ranks]
    assert shares[0] == draw[0::2] and shares[1] == draw[1::2]
    assert len(shares[0]) + len(shares[1]) == len(draw)
    # resumable mid-epoch: `start` skips the tiles already handed out
    ranks[1].start = 7
    assert list(ranks[1]) == shares[1][7:]


def test_class_pixels_match_the_masks_counted_by_hand(rare_data):
    root, masks = rare_data
    dm = make_dm(root)
    train = sorted({i for i, _ in dm.regions["train"]})
    by_hand = [int(sum((masks[i] == k).sum() for i in train)) for k in range(3)]
    assert dm.class_pixels == by_hand
    freq = np.array(by_hand) / sum(by_hand)
    w = 1 / np.sqrt(freq)
    assert class_weights_from_counts(dm.class_pixels) == pytest.approx((w / w.mean()).tolist())
    # cached per mask under the cache folder; a second data module reads the cache
    cached = histogram_cache_file(dm.scenes[0].mask.path, 3, root)
    assert cached.exists() and cached.parent.name == ".geobp_cache"
    assert make_dm(root).class_pixels == by_hand


def test_cell_histograms_and_window_counts_are_exact_on_and_off_the_grid(tmp_path):
    mask = rare_masks(7)
    path = write_tif(tmp_path / "m.tif", mask[:100, :90])  # not a multiple of the cell size
    counts = cell_histograms(path, 3, factor=32)
    assert counts.shape == (3, 4, 3)
    sub = mask[:100, :90]
    assert counts.sum(axis=(1, 2)).tolist() == [int((sub == k).sum()) for k in range(3)]
    whole = window_class_counts(counts, Window(0, 0, 90, 100), 100, 90, factor=32)
    assert whole.tolist() == [float((sub == k).sum()) for k in range(3)]
    aligned = window_class_counts(counts, Window(32, 32, 32, 64), 100, 90, factor=32)
    assert aligned.tolist() == [float((sub[32:96, 32:64] == k).sum()) for k in range(3)]
    # off the grid: area-weighted, same total labelled share
    half = window_class_counts(counts, Window(0, 0, 16, 32), 100, 90, factor=32)
    assert half.sum() == pytest.approx(counts[:, 0, 0].sum() / 2)


def test_balance_factors_and_expected_shares():
    counts = np.array([[100.0, 0, 0], [50, 50, 0], [90, 0, 10]])
    assert balance_factors(counts, 0.0).tolist() == [1.0, 1.0, 1.0]
    f = balance_factors(counts, 1.0)
    # totals 240, 50, 10: a place is as rare as its rarest class, capped
    assert f.tolist() == pytest.approx([1.0, 240 / 50, 24.0])
    assert balance_factors(counts, 1.0, cap=10.0)[2] == 10.0
    assert balance_factors(counts, 0.5).tolist() == pytest.approx(np.sqrt([1.0, 240 / 50, 24.0]).tolist())
    shares = expected_shares(counts, np.ones(3))
    assert shares.tolist() == pytest.approx([0.8, 50 / 300, 10 / 300])
    assert expected_shares(counts, np.array([0.0, 0.0, 1.0])).tolist() == pytest.approx([0.9, 0.0, 0.1])


def test_class_weights_from_counts_by_hand_and_errors():
    assert class_weights_from_counts([75, 25]) == pytest.approx([2 / (1 + 3**0.5), 2 * 3**0.5 / (1 + 3**0.5)])
    # an absent class takes the rarest present class's count
    assert class_weights_from_counts([90, 10, 0]) == pytest.approx(class_weights_from_counts([90, 10, 10]))
    with pytest.raises(ValueError, match="needs labelled training pixels"):
        class_weights_from_counts([0, 0])


def test_balance_power_out_of_range_is_a_config_error(rare_data):
    with pytest.raises(ConfigError, match="balance_power must be in \\[0, 1\\].*data.balance_power"):
        make_dm(rare_data[0], balance_power=1.5)


def test_uniform_sampling_reads_no_mask(rare_data, monkeypatch):
    import geobp.data.datamodule as dmod

    def boom(*a, **k):
        raise AssertionError("cell histograms built under uniform sampling")

    monkeypatch.setattr(dmod, "load_cell_histograms", boom)
    dm = make_dm(rare_data[0])
    assert sum(len(sc.cells) for sc in dm.train_cells()) > 0
    with pytest.raises(AssertionError, match="cell histograms built"):
        make_dm(rare_data[0], sampling="balanced").train_cells()


def test_cell_histograms_leave_out_negative_and_ignored_values(tmp_path):
    mask = np.zeros((40, 40), np.int16)
    mask[:10] = -1
    mask[10:20] = 2
    mask[20:22] = 300
    counts = cell_histograms(write_tif(tmp_path / "m16.tif", mask), 3, factor=32)
    assert counts.sum(axis=(1, 2)).tolist() == [18 * 40, 0, 10 * 40]


def test_cell_histograms_are_cached_and_split_between_the_processes_of_a_node(rare_data, monkeypatch):
    import geobp.data.classbalance as cb
    from geobp.data.classbalance import load_cell_histograms
    from geobp.raster import read_info

    root, masks = rare_data
    infos = [read_info(root / "masks" / f"s{i}.tif") for i in range(len(masks))]
    first = load_cell_histograms(infos, 3, root)
    histogram_cache_file(infos[1].path, 3, root).unlink()
    built: list[str] = []
    real = cb.cell_histograms
    monkeypatch.setattr(cb, "cell_histograms", lambda path, n, factor=cb.HISTOGRAM_CELL: built.append(str(path)) or real(path, n, factor))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    again = load_cell_histograms(infos, 3, root)
    # process 1 of 2 builds its own share (masks 1, 3) where not cached, and reads the rest
    assert built == [str(infos[1].path)]
    assert all((a == b).all() for a, b in zip(first, again))
