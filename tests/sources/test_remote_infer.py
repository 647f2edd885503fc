"""``geobp infer`` on URLs: s3:// (moto) and http(s):// (the local Range server) give the local result.

A signed URL's signature is never written: not in the output folder, not on stdout or stderr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geobp.cli import main
from geobp.data.synth import write_scenes
from geobp.task import SegmentationTask
from tests.sources import servers

SECRET = "s3cr3tSIGNATURE"
SIGNED = f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261207%2Fus-east-1&X-Amz-Signature={SECRET}"
# one xdist worker runs this module: its module-scoped runs are made once, not once per worker
pytestmark = [pytest.mark.usefixtures("read_options_restored"), pytest.mark.xdist_group("remote_infer")]
PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two scenes (3 bands, 64x64, 32 px blocks) and a checkpoint beside them."""
    root = tmp_path_factory.mktemp("remote")
    write_scenes(root / "data", scenes=2, size=64, bands=3, classes=3, block_size=32)
    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=["a", "b", "c"],
                            preprocessing=PRE, tile_size=32)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, root / "model.ckpt")
    return root


@pytest.fixture(scope="module")
def served(dataset: Path) -> servers.ServerProcess:
    server = servers.start("http", str(dataset / "data"))
    yield server
    server.stop()


def _infer(dataset: Path, out: Path, *inputs: str) -> int:
    return main(["infer", "--ckpt", str(dataset / "model.ckpt"), "--out", str(out), "--device", "cpu",
                 "--tile_size", "32", *inputs])


@pytest.fixture(scope="module")
def local_map(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The class map of scene_000 read from the local file."""
    out = tmp_path_factory.mktemp("local")
    assert _infer(dataset, out, str(dataset / "data" / "images" / "scene_000.tif")) == 0
    return (out / "scene_000_classes.tif").read_bytes()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL retries at once (the default waits 1 s, then 2 s ...)."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.01")


def _all_written(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


def test_s3_object_gives_the_local_class_map(dataset, local_map, moto_server, s3_env, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url)
    client.create_bucket(Bucket="geobp-infer")
    client.upload_file(str(dataset / "data" / "images" / "scene_000.tif"), "geobp-infer", "scenes/scene_000.tif")
    assert _infer(dataset, tmp_path / "out", "s3://geobp-infer/scenes/scene_000.tif") == 0
    assert (tmp_path / "out" / "scene_000_classes.tif").read_bytes() == local_map


def test_s3_prefix_is_listed_like_a_folder(dataset, local_map, moto_server, s3_env, tmp_path, capsys):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url)
    client.create_bucket(Bucket="geobp-prefix")
    for name in ("scene_000", "scene_001"):
        client.upload_file(str(dataset / "data" / "images" / f"{name}.tif"), "geobp-prefix", f"imgs/{name}.tif")
    assert _infer(dataset, tmp_path / "out", "s3://geobp-prefix/imgs/") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene_000_classes.tif", "scene_001_classes.tif"]
    assert (tmp_path / "out" / "scene_000_classes.tif").read_bytes() == local_map


def test_signed_url_works_and_its_signature_is_written_nowhere(dataset, local_map, served, tmp_path, capfd):
    url = f"{served.url}/images/scene_000.tif{SIGNED}"
    out = tmp_path / "out"
    assert _infer(dataset, out, url) == 0
    # the name comes from the URL's file name, the query string stripped
    assert sorted(p.name for p in out.iterdir()) == ["scene_000_classes.tif"]
    assert (out / "scene_000_classes.tif").read_bytes() == local_map
    said = capfd.readouterr()
    assert "1 raster(s) predicted, 0 failed" in said.err
    assert SECRET not in said.out + said.err and SECRET.encode() not in _all_written(out)


def test_a_failed_signed_url_reports_one_redacted_line(dataset, served, tmp_path, capfd):
    url = f"{served.url}/images/missing.tif{SIGNED}"
    assert _infer(dataset, tmp_path / "out", url) == 1
    said = capfd.readouterr()
    failed = [line for line in said.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "missing.tif" in failed[0] and "not found" in failed[0]
    assert SECRET not in said.out + said.err


def test_a_server_that_is_down_gives_one_error_line_and_no_output(dataset, tmp_path, capfd, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    out = tmp_path / "out"
    assert _infer(dataset, out, f"http://127.0.0.1:{port}/images/scene_000.tif{SIGNED}") == 1
    said = capfd.readouterr()
    failed = [line for line in said.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "server unreachable" in failed[0] and "Fix:" in failed[0], said.err
    assert SECRET not in said.out + said.err
    assert not out.exists() or not any(out.rglob("*"))


def test_503_on_every_other_request_gives_the_same_class_map(dataset, local_map, tmp_path, quick_retries):
    server = servers.start("http", str(dataset / "data"), "--fail-every", "2")
    try:
        assert _infer(dataset, tmp_path / "out", f"{server.url}/images/scene_000.tif") == 0
        statuses = server.stats()["statuses"]
    finally:
        server.stop()
    assert (tmp_path / "out" / "scene_000_classes.tif").read_bytes() == local_map
    assert statuses.get("503", 0) >= 1


def test_an_http_folder_is_a_one_line_failure(dataset, served, tmp_path, capfd):
    assert _infer(dataset, tmp_path / "out", f"{served.url}/images/") == 1
    failed = [line for line in capfd.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "cannot be listed" in failed[0]


def test_scoring_signed_urls_writes_metrics_without_signatures(dataset, served, tmp_path, capfd):
    out = tmp_path / "out"
    code = _infer(dataset, out, "--labels", f"{served.url}/masks/scene_000.tif{SIGNED}",
                  f"{served.url}/images/scene_000.tif{SIGNED}")
    said = capfd.readouterr()
    assert code == 0, said.err
    metrics = (out / "metrics.json").read_text()
    assert "scene_000.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED" in metrics
    assert SECRET.encode() not in _all_written(out) and SECRET not in said.out + said.err
