"""The data options: one frozen group per concern, each value checked once, with one default."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from geobp.data import GeoTiffDataModule
from geobp.data.labels import LabelOptions
from geobp.data.options import LoaderOptions, SamplingOptions, SplitOptions, StatsOptions, check_split_tiles
from geobp.errors import ConfigError
from geobp.tiling import TilingOptions

GROUPS = {
    "tiling_options": TilingOptions,
    "sampling_options": SamplingOptions,
    "split_options": SplitOptions,
    "stats_options": StatsOptions,
    "loader_options": LoaderOptions,
}


def test_every_grouped_option_has_the_groups_default_in_the_signature():
    params = inspect.signature(GeoTiffDataModule.__init__).parameters
    seen = set()
    for group in [*GROUPS.values(), LabelOptions]:
        for f in dataclasses.fields(group):
            assert f.name in params, f"{group.__name__}.{f.name} is not a data option"
            if f.default is not dataclasses.MISSING:
                assert params[f.name].default == f.default, f"data.{f.name}: two defaults"
            seen.add(f.name)
    inputs = {"self", "root", "images", "labels", "bands", "band_names", "pretrained_weights", "cache_dir", "seed"}
    assert set(params) == seen | inputs  # every option is in exactly one group, or an input


@pytest.mark.parametrize("make,match", [
    (lambda: SamplingOptions(tiles_per_epoch=0), r"data.tiles_per_epoch must be at least 1 \(found 0\)\. Fix: "),
    (lambda: SamplingOptions(sampling="rare"), r"data.sampling is 'rare' \(expected one of uniform, balanced\)\. Fix: set data.sampling"),
    (lambda: SamplingOptions(balance_power=1.5), r"balance_power must be in \[0, 1\] \(found 1.5\)\. Fix: set data.balance_power"),
    (lambda: SamplingOptions(max_nodata_fraction=-0.1), r"data.max_nodata_fraction must be in \[0, 1\] \(found -0.1\)"),
    (lambda: SplitOptions(split="rows"), r"data.split is 'rows' \(expected one of scene, blocks\)"),
    (lambda: SplitOptions(val_fraction=0.6, test_fraction=0.4), r"val_fraction and test_fraction must be in \[0, 1\) and sum"),
    (lambda: SplitOptions(split_block_size=0), r"split block size must be positive \(found 0\)"),
    (lambda: StatsOptions(normalization="zscore"), r"data.normalization is 'zscore' \(expected one of meanstd, percentile\)"),
    (lambda: StatsOptions(validity="never"), r"data.validity is 'never' \(expected one of auto, scan, at_read\)"),
    (lambda: StatsOptions(stats_budget=-1), r"data.stats_budget must be >= 0 \(found -1\)"),
    (lambda: LoaderOptions(batch_size=0), r"data.batch_size must be at least 1 \(found 0\)"),
    (lambda: LoaderOptions(num_workers=-1), r"data.num_workers must be >= 0 \(found -1\)"),
    (lambda: LoaderOptions(prefetch_factor=2), r"data.prefetch_factor: 2 needs data.num_workers > 0 .*found num_workers 0"),
    (lambda: LoaderOptions(num_workers=2, prefetch_factor=0), r"data.prefetch_factor: 0 needs"),
    (lambda: LoaderOptions(worker_start="threads"), r"data.worker_start is 'threads' \(expected one of forkserver, spawn, fork\)"),
    (lambda: LoaderOptions(on_read_error="retry"), r"data.on_read_error is 'retry' \(expected one of stop, skip\)"),
])
def test_each_group_rejects_a_bad_value_with_the_fix(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_groups_are_frozen_and_keep_good_values():
    loader = LoaderOptions(batch_size=4, num_workers=2, prefetch_factor=4, on_read_error="skip")
    assert (loader.batch_size, loader.num_workers, loader.prefetch_factor, loader.on_read_error) == (4, 2, 4, "skip")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loader.batch_size = 8  # type: ignore[misc]
    assert SplitOptions(val_fraction=0.2, test_fraction=0.1).fractions == pytest.approx((0.7, 0.2, 0.1))
    assert SamplingOptions(max_nodata_fraction=0.25).min_valid_fraction == 0.75
    assert StatsOptions(stats_budget=0).budget_pixels == 2**62 and StatsOptions(stats_budget=100).budget_pixels == 100


def test_split_blocks_must_hold_a_tile_only_under_split_blocks():
    check_split_tiles(SplitOptions(split="scene", split_block_size=64), TilingOptions(256))  # unused block size
    with pytest.raises(ConfigError, match=r"split_block_size must be at least tile_size \(found 64 < 256\)\. Fix: raise data.split_block_size"):
        check_split_tiles(SplitOptions(split="blocks", split_block_size=64), TilingOptions(256))


def test_label_options_from_a_data_section_with_the_data_modules_defaults():
    options = LabelOptions.from_config({"num_classes": 3, "tile_size": 64})  # other keys are ignored
    assert options == LabelOptions(3, 255, ("class_0", "class_1", "class_2"), {}, None, None, False)
    nulls = LabelOptions.from_config({"num_classes": 3, "ignore_index": None, "label_map": None, "all_touched": None})
    assert nulls == options
    full = LabelOptions.from_config({"num_classes": 2, "ignore_index": 254, "class_names": ["land", "water"],
                                     "label_map": {-1: 254, "lake": 1}, "label_field": "kind", "label_background": 0,
                                     "all_touched": True})
    assert full.class_names == ("land", "water") and full.ignore_index == 254 and full.label_map == {-1: 254, "lake": 1}
    assert (full.label_field, full.label_background, full.all_touched) == ("kind", 0, True)


@pytest.mark.parametrize("data,match", [
    ({}, r"num_classes is not set\. Fix: set data.num_classes"),
    ({"num_classes": 1}, r"num_classes must be >= 2 \(found 1\)"),
    ({"num_classes": 3, "class_names": ["a", "b"]}, r"class_names has 2 entries for 3 classes"),
    ({"num_classes": 3, "ignore_index": 2}, r"ignore_index must be in \[num_classes, 255\] \(found 2 with 3 classes\)"),
    ({"num_classes": 3, "ignore_index": 300}, r"ignore_index must be in \[num_classes, 255\] \(found 300"),
    ({"num_classes": 3, "label_map": {7: 9}}, r"data.label_map maps \{7: 9\} to values that are neither class ids 0..2"),
])
def test_label_options_from_config_reject_bad_values(data, match):
    with pytest.raises(ConfigError, match=match):
        LabelOptions.from_config(data)


def test_label_settings_are_json_and_rebuild_the_same_lookup():
    options = LabelOptions.from_config({"num_classes": 5, "label_map": {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4},
                                        "label_field": None, "all_touched": False})
    settings = options.settings
    # the raw values as the config gave them (a label_map is read back as the user wrote it)
    assert settings == {"label_map": {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}, "label_field": None,
                        "label_background": None, "all_touched": False}
    # through JSON the keys become text, and they still map the same values
    again = LabelOptions.from_config({"num_classes": 5, **json.loads(json.dumps(settings))})
    assert [again.lookup(v) for v in range(6)] == [options.lookup(v) for v in range(6)] == [255, 0, 1, 2, 3, 4]


def test_data_module_builds_each_group_once_from_its_flat_options(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = GeoTiffDataModule(str(tmp_path / "data"), num_classes=3, tile_size=32, overlap=8, tiles_per_epoch=12,
                           sampling="balanced", batch_size=4, split="blocks", split_block_size=32, stats_budget=0,
                           label_map={9: 255}, on_read_error="skip")
    assert dm.tiling_options == TilingOptions(32, 8)
    assert dm.sampling_options == SamplingOptions(tiles_per_epoch=12, sampling="balanced")
    assert dm.split_options == SplitOptions(split="blocks", split_block_size=32)
    assert dm.stats_options == StatsOptions(stats_budget=0)
    assert dm.loader_options == LoaderOptions(batch_size=4, on_read_error="skip")
    assert isinstance(dm.label_options, LabelOptions)
    assert dm.label_options == LabelOptions.from_config(dm.hparams) and dm.label_options.label_map == {9: 255}
    assert dm.hparams["tile_size"] == 32 and dm.hparams["num_classes"] == 3  # the flat options are still saved
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, tile size\) \(tile 32, found overlap 32\)"):
        GeoTiffDataModule(str(tmp_path / "data"), num_classes=3, tile_size=32, overlap=32)
