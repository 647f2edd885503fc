"""The entropy output: 0 for one class, 254 for all equally likely, 255 at nodata, on the input's grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import torch

from geobp.inference import predict_raster
from geobp.inference.options import PredictOptions
from geobp.inference.sinks import EntropySink, normalized_entropy
from tests.inference.test_predict import PRE, conv_model, make_image, reference

K = 4


def cases() -> tuple[np.ndarray, np.ndarray]:
    """[K, 1, 5] distributions: uniform, one-hot (two of them), a 50/50 of two classes, and an uneven one;
    and their entropies computed by hand, in nats divided by log(K)."""
    probs = np.array([[0.25] * 4, [1, 0, 0, 0], [0, 0, 0, 1], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.1, 0.1]], np.float32)
    uneven = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)) / math.log(4)
    return probs.T[:, None, :].copy(), np.array([1.0, 0.0, 0.0, 0.5, uneven], np.float32)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_entropy_is_one_for_the_uniform_distribution_and_zero_for_one_class(kind):
    probs, want = cases()
    got = normalized_entropy(torch.from_numpy(probs) if kind == "torch" else probs)
    got = got.numpy() if kind == "torch" else got
    assert got.shape == (1, 1, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got[0, 0], want, atol=1e-6)


def test_one_class_has_no_uncertainty():
    assert normalized_entropy(np.ones((1, 2, 3), np.float32)).tolist() == [[[0.0] * 3] * 2]
    assert normalized_entropy(torch.ones(1, 2, 3)).tolist() == [[[0.0] * 3] * 2]


def test_the_sink_encodes_0_to_254_and_255_at_nodata_the_same_on_numpy_and_torch(tmp_path):
    sink = EntropySink(tmp_path / "a_entropy.tif", PredictOptions())
    probs, want = cases()
    valid = np.array([[True, True, True, True, False]])
    a = sink.encode(probs, valid)
    b = sink.encode(torch.from_numpy(probs), torch.from_numpy(valid))
    assert a.dtype == np.uint8 and b.dtype == torch.uint8
    np.testing.assert_array_equal(a, b.numpy())
    assert a.tolist() == [[[254, 0, 0, 127, 255]]]


def test_entropy_file_is_georeferenced_nodata_aware_and_matches_the_model(tmp_path):
    src = make_image(tmp_path / "a.tif")
    model = conv_model(1)
    dst = predict_raster(model, src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=8, progress=False,
                         probabilities="entropy", class_names=list("abcd"))
    classes, probs = reference(model, src)
    valid = classes != 255
    with rasterio.open(tmp_path / "a_entropy.tif") as ds, rasterio.open(src) as inp, rasterio.open(dst) as cm:
        entropy = ds.read(1)
        assert (ds.crs, ds.transform, ds.shape) == (inp.crs, inp.transform, inp.shape)
        assert ds.count == 1 and ds.dtypes == ("uint8",) and ds.nodata == 255
        assert ds.descriptions == ("entropy",) and ds.scales == pytest.approx((1 / 254,))
        assert ds.tags()["CLASS_NAMES"] == "a,b,c,d"
        assert (ds.read_masks(1)[~valid] == 0).all() and (ds.read_masks(1)[valid] == 255).all()
        assert (cm.read(1) == classes).all()
    want = -(probs * np.log(probs)).sum(0) / np.log(K) * 254
    assert (entropy[~valid] == 255).all()
    assert np.abs(entropy[valid].astype(float) - want[valid]).max() <= 1
    assert entropy[valid].max() <= 254 and len(np.unique(entropy[valid])) > 10


def test_the_entropy_file_is_written_atomically(tmp_path):
    from tests.inference.test_predict import Exploding

    src = make_image(tmp_path / "a.tif", size=(300, 70))
    with pytest.raises(RuntimeError, match="boom in forward"):
        predict_raster(Exploding(after=3), src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=8, batch_size=2,
                       progress=False, probabilities="entropy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]
