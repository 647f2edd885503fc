"""geobp.sources.stac: loading items from Item / ItemCollection / Catalog documents and choosing bands.

Documents are read locally, from the local HTTP server and from moto's S3 (conftest.py).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension

from geobp.errors import ConfigError, DataNotFoundError
from geobp.sources.bandref import BandRef
from geobp.sources.stac import asset_resolutions, band_assets, load_items, select_bands
from geobp.sources.urls import gdal_read_options
from tests.sources.conftest import BUCKET, S2_BANDS, StacTree, item_dict
from tests.sources.servers import ServerProcess

SECRET = "c2VjcmV0c2lnbmF0dXJl"


def read_ref(ref: BandRef) -> np.ndarray:
    with rasterio.Env(**gdal_read_options()), rasterio.open(ref.path) as src:
        return src.read(ref.band)


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


# --- the fixtures are STAC -----------------------------------------------------------------------


def test_fixture_items_are_structurally_valid_stac(stac_tree: StacTree) -> None:
    """``Item.validate()`` downloads the extension schemas (no network here), so check structure instead.

    Each document survives pystac's ``from_dict``/``to_dict`` round trip unchanged, and pystac's
    extension classes read the eo, proj and raster fields.
    """
    for rel in (stac_tree.item, stac_tree.item_pc):
        doc = json.loads((stac_tree.root / rel).read_text())
        item = pystac.Item.from_dict(copy.deepcopy(doc), migrate=False)
        out = item.to_dict(include_self_link=False, transform_hrefs=False)
        assert out.pop("stac_version") == pystac.get_stac_version()  # pystac writes its own version
        assert out == {k: v for k, v in doc.items() if k != "stac_version"}
        key = "red" if rel == stac_tree.item else "B04"
        asset = item.assets[key]
        assert EOExtension.ext(asset).bands[0].common_name == "red"
        assert EOExtension.ext(asset).bands[0].name == "B04"
        assert ProjectionExtension.ext(asset).transform[0] == 10
        assert ProjectionExtension.ext(item).epsg == 32633
        assert RasterExtension.ext(asset).bands[0].nodata == 0
    collection = pystac.ItemCollection.from_dict(json.loads((stac_tree.root / stac_tree.collection).read_text()))
    assert [i.id for i in collection] == list(stac_tree.ids[:2])
    catalog = pystac.Catalog.from_file(str(stac_tree.root / stac_tree.catalog))
    assert len(list(catalog.get_items(recursive=True))) == 3


# --- loading -------------------------------------------------------------------------------------


def test_load_item_local_makes_asset_hrefs_absolute(stac_tree: StacTree) -> None:
    (item,) = load_items(stac_tree.root / stac_tree.item)
    assert item.id == stac_tree.ids[0]
    assert item.assets["red"].href == str(stac_tree.tif(0, "B04"))
    assert Path(item.get_self_href()) == stac_tree.root / stac_tree.item


def test_load_item_collection_and_catalog_local(stac_tree: StacTree) -> None:
    items = load_items(str(stac_tree.root / stac_tree.collection))
    assert [i.id for i in items] == list(stac_tree.ids[:2])
    assert items[1].assets["B04"].href == str(stac_tree.tif(1, "B04"))  # relative to search.json
    assert items[1].get_self_href() == str(stac_tree.root / stac_tree.collection)
    catalog_items = load_items(stac_tree.root / stac_tree.catalog)
    assert [i.id for i in catalog_items] == list(stac_tree.ids)
    assert catalog_items[2].assets["B04"].href == str(stac_tree.tif(2, "B04"))  # ../../../ from the item file
    collection_items = load_items(stac_tree.root / "catalog/sentinel-2-l2a/collection.json")
    assert [i.id for i in collection_items] == list(stac_tree.ids)


def test_load_over_http_and_read_a_band(http_server: ServerProcess, stac_tree: StacTree) -> None:
    base = http_server.url
    (item,) = load_items(f"{base}/{stac_tree.item}")
    assert item.assets["nir"].href == f"{base}/{stac_tree.ids[0]}/B08.tif"
    items = load_items(f"{base}/{stac_tree.collection}")
    assert items[1].assets["B8A"].href == f"{base}/{stac_tree.ids[1]}/B8A.tif"
    catalog_items = load_items(f"{base}/{stac_tree.catalog}")
    assert [i.id for i in catalog_items] == list(stac_tree.ids)
    (ref,) = select_bands(catalog_items[2], ["nir"])
    assert ref.path == f"/vsicurl/{base}/{stac_tree.ids[2]}/B08.tif"
    np.testing.assert_array_equal(read_ref(ref), stac_tree.array(2, "B08")[0])


def test_load_catalog_from_s3(s3_bucket: str, stac_tree: StacTree) -> None:
    items = load_items(f"s3://{s3_bucket}/{stac_tree.catalog}")
    assert [i.id for i in items] == list(stac_tree.ids)
    (ref,) = select_bands(items[0], ["swir16"])
    assert ref.path == f"/vsis3/{s3_bucket}/{stac_tree.ids[0]}/B11.tif"
    np.testing.assert_array_equal(read_ref(ref), stac_tree.array(0, "B11")[0])
    assert load_items(f"/vsis3/{s3_bucket}/{stac_tree.item}")[0].assets["red"].href == \
        f"s3://{s3_bucket}/{stac_tree.ids[0]}/B04.tif"


def test_load_errors_are_one_line(stac_tree: StacTree, tmp_path: Path, http_server: ServerProcess) -> None:
    with pytest.raises(DataNotFoundError, match=r"empty\.json: the STAC FeatureCollection holds no items\. "
                                                r"Fix: choose a search or catalog with items"):
        load_items(stac_tree.root / stac_tree.empty)
    empty_catalog = write_json(tmp_path / "cat.json", {"type": "Catalog", "stac_version": "1.0.0", "id": "c",
                                                       "description": "d", "links": []})
    with pytest.raises(DataNotFoundError, match=r"cat\.json: the STAC Catalog holds no items"):
        load_items(empty_catalog)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not a JSON document \(.*\)\. Fix: give a STAC Item"):
        load_items(tmp_path / "bad.json")
    geojson = write_json(tmp_path / "geo.json", {"type": "Polygon", "coordinates": []})
    with pytest.raises(ConfigError, match=r"geo\.json: not a STAC document \(expected type Feature, FeatureCollection, "
                                          r"Catalog or Collection, found 'Polygon'\)"):
        load_items(geojson)
    no_id = write_json(tmp_path / "noid.json", {"type": "Feature", "stac_version": "1.0.0", "geometry": None,
                                                "properties": {"datetime": "2026-06-01T00:00:00Z"}, "links": [], "assets": {}})
    with pytest.raises(ConfigError, match=r"noid\.json: a STAC item without an id \(expected a string, found None\)"):
        load_items(no_id)
    no_date = write_json(tmp_path / "nodate.json", {"type": "Feature", "stac_version": "1.0.0", "id": "x",
                                                    "geometry": None, "properties": {}, "links": [], "assets": {}})
    with pytest.raises(ConfigError, match=r"nodate\.json: not a valid STAC Feature \(STACError: .*datetime.*\)\. "
                                          r"Fix: check the document against the STAC specification\.$"):
        load_items(no_date)
    with pytest.raises(DataNotFoundError, match=r"nothere\.json: file not found"):
        load_items(tmp_path / "nothere.json")
    url = f"{http_server.url}/gone/item.json?X-Amz-Signature={SECRET}"
    with pytest.raises(DataNotFoundError) as info:
        load_items(url)
    assert str(info.value).startswith(f"{http_server.url}/gone/item.json?X-Amz-Signature=REDACTED: not found (HTTP")
    assert SECRET not in str(info.value)


def test_catalog_with_a_missing_child_names_it(tmp_path: Path) -> None:
    catalog = write_json(tmp_path / "catalog.json", {
        "type": "Catalog", "stac_version": "1.0.0", "id": "c", "description": "d",
        "links": [{"rel": "child", "href": "./gone/collection.json", "type": "application/json"}]})
    with pytest.raises(DataNotFoundError, match=rf"^{tmp_path}/gone/collection\.json: file not found\. "
                                                r"Fix: check the path\.$"):
        load_items(catalog)


# --- choosing bands ------------------------------------------------------------------------------


@pytest.fixture
def items(stac_tree: StacTree) -> list[pystac.Item]:
    """The three scenes through the catalog: Earth Search style, Planetary Computer style, STAC 1.1."""
    return load_items(stac_tree.root / stac_tree.catalog)


def test_select_by_asset_key_band_name_and_common_name(items: list[pystac.Item], stac_tree: StacTree) -> None:
    earth_search, pc, stac11 = items
    # asset key (Earth Search calls B05 "rededge1")
    (ref,) = select_bands(earth_search, ["rededge1"])
    assert ref == BandRef(name="rededge1", path=str(stac_tree.tif(0, "B05")), band=1, nodata=0.0)
    # eo:bands name differing from the asset key
    (ref,) = select_bands(earth_search, ["B04"])
    assert (ref.name, ref.path, ref.nodata) == ("B04", str(stac_tree.tif(0, "B04")), 0.0)
    # common name differing from the asset key
    refs = select_bands(pc, ["blue", "green", "red", "nir", "swir22"])
    assert [Path(r.path).name for r in refs] == ["B02.tif", "B03.tif", "B04.tif", "B08.tif", "B12.tif"]
    assert [r.name for r in refs] == ["blue", "green", "red", "nir", "swir22"]
    # STAC 1.1 bands arrays: eo:common_name and nodata inside the band
    refs = select_bands(stac11, ["red", "B8A", "nir09"])
    assert [Path(r.path).name for r in refs] == ["B04.tif", "B8A.tif", "B09.tif"]
    assert all(r.nodata == 0.0 and r.band == 1 for r in refs)
    np.testing.assert_array_equal(read_ref(refs[1]), stac_tree.array(2, "B8A")[0])
    # names are case-insensitive
    assert select_bands(pc, ["b04"])[0].path == str(stac_tree.tif(1, "B04"))


def test_select_all_and_by_position(items: list[pystac.Item], stac_tree: StacTree) -> None:
    earth_search = items[0]
    keys = band_assets(earth_search)
    assert keys == [S2_BANDS[b][2] for b in S2_BANDS]  # asset order; no thumbnail, no metadata
    refs = select_bands(earth_search)
    assert [r.name for r in refs] == keys
    assert [Path(r.path).stem for r in refs] == list(S2_BANDS)
    assert [r.name for r in select_bands(earth_search, [4, 1])] == ["red", "coastal"]
    with pytest.raises(ConfigError, match=r"\(item S2A_33UUP_20260601_0_L2A\): band position 13 is out of range "
                                          r"\(expected 1\.\.12, the band assets coastal, blue,"):
        select_bands(earth_search, [13])


def test_mistyped_band_name_lists_names_and_suggests(items: list[pystac.Item], stac_tree: StacTree) -> None:
    with pytest.raises(ConfigError) as info:
        select_bands(items[1], ["red", "B4"])
    message = str(info.value)
    item_file = stac_tree.root / "catalog/sentinel-2-l2a" / stac_tree.ids[1] / f"{stac_tree.ids[1]}.json"
    assert message.startswith(f"{item_file} (item {stac_tree.ids[1]}): no band 'B4' in the item (expected an asset "
                              "key, band name or common name, found asset keys B01, B02, B03, B04")
    assert "common names coastal, blue, green, red, rededge, nir, nir08, nir09, swir16, swir22)" in message
    assert "Fix: did you mean 'B04'" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"no band 'infrared' in the item .*Fix: use one of those names\.$"):
        select_bands(items[1], ["infrared"])


def test_item_without_the_selected_asset(scene_copy: StacTree) -> None:
    path = scene_copy.root / scene_copy.collection
    doc = json.loads(path.read_text())
    del doc["features"][1]["assets"]["B8A"]
    del doc["features"][1]["assets"]["B09"]
    write_json(path, doc)
    first, second = load_items(path)
    assert len(select_bands(first, ["B8A", "nir09"])) == 2
    with pytest.raises(DataNotFoundError, match=rf"^{path} \(item {scene_copy.ids[1]}\): the item has no asset for "
                                                r"band 'B8A' \(expected it among asset keys B01, .*\)\. "
                                                r"Fix: choose bands every item has"):
        select_bands(second, ["B8A"])
    with pytest.raises(DataNotFoundError, match=r"the item has no asset for band 'nir09'"):
        select_bands(second, ["nir09"])


def test_ambiguous_non_raster_and_repeated_names(items: list[pystac.Item]) -> None:
    with pytest.raises(ConfigError, match=r"band 'rededge' is ambiguous \(it matches the assets rededge1, rededge2, "
                                          r"rededge3\)\. Fix: name one asset key instead"):
        select_bands(items[0], ["rededge"])
    with pytest.raises(ConfigError, match=r"asset 'thumbnail' is not a raster band \(media type image/png, roles "
                                          r"thumbnail\)\. Fix: choose among asset keys coastal"):
        select_bands(items[0], ["thumbnail"])
    with pytest.raises(ConfigError, match=r"band red selected twice"):
        select_bands(items[0], ["red", "red"])
    with pytest.raises(ConfigError, match=r"band 2\.5 is neither a name nor a position"):
        select_bands(items[0], [2.5])  # type: ignore[list-item]


def test_jp2_copies_categorical_assets_and_multiband(stac_tree: StacTree, tmp_path: Path) -> None:
    doc = item_dict("S2X", {n: f"{stac_tree.root}/{stac_tree.ids[0]}/{n}.tif" for n in S2_BANDS}, "earthsearch")
    red = doc["assets"]["red"]
    doc["assets"]["red-jp2"] = {**red, "href": "./B04.jp2", "type": "image/jp2"}
    doc["assets"]["scl"] = {"href": f"{stac_tree.root}/{stac_tree.ids[0]}/B09.tif", "roles": ["data"],
                            "type": "image/tiff; application=geotiff", "raster:bands": [{"nodata": 0}],
                            "classification:classes": [{"value": 4, "name": "vegetation"}]}
    doc["assets"]["visual"] = {"href": "./TCI.tif", "type": "image/tiff; application=geotiff", "roles": ["visual"],
                               "eo:bands": [{"name": "B04"}, {"name": "B03"}, {"name": "B02"}]}
    (item,) = load_items(write_json(tmp_path / "item.json", doc))
    assert "red-jp2" not in band_assets(item) and "visual" not in band_assets(item)
    assert select_bands(item, ["B04"])[0].path.endswith("/B04.tif")  # the GeoTIFF, not the JPEG2000 copy
    assert select_bands(item, ["red-jp2"])[0].path == str(tmp_path / "B04.jp2")
    (scl,) = select_bands(item, ["scl"])
    assert scl.resampling == "nearest" and scl.nodata == 0.0
    assert select_bands(item, ["red"])[0].resampling == "bilinear"
    assert [(r.name, r.band) for r in select_bands(item, ["visual"])] == [
        ("visual_B04", 1), ("visual_B03", 2), ("visual_B02", 3)]


def test_nodata_forms(tmp_path: Path) -> None:
    doc = item_dict("S2N", {n: f"./{n}.tif" for n in S2_BANDS}, "pc")
    doc["assets"]["B02"]["raster:bands"] = [{"nodata": "nan", "data_type": "float32"}]
    doc["assets"]["B03"].pop("raster:bands")
    doc["assets"]["B03"]["nodata"] = -9999  # STAC 1.1 common field on the asset
    doc["assets"]["B04"].pop("raster:bands")
    (item,) = load_items(write_json(tmp_path / "item.json", doc))
    blue, green, red = select_bands(item, ["blue", "green", "red"])
    assert math.isnan(blue.nodata) and green.nodata == -9999.0 and red.nodata is None


def test_item_without_band_assets(tmp_path: Path) -> None:
    doc = item_dict("S2Y", {n: f"./{n}.tif" for n in S2_BANDS}, "pc")
    doc["assets"] = {"thumbnail": doc["assets"]["thumbnail"]}
    (item,) = load_items(write_json(tmp_path / "item.json", doc))
    with pytest.raises(DataNotFoundError, match=r"\(item S2Y\): the item has no raster band assets \(expected GeoTIFF "
                                                r"or JPEG2000 assets, found thumbnail\)"):
        select_bands(item, ["red"])


def test_signed_urls_stay_out_of_messages(http_server: ServerProcess, stac_tree: StacTree, tmp_path: Path) -> None:
    signed = {n: f"{http_server.url}/{stac_tree.ids[0]}/{n}.tif?X-Amz-Expires=600&X-Amz-Signature={SECRET}"
              for n in S2_BANDS}
    doc = item_dict("S2Z", signed, "pc")
    path = write_json(tmp_path / "signed.json", doc)
    (item,) = load_items(path)
    (ref,) = select_bands(item, ["red"])
    assert SECRET in ref.path  # GDAL needs the signature to read
    np.testing.assert_array_equal(read_ref(ref), stac_tree.array(0, "B04")[0])
    for bad in (["B4"], ["rededge"], [99], ["thumbnail"]):
        with pytest.raises(ConfigError) as info:
            select_bands(item, bad)
        assert SECRET not in str(info.value)
    item.set_self_href(f"{http_server.url}/item.json?sig={SECRET}")
    with pytest.raises(ConfigError) as info:
        select_bands(item, ["B4"])
    assert str(info.value).startswith(f"{http_server.url}/item.json?sig=REDACTED (item S2Z): no band 'B4'")


# --- resolutions ---------------------------------------------------------------------------------


def test_asset_resolutions_from_metadata_and_header(stac_tree: StacTree, tmp_path: Path,
                                                    http_server: ServerProcess) -> None:
    wanted = ["B04", "B8A", "B01"]
    (item,) = load_items(stac_tree.root / stac_tree.item_pc)
    refs = select_bands(item, wanted)
    assert asset_resolutions(item, refs) == [10.0, 20.0, 60.0]
    doc = json.loads((stac_tree.root / stac_tree.item_pc).read_text())
    for asset in doc["assets"].values():  # no proj: raster:bands spatial_resolution
        asset.pop("proj:transform", None)
    (item,) = load_items(write_json(tmp_path / "a" / "item.json", {**doc, "assets": {
        k: {**a, "href": f"{stac_tree.root}/{stac_tree.ids[1]}/{k}.tif"} for k, a in doc["assets"].items()}}))
    assert asset_resolutions(item, select_bands(item, wanted)) == [10.0, 20.0, 60.0]
    for asset in doc["assets"].values():  # no metadata at all: the file headers, here over HTTP
        asset.pop("raster:bands", None)
        asset["href"] = f"{http_server.url}/{stac_tree.ids[1]}/{asset['href'][2:]}"
    (item,) = load_items(write_json(tmp_path / "b" / "item.json", doc))
    http_server.reset()
    assert asset_resolutions(item, select_bands(item, wanted)) == [10.0, 20.0, 60.0]
    assert sum(http_server.stats()["requests"].values()) >= 3
