"""Band names of the data (descriptions or data.band_names) and pretrained weights' normalisation."""

import numpy as np
import pytest
import rasterio

from geobp.data import GeoTiffDataModule, Preprocessing
from geobp.errors import BandMismatchError, ConfigError
from geobp.raster import read_info

S2 = "ResNet18_Weights.SENTINEL2_ALL_MOCO"


def make_dm(root, **kw):
    args = dict(root=str(root), num_classes=3, tile_size=16, tiles_per_epoch=8, batch_size=4, val_fraction=0.34, augment=False)
    args.update(kw)
    return GeoTiffDataModule(**args)


def describe_bands(path, names):
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = tuple(names)


@pytest.fixture
def described(make_scene, tmp_path):
    """Three 4-band scenes whose files call their bands B8, b4, B03, NDVI."""
    for i in range(3):
        img, _ = make_scene(f"s{i}", seed=i, bands=4)
        describe_bands(img, ["B8", "b4", "B03", "NDVI"])
    return tmp_path / "data"


def test_names_come_from_descriptions_in_the_selected_order(described):
    assert read_info(described / "images" / "s0.tif").descriptions == ("B8", "b4", "B03", "NDVI")
    assert make_dm(described).band_names == ["B8", "b4", "B03", "NDVI"]
    dm = make_dm(described, bands=[3, 1])
    assert dm.band_names == ["B03", "B8"]
    assert dm.preprocessing.band_names == ["B03", "B8"]
    assert Preprocessing.from_dict(dm.preprocessing.to_dict()).band_names == ["B03", "B8"]


def test_names_without_descriptions_and_from_the_option(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, bands=3)
    root = tmp_path / "data"
    assert make_dm(root).band_names == ["band_1", "band_2", "band_3"]
    assert make_dm(root, band_names=["B2", "B3", "B4"], bands=[3, 2]).band_names == ["B4", "B3"]
    with pytest.raises(ConfigError, match=r"data.band_names has 2 names for the 3 bands of the files.*Fix: give one name per band"):
        make_dm(root, band_names=["B2", "B3"])


def test_option_overrides_descriptions(described):
    assert make_dm(described, band_names=["a", "b", "c", "d"]).band_names == ["a", "b", "c", "d"]


def test_scenes_describing_bands_differently(described):
    describe_bands(described / "images" / "s2.tif", ["b4", "B8", "B03", "NDVI"])
    with pytest.warns(UserWarning, match=r"s2.tif: band descriptions \['b4', 'B8', 'B03', 'NDVI'\] differ"):
        make_dm(described)
    with pytest.raises(BandMismatchError, match=r"s2.tif: band descriptions .* differ from .*s0.tif.*Fix: write the same band order"):
        make_dm(described, pretrained_weights=S2)
    assert make_dm(described, pretrained_weights=S2, band_names=["B8", "B4", "B3", "NDVI"]).band_names[1] == "B4"


def test_pretrained_normalisation_by_default_and_overridden(described):
    dm = make_dm(described, pretrained_weights=S2)
    pre = dm.preprocessing
    # SSL4EO-S12 Sentinel-2 is x / 10000 for every band, so also for NDVI, which it lacks
    assert pre.method == "meanstd" and pre.mean == [0.0] * 4 and pre.std == [10000.0] * 4
    raw = np.full((4, 2, 2), 2500, np.uint16)
    assert np.allclose(pre(raw)[0], 0.25)
    # an explicit normalisation wins
    own = make_dm(described, pretrained_weights=S2, normalization="meanstd").preprocessing
    assert own.std != [10000.0] * 4 and own.mean == make_dm(described).preprocessing.mean
    assert make_dm(described, pretrained_weights=S2, normalization="percentile").preprocessing.method == "percentile"
    # a local weights file is not torchgeo's: the data's own statistics
    assert make_dm(described, pretrained_weights="resnet18.pth").preprocessing.std == own.std


def test_per_band_weights_normalisation_and_unknown_bands(make_scene, tmp_path):
    for i in range(3):
        img, _ = make_scene(f"s{i}", seed=i, bands=3)
        describe_bands(img, ["B02", "B11", "cloud"])
    dm = make_dm(tmp_path / "data", pretrained_weights="ResNet50_Weights.SENTINEL2_MI_MS_SATLAS")
    data = make_dm(tmp_path / "data").preprocessing
    # Satlas Sentinel-2: RGB / 255, other bands / 8160; a band it lacks keeps the data's statistics
    assert dm.preprocessing.std == [255.0, 8160.0, data.std[2]]
    assert dm.preprocessing.mean == [0.0, 0.0, data.mean[2]]


def test_too_few_bands_in_common_stops_before_statistics(described):
    with pytest.raises(ConfigError, match=r"only 1 of the data's 4 bands are in ResNet50_Weights.SENTINEL1_ALL_MOCO"):
        make_dm(described, pretrained_weights="ResNet50_Weights.SENTINEL1_ALL_MOCO", band_names=["VV", "x", "y", "z"])
    assert not list((described / ".geobp_cache").glob("*.npz"))  # no band statistics computed
    assert make_dm(described).preprocessing and list((described / ".geobp_cache").glob("*.npz"))  # (where they go)


def test_descriptions_survive_the_header_cache(described):
    make_dm(described)
    dm = make_dm(described)  # reads the headers from <root>/.geobp_cache/headers.json
    assert (described / ".geobp_cache" / "headers.json").is_file()
    assert dm.scenes[0].image.descriptions == ("B8", "b4", "B03", "NDVI")  # a tuple, as read_info gives it
    assert dm.band_names == ["B8", "b4", "B03", "NDVI"]
