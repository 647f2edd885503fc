"""Fixtures for geobp.sources: a Sentinel-2-like scene as per-band COGs, its STAC forms, local servers.

The scene is tiny: 10 m bands 120x120, 20 m bands 60x60, 60 m bands 20x20, uint16 with nodata 0 in
the north-west corner, all on the same UTM footprint. Three STAC conventions are written, so each
matching path of ``select_bands`` is used by some item:

- ``S2A...`` (Earth Search style): asset keys ``blue``, ``red``, ``rededge1``..., ``eo:bands`` names
  ``B02``..., common names; STAC 1.0 with ``eo``, ``proj`` and ``raster`` extensions.
- ``S2B...`` (Planetary Computer style): asset keys ``B02``..., ``eo:bands`` with common names.
- ``S2C...`` (STAC 1.1): asset keys ``B02``..., ``bands`` arrays with ``eo:common_name`` and
  ``nodata``; only in the catalog.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tests.sources import servers

EPSG = 32633
WEST, NORTH = 600000.0, 5800020.0
EXTENT = 1200.0  # metres: 120 px at 10 m
# Sentinel-2 L2A bands: name -> (resolution m, common name, Earth Search asset key)
S2_BANDS: dict[str, tuple[int, str, str]] = {
    "B01": (60, "coastal", "coastal"),
    "B02": (10, "blue", "blue"),
    "B03": (10, "green", "green"),
    "B04": (10, "red", "red"),
    "B05": (20, "rededge", "rededge1"),
    "B06": (20, "rededge", "rededge2"),
    "B07": (20, "rededge", "rededge3"),
    "B08": (10, "nir", "nir"),
    "B8A": (20, "nir08", "nir08"),
    "B09": (60, "nir09", "nir09"),
    "B11": (20, "swir16", "swir16"),
    "B12": (20, "swir22", "swir22"),
}
BUCKET = "geobp-s2"


def band_array(name: str, seed: int) -> np.ndarray:
    """The [1, H, W] uint16 pixels of band ``name``: seeded values 1..10000, nodata 0 in the NW corner."""
    res = S2_BANDS[name][0]
    size = int(EXTENT // res)
    rng = np.random.default_rng([seed, list(S2_BANDS).index(name)])
    data = rng.integers(1, 10001, size=(1, size, size), dtype=np.uint16)
    corner = max(size // 12, 1)
    data[:, :corner, :corner] = 0
    return data


def write_cog(path: Path, data: np.ndarray, res: float) -> Path:
    """Write ``data`` as a Cloud-Optimized GeoTIFF on the scene's footprint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=str(data.dtype), crs=f"EPSG:{EPSG}", transform=from_origin(WEST, NORTH, res, res),
                       nodata=0, blocksize=32, compress="deflate") as dst:
        dst.write(data)
    return path


def _geometry() -> tuple[list[float], dict[str, Any]]:
    from pyproj import Transformer

    to_wgs = Transformer.from_crs(EPSG, 4326, always_xy=True)
    corners = [to_wgs.transform(x, y) for x, y in
               [(WEST, NORTH - EXTENT), (WEST + EXTENT, NORTH - EXTENT), (WEST + EXTENT, NORTH), (WEST, NORTH)]]
    lons, lats = zip(*corners)
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    ring = [list(c) for c in corners] + [list(corners[0])]
    return bbox, {"type": "Polygon", "coordinates": [ring]}


def item_dict(item_id: str, href: dict[str, str], style: str) -> dict[str, Any]:
    """A STAC Item for the scene; ``href`` maps band name (``B04``) to the asset's href.

    ``style`` is ``earthsearch`` (keys ``red``, STAC 1.0 ``eo:bands``), ``pc`` (keys ``B04``,
    ``eo:bands``) or ``stac11`` (keys ``B04``, STAC 1.1 ``bands``).
    """
    bbox, geometry = _geometry()
    assets: dict[str, Any] = {}
    for name, (res, common, es_key) in S2_BANDS.items():
        size = int(EXTENT // res)
        asset: dict[str, Any] = {
            "href": href[name], "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": f"{name} ({common}) {res} m", "roles": ["data", "reflectance"],
            "proj:shape": [size, size], "proj:transform": [res, 0.0, WEST, 0.0, -res, NORTH],
        }
        if style == "stac11":
            asset["bands"] = [{"name": name, "eo:common_name": common, "nodata": 0, "data_type": "uint16"}]
        else:
            asset["eo:bands"] = [{"name": name, "common_name": common}]
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "spatial_resolution": res}]
        assets[es_key if style == "earthsearch" else name] = asset
    assets["thumbnail"] = {"href": "./thumbnail.png", "type": "image/png", "roles": ["thumbnail"]}
    assets["granule_metadata"] = {"href": "./metadata.xml", "type": "application/xml", "roles": ["metadata"]}
    if style == "stac11":
        version, extensions = "1.1.0", ["https://stac-extensions.github.io/eo/v2.0.0/schema.json",
                                        "https://stac-extensions.github.io/projection/v2.0.0/schema.json"]
        proj = {"proj:code": f"EPSG:{EPSG}"}
    else:
        version, extensions = "1.0.0", ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                                        "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                                        "https://stac-extensions.github.io/raster/v1.1.0/schema.json"]
        proj = {"proj:epsg": EPSG}
    return {
        "type": "Feature", "stac_version": version, "stac_extensions": extensions, "id": item_id,
        "bbox": bbox, "geometry": geometry,
        "properties": {"datetime": "2026-06-01T10:00:00Z", "platform": "sentinel-2a", "gsd": 10,
                       "eo:cloud_cover": 3.5, **proj},
        "links": [], "assets": assets,
    }


@dataclass(frozen=True)
class StacTree:
    """Where the fixture scene's files are, relative paths of its STAC documents under ``root``."""

    root: Path
    ids: tuple[str, str, str]  # Earth Search style, Planetary Computer style, STAC 1.1
    item: str = "S2A_33UUP_20260601_0_L2A/item.json"
    item_pc: str = "S2B_33UUP_20260611_0_L2A/item.json"
    collection: str = "search.json"
    empty: str = "empty.json"
    catalog: str = "catalog/catalog.json"

    def array(self, scene: int, band: str) -> np.ndarray:
        """The pixels written for ``band`` of scene 0, 1 or 2."""
        return band_array(band, seed=scene)

    def tif(self, scene: int, band: str) -> Path:
        """The local COG of ``band`` of scene 0, 1 or 2."""
        return self.root / self.ids[scene] / f"{band}.tif"


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def build_stac_tree(root: Path) -> StacTree:
    """Write the three scenes' COGs and their Item, ItemCollection and Catalog documents under ``root``."""
    ids = ("S2A_33UUP_20260601_0_L2A", "S2B_33UUP_20260611_0_L2A", "S2C_33UUP_20260621_0_L2A")
    tree = StacTree(root, ids)
    for scene, item_id in enumerate(ids):
        for name, (res, _, _) in S2_BANDS.items():
            write_cog(root / item_id / f"{name}.tif", band_array(name, seed=scene), res)
    # Items beside their files, with relative hrefs
    local = {name: f"./{name}.tif" for name in S2_BANDS}
    item_a = item_dict(ids[0], local, "earthsearch")
    item_b = item_dict(ids[1], local, "pc")
    _write(root / tree.item, item_a)
    _write(root / tree.item_pc, item_b)
    # an ItemCollection as pystac-client saves a search, hrefs relative to search.json
    features = [item_dict(item_id, {n: f"{item_id}/{n}.tif" for n in S2_BANDS}, style)
                for item_id, style in zip(ids[:2], ("earthsearch", "pc"))]
    _write(root / tree.collection, {"type": "FeatureCollection", "features": features})
    _write(root / tree.empty, {"type": "FeatureCollection", "features": []})
    # a Catalog with a Collection with the three items, each item in its own folder
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "geobp-test", "description": "test catalog",
               "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                         {"rel": "child", "href": "./sentinel-2-l2a/collection.json", "type": "application/json"}]}
    bbox, _ = _geometry()
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": "sentinel-2-l2a", "description": "tiny S2 scenes",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [bbox]},
                   "temporal": {"interval": [["2026-06-01T00:00:00Z", "2026-06-30T00:00:00Z"]]}},
        "links": [{"rel": "root", "href": "../catalog.json", "type": "application/json"},
                  {"rel": "parent", "href": "../catalog.json", "type": "application/json"}]
                 + [{"rel": "item", "href": f"./{i}/{i}.json", "type": "application/geo+json"} for i in ids],
    }
    _write(root / "catalog" / "catalog.json", catalog)
    _write(root / "catalog" / "sentinel-2-l2a" / "collection.json", collection)
    for item_id, style in zip(ids, ("earthsearch", "pc", "stac11")):
        doc = item_dict(item_id, {n: f"../../../{item_id}/{n}.tif" for n in S2_BANDS}, style)
        doc["links"] = [{"rel": "root", "href": "../../catalog.json", "type": "application/json"},
                        {"rel": "parent", "href": "../collection.json", "type": "application/json"},
                        {"rel": "collection", "href": "../collection.json", "type": "application/json"}]
        doc["collection"] = "sentinel-2-l2a"
        _write(root / "catalog" / "sentinel-2-l2a" / item_id / f"{item_id}.json", doc)
    return tree


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-side guard: a connection to anything but 127.0.0.1 fails the test (GDAL's curl is not covered)."""
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach {address}: tests stay on 127.0.0.1")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def stac_tree(tmp_path_factory: pytest.TempPathFactory) -> StacTree:
    """The scenes and STAC documents, written once per session (read-only for tests)."""
    return build_stac_tree(tmp_path_factory.mktemp("s2"))


@pytest.fixture(scope="session")
def http_server(stac_tree: StacTree) -> Iterator[servers.ServerProcess]:
    """A Range-capable HTTP server over ``stac_tree.root`` (stopped by process id at the end)."""
    server = servers.start("http", str(stac_tree.root))
    yield server
    server.stop()


@pytest.fixture
def start_http(stac_tree: StacTree) -> Iterator[Any]:
    """Factory: start an HTTP server over the scene with options (``--fail-every 2`` ...); stopped after the test."""
    started: list[servers.ServerProcess] = []

    def _start(*options: str) -> servers.ServerProcess:
        started.append(servers.start("http", str(stac_tree.root), *options))
        return started[-1]

    yield _start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[servers.ServerProcess]:
    """moto's S3 on 127.0.0.1 in a subprocess (stopped by process id at the end)."""
    server = servers.start("moto")
    yield server
    server.stop()


S3_ENV = {"AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE", "AWS_ACCESS_KEY_ID": "testing",
          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
          "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture
def s3_env(moto_server: servers.ServerProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point GDAL and boto3 at the moto server through the environment; returns the endpoint."""
    endpoint = f"127.0.0.1:{moto_server.port}"
    monkeypatch.setenv("AWS_S3_ENDPOINT", endpoint)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_NO_SIGN_REQUEST", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    return endpoint


@pytest.fixture(scope="session")
def _s3_uploaded(moto_server: servers.ServerProcess, stac_tree: StacTree) -> str:
    """Upload the scene tree to ``s3://geobp-s2/`` once per session (keys = paths under the root).

    Everything is public-read except ``private/B04.tif`` and ``private/B08.tif``; ``SCENE/.hidden.tif`` tests listing.
    """
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(stac_tree.root.rglob("*")):  # public-read, so unsigned requests may read them
        if path.is_file():
            client.upload_file(str(path), BUCKET, path.relative_to(stac_tree.root).as_posix(),
                               ExtraArgs={"ACL": "public-read"})
    for band in ("B04", "B08"):  # signed requests only
        client.upload_file(str(stac_tree.tif(0, band)), BUCKET, f"private/{band}.tif")
    client.put_object(Bucket=BUCKET, Key=f"{stac_tree.ids[0]}/.hidden.tif", Body=b"not a tif")
    return BUCKET


@pytest.fixture
def s3_bucket(_s3_uploaded: str, s3_env: str) -> str:
    """The bucket holding the scene tree, with the S3 environment set for this test."""
    return _s3_uploaded


@pytest.fixture
def scene_copy(stac_tree: StacTree, tmp_path: Path) -> StacTree:
    """A private copy of the scene tree a test may change."""
    shutil.copytree(stac_tree.root, tmp_path / "s2")
    return StacTree(tmp_path / "s2", stac_tree.ids)


@pytest.fixture
def read_options_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL's remote-read variables unset for the test and as they were afterwards: geobp sets them as
    process-wide defaults when it opens a URL (``use_read_options``), and other tests read without them."""
    from geobp.sources.urls import READ_OPTIONS

    for key in READ_OPTIONS:
        if key not in os.environ:
            monkeypatch.setenv(key, "")  # recorded as unset, so the teardown removes what geobp sets
            monkeypatch.delenv(key)
