"""``geobp fit`` and ``geobp check`` on remote data: images and labels as URLs, caches in the local folder.

Signed URLs' signatures are written nowhere: not in the run's folder (config, hparams, checkpoints,
gradient-flow report), not in the caches, not in the output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from geobp.cli import main
from geobp.data.synth import write_scenes
from geobp.sources.locations import default_cache_dir
from tests.sources import servers

SECRET = "s3cr3tSIGNATURE"
SIGNED = f"?X-Amz-Signature={SECRET}&X-Amz-Expires=3600"
# one xdist worker runs this module: its module-scoped runs are made once, not once per worker
pytestmark = [pytest.mark.usefixtures("read_options_restored"), pytest.mark.xdist_group("remote_fit")]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fitdata")
    write_scenes(root, scenes=3, size=64, bands=3, classes=3, block_size=32)
    return root


@pytest.fixture(scope="module")
def served(scenes: Path) -> servers.ServerProcess:
    server = servers.start("http", str(scenes))
    yield server
    server.stop()


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``XDG_CACHE_HOME`` in the test's folder: the default cache of remote data goes there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "geobp"


def config(tmp_path: Path, **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_val_batches": 2, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}},
        },
        "model": {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "data": {"num_classes": 3, "tile_size": 32, "tiles_per_epoch": 8, "batch_size": 4, "val_fraction": 0.34,
                 **data},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _everything_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.slow
def test_fit_on_signed_http_urls_caches_locally_and_writes_no_signature(scenes, served, cache_home, tmp_path, capfd):
    names = ("scene_000", "scene_001", "scene_002")
    images = [f"{served.url}/images/{n}.tif{SIGNED}" for n in names]
    labels = [f"{served.url}/masks/{n}.tif{SIGNED}" for n in names]
    assert main(["fit", "--config", str(config(tmp_path, images=images, labels=labels))]) == 0
    # the caches (headers, statistics, aligned labels) are in the local cache folder, not beside the data
    cached = {p.name for p in (cache_home / ".geobp_cache").rglob("*") if p.is_file()}
    assert any(n.startswith("bandstats.") for n in cached), cached
    assert {f"scene_00{i}" for i in range(3)} <= {n.split(".")[0] for n in cached if n.endswith(".tif")}, cached
    assert not (scenes / ".geobp_cache").exists() and not (scenes / "images" / ".geobp_cache").exists()
    # trained: a checkpoint, whose hyperparameters name the URLs without their signature
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["datamodule_hyper_parameters"]["images"][0] == f"{served.url}/images/scene_000.tif" \
        "?X-Amz-Signature=REDACTED&X-Amz-Expires=3600"
    said = capfd.readouterr()
    written = _everything_under(tmp_path / "runs") + _everything_under(cache_home)
    assert SECRET.encode() not in written
    assert SECRET not in said.out + said.err
    # a second run with a refreshed signature finds the same caches (nothing new is aligned or scanned)
    before = sorted(p.name for p in (cache_home / ".geobp_cache").rglob("*") if p.is_file())
    fresh = [u.replace(SECRET, "anotherSIG") for u in images], [u.replace(SECRET, "anotherSIG") for u in labels]
    (tmp_path / "runs2").mkdir()
    assert main(["fit", "--config", str(config(tmp_path / "runs2", images=fresh[0], labels=fresh[1]))]) == 0
    assert sorted(p.name for p in (cache_home / ".geobp_cache").rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_fit_on_an_s3_prefix(scenes, moto_server, s3_env, cache_home, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url)
    client.create_bucket(Bucket="geobp-fit")
    for path in sorted(scenes.rglob("*.tif")):
        client.upload_file(str(path), "geobp-fit", f"ds/{path.relative_to(scenes).as_posix()}")
    cfg = config(tmp_path, images="s3://geobp-fit/ds/images/", labels="s3://geobp-fit/ds/masks/")
    assert main(["fit", "--config", str(cfg)]) == 0
    assert any(p.name.startswith("bandstats.") for p in (cache_home / ".geobp_cache").iterdir())
    assert next((tmp_path / "runs").rglob("last.ckpt")).is_file()


@pytest.mark.slow
def test_fit_with_an_s3_root(scenes, moto_server, s3_env, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url)
    client.create_bucket(Bucket="geobp-root")
    for path in sorted(scenes.rglob("*.tif")):
        client.upload_file(str(path), "geobp-root", f"ds/{path.relative_to(scenes).as_posix()}")
    cfg = config(tmp_path, root="s3://geobp-root/ds", cache_dir=str(tmp_path / "cache"))
    assert main(["fit", "--config", str(cfg)]) == 0
    headers = json.loads((tmp_path / "cache" / ".geobp_cache" / "headers.json").read_text())["headers"]
    assert sorted(headers) == [f"/vsis3/geobp-root/ds/{kind}/scene_00{i}.tif" for kind in ("images", "masks")
                               for i in range(3)]
    # geobp check reads the same root, every pixel, with two reading processes
    assert main(["check", "s3://geobp-root/ds", "--num-classes", "3", "--workers", "2"]) == 0


def test_a_remote_cache_dir_is_refused(scenes, served, tmp_path, capfd):
    images = f"{served.url}/images/scene_000.tif"
    cfg = config(tmp_path, images=images, labels=f"{served.url}/masks/scene_000.tif", cache_dir="s3://bucket/cache")
    assert main(["fit", "--config", str(cfg)]) != 0
    said = capfd.readouterr()
    assert "s3://bucket/cache: the cache folder must be local" in said.err + said.out


def test_check_reads_urls(scenes, served, cache_home, tmp_path, capfd):
    names = ("scene_000", "scene_001")
    cfg = config(tmp_path, images=[f"{served.url}/images/{n}.tif{SIGNED}" for n in names],
                 labels=[f"{served.url}/masks/{n}.tif{SIGNED}" for n in names])
    assert main(["check", "--config", str(cfg)]) == 0
    said = capfd.readouterr()
    assert "scene_000" in said.out + said.err and SECRET not in said.out + said.err


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "geobp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "geobp"


def _read_in_worker(url: str) -> tuple[int, str | None]:
    from geobp.raster import open_reader, read_window
    from rasterio.windows import Window

    with open_reader(url) as src:
        read_window(src, Window(0, 0, 32, 32))
        return src.count, os.environ.get("GDAL_DISABLE_READDIR_ON_OPEN")


def test_a_fresh_worker_process_reads_with_the_remote_options(scenes, tmp_path):
    """What a DataLoader worker or an inference reader process does: no side-car probes, no folder listing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    server = servers.start("http", str(scenes))
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            count, readdir = pool.submit(_read_in_worker, f"{server.url}/images/scene_001.tif{SIGNED}").result()
        requested = set(server.stats()["requests"])
    finally:
        server.stop()
    assert count == 3 and readdir == "EMPTY_DIR"
    assert requested == {"/images/scene_001.tif"}, requested


def test_vector_labels_at_a_url(scenes, tmp_path, cache_home, capfd):
    """A GeoJSON on the server labels the remote images: one polygon per scene, its class in ``cls``."""
    folder = tmp_path / "served"
    folder.mkdir()
    features = [{"type": "Feature", "properties": {"cls": i},
                 "geometry": {"type": "Polygon", "coordinates": [[[x, 5500000], [x + 640, 5500000], [x + 640, 5499360],
                                                                 [x, 5499360], [x, 5500000]]]}}
                for i, x in enumerate(400000 + 640 * i for i in range(2))]
    (folder / "labels.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
        "features": features}))
    for i in range(2):
        (folder / f"scene_00{i}.tif").write_bytes((scenes / "images" / f"scene_00{i}.tif").read_bytes())
    server = servers.start("http", str(folder))
    try:
        cfg = config(tmp_path, images=[f"{server.url}/scene_00{i}.tif{SIGNED}" for i in range(2)],
                     labels=f"{server.url}/labels.geojson{SIGNED}", label_field="cls")
        assert main(["check", "--config", str(cfg), "--quick"]) == 0
    finally:
        server.stop()
    said = capfd.readouterr()
    assert said.out.count("100.0%") == 2, said.out
    assert SECRET not in said.out + said.err and SECRET.encode() not in _everything_under(cache_home)
