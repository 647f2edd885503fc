"""Inference reads the model's bands by name: band descriptions against the checkpoint's band names."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geobp.bands import bands_by_name, canonical_band, default_band_name, is_default_name
from geobp.data.preprocessing import Preprocessing
from geobp.errors import BandMismatchError, ConfigError
from geobp.inference.predict import PredictOptions, predict_raster
from tests.conftest import write_tif

S2 = ["B2", "B3", "B4", "B8"]


def test_names_in_training_order_read_the_training_bands():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bands_by_name("a.tif", ["B2", "B3", "B4", "B8"], [1, 2, 3], ["B2", "B3", "B4"]) == [1, 2, 3]
        assert bands_by_name("a.tif", ["B2", "B3", "B4", "B8"], [4, 1], ["b08", "b2"]) == [4, 1]  # canonical names


def test_reordered_bands_are_found_by_name_with_a_warning():
    with pytest.warns(UserWarning, match=r"a\.tif: bands \[3, 1\] hold the model's bands \['B2', 'B8'\]"):
        assert bands_by_name("a.tif", ["B8", "B4", "B2"], [1, 3], ["B2", "B8"]) == [3, 1]


def test_missing_band_names_the_file_both_lists_and_the_fix():
    with pytest.raises(BandMismatchError, match=r"a\.tif: the raster's bands are \['B2', 'B3', 'B4'\].*"
                                                r"trained on \['B2', 'B8'\] and \['B8'\] are not among them.*--match_bands order"):
        bands_by_name("a.tif", ["B2", "B3", "B4"], [1, 2], ["B2", "B8"])


@pytest.mark.parametrize("descriptions, model", [
    ((None, None, None), ["B2", "B3", "B4"]),            # undescribed raster: nothing to compare
    (("B2", None, "B4"), ["B2", "B3", "B4"]),            # partly described
    (("x", "y", "z"), [default_band_name(i) for i in (1, 2, 3)]),  # model trained on undescribed files
    (("B2", "B3", "B4"), None),                          # older checkpoint without band names
    (("B2", "B2", "B4"), ["B4", "B2", "B3"]),            # repeated descriptions say nothing
])
def test_nothing_to_compare_keeps_the_training_numbers(descriptions, model):
    assert bands_by_name("a.tif", descriptions, [1, 2, 3], model) == [1, 2, 3]


def test_name_rules():
    assert canonical_band(" B08A ") == canonical_band("b8a") == "b8a"
    assert is_default_name(default_band_name(12)) and not is_default_name("B12")


def _write(path: Path, data: np.ndarray, names: list[str]) -> Path:
    write_tif(path, data, nodata=0)
    with rasterio.open(path, "r+") as ds:
        for i, name in enumerate(names, start=1):
            ds.set_band_description(i, name)
    return path


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 4, 1).eval()


def test_infer_reads_a_reordered_raster_as_trained(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 1000, (4, 40, 48)).astype("uint16")
    data[0] *= 3  # bands on different scales, so that a swap changes the prediction
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[1500.0, 500.0, 500.0], std=[900.0, 300.0, 300.0])
    opts = dict(tile_size=16, overlap=8, progress=False, band_names=("B2", "B3", "B4"))
    trained = _write(tmp_path / "trained.tif", data, S2)
    order = [3, 0, 2, 1]  # the same bands, stored as B8, B2, B4, B3
    shuffled = _write(tmp_path / "shuffled.tif", data[order], [S2[i] for i in order])

    want = predict_raster(_model(), trained, tmp_path / "out" / "trained.tif", pre, PredictOptions(**opts))
    with pytest.warns(UserWarning, match=r"bands \[2, 4, 3\] hold the model's bands"):
        got = predict_raster(_model(), shuffled, tmp_path / "out" / "by_name.tif", pre, PredictOptions(**opts))
    as_numbered = predict_raster(_model(), shuffled, tmp_path / "out" / "as_numbered.tif", pre,
                                 PredictOptions(**opts, match_bands="order"))
    with rasterio.open(want) as a, rasterio.open(got) as b, rasterio.open(as_numbered) as c:
        assert np.array_equal(a.read(), b.read())
        assert not np.array_equal(a.read(), c.read())


def test_infer_refuses_a_raster_without_the_training_bands(tmp_path):
    data = np.ones((3, 20, 20), "uint16")
    src = _write(tmp_path / "other.tif", data, ["VV", "VH", "ratio"])
    pre = Preprocessing(bands=[1, 2, 3], nodata=0, mean=[0.0] * 3, std=[1.0] * 3)
    opts = PredictOptions(tile_size=16, overlap=8, progress=False, band_names=("B2", "B3", "B4"))
    with pytest.raises(BandMismatchError, match=r"other\.tif: the raster's bands are \['VV', 'VH', 'ratio'\]"):
        predict_raster(_model(), src, tmp_path / "out.tif", pre, opts)
    assert not (tmp_path / "out.tif").exists()


def test_match_bands_values_are_checked():
    with pytest.raises(ConfigError, match="unknown match_bands 'index'"):
        PredictOptions(match_bands="index")  # type: ignore[arg-type]
