"""``geobp infer --devices 2`` on the CPU (gloo): the work is split across two processes and the
files are byte for byte those of one process.

The command runs in a subprocess the way users run it; Lightning Fabric starts the second
process by running the same command again. One raster: both processes predict a share of its
tile rows and rank 0 writes the outputs. Several rasters: whole rasters per process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geobp.inference import predict_many
from geobp.inference.distributed import Ranks, assign_whole, plan
from geobp.task import SegmentationTask
from tests.conftest import write_tif

# one xdist worker runs this module: its module-scoped runs are made once, not once per worker
pytestmark = pytest.mark.xdist_group("distributed_inference")

REPO = Path(__file__).resolve().parents[2]
PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dinfer")
    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=["water", "forest", "urban"],
                            preprocessing=PRE, tile_size=32, model_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    ckpt = tmp / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    rng = np.random.default_rng(0)
    rasters = []
    for name, size in [("a", (90, 70)), ("b", (40, 64)), ("c", (64, 33))]:
        img = rng.integers(1, 600, (3, *size)).astype("uint16")
        img[:, :3, :4] = 0
        rasters.append(write_tif(tmp / "in" / f"{name}.tif", img, nodata=0))
    return {"tmp": tmp, "ckpt": ckpt, "rasters": rasters}


def infer_two_processes(ckpt: Path, out: Path, inputs: list[Path], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "geobp", "infer", "--ckpt", str(ckpt), "--out", str(out), *map(str, inputs),
           "--accelerator", "cpu", "--devices", "2", "--batch_size", "4", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_same_files(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())  # nothing else left behind (no part files)
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A model and raster large enough that 1 and 2 compute threads give other logits in the last bits:
    the full-width ResNet-18 U-Net decoder and a 384 x 320 raster of 64 px tiles."""
    tmp = tmp_path_factory.mktemp("dinfer_big")
    torch.manual_seed(1)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=["water", "forest", "urban"],
                            preprocessing=PRE, tile_size=64)
    ckpt = tmp / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    img = np.random.default_rng(1).integers(1, 600, (3, 384, 320)).astype("uint16")
    img[:, :5, :9] = 0
    return {"tmp": tmp, "ckpt": ckpt, "raster": write_tif(tmp / "in" / "big.tif", img, nodata=0)}


@pytest.mark.slow
def test_one_raster_split_across_two_processes_equals_one_process(big):
    """Byte for byte, probabilities included, when every process computes with the same thread count."""
    tmp, raster = big["tmp"], big["raster"]
    proc = infer_two_processes(big["ckpt"], tmp / "two_split", [raster], "--probabilities", "probs", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "MEMBER: 2/2" in proc.stdout
    # the summary is printed once (by rank 0)
    assert proc.stdout.count("1 raster(s) predicted, 0 failed") == 1
    with one_thread():  # as `geobp infer --threads 1` in one process
        assert predict_many(big["ckpt"], [raster], tmp / "one_split", batch_size=4, probabilities="probs", progress=False).ok
    assert_same_files(tmp / "one_split", tmp / "two_split")


@pytest.mark.slow
def test_several_rasters_go_whole_to_the_processes_and_failures_are_reported(setup):
    tmp, rasters = setup["tmp"], setup["rasters"]
    missing = tmp / "in" / "missing.tif"
    proc = infer_two_processes(setup["ckpt"], tmp / "two_whole", [*rasters, missing], "--threads", "1")
    assert proc.returncode == 1, proc.stdout[-5000:]
    assert proc.stdout.count("3 raster(s) predicted, 1 failed") == 1
    assert "missing.tif: file not found" in proc.stdout
    with one_thread():
        summary = predict_many(setup["ckpt"], [*rasters, missing], tmp / "one_whole", batch_size=4, progress=False)
    assert len(summary.succeeded) == 3
    assert_same_files(tmp / "one_whole", tmp / "two_whole")


def test_whole_rasters_are_balanced_by_pixels_largest_first():
    assert assign_whole([100, 10, 60, 50], 2) == [0, 0, 1, 1]  # loads 110 and 110
    assert assign_whole([5, 5, 5], 3) == [0, 1, 2]
    assert assign_whole([0, 0, 0, 0], 2) == [0, 1, 0, 1]  # unreadable ones still spread


def test_fewer_rasters_than_processes_are_split(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.ones((1, 8, 8), "uint16"))
    assert plan([a], 2) is None
    assert plan([a, tmp_path / "missing.tif"], 2) == [0, 1]


def test_launcher_and_arguments_must_agree(monkeypatch, capsys):
    from geobp.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["infer", "--ckpt", "x.ckpt", "--out", "o", "in.tif", "--devices", "2"]) == 2
    assert "WORLD_SIZE" in capsys.readouterr().err


class OtherRankFailed(Ranks):
    """Rank 0 of two, where rank 1's share failed (its message arrives through the exchange)."""

    def all_gather(self, obj):
        if isinstance(obj, list):  # the final exchange of results: rank 1 reports nothing of its own
            return [obj, []]
        return [obj, "b.tif: RasterReadError: block (row 2, col 0) failed to decode"]


def test_a_share_failing_on_another_rank_fails_the_raster_and_leaves_nothing(setup, tmp_path):
    out = tmp_path / "out"
    summary = predict_many(setup["ckpt"], [setup["rasters"][0]], out, batch_size=4, progress=False,
                           ranks=OtherRankFailed(0, 2))
    assert not summary.succeeded
    assert summary.failed == [(setup["rasters"][0], "b.tif: RasterReadError: block (row 2, col 0) failed to decode")]
    assert not out.exists() or list(out.iterdir()) == []  # rank 0's own part is removed, no output written
