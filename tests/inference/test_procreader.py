"""The process reader of inference: the same batches and outputs as the threads, errors, clean shutdown.

The first reader of a test session starts the fork server (a few seconds: it imports torch and
geobp once); every later reader starts its workers in a fraction of a second.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch

from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError, DataNotFoundError, RasterReadError, ReaderError
from geobp.inference import PredictOptions, output_paths, predict_raster
from geobp.inference.predict import reader_kind
from geobp.inference.procreader import ProcessReader
from geobp.inference.reader import PrefetchReader
from geobp.tiling import TileGrid
from tests.conftest import write_tif
from tests.inference.test_predict import PRE, Exploding, conv_model, make_image


def shm_mappings() -> set[str]:
    """Shared-memory segments this process maps (torch's, as ``/dev/shm/torch_...``)."""
    with open("/proc/self/maps") as fh:
        return {line.split(None, 5)[-1].strip() for line in fh if "/dev/shm/" in line}


def our_shm_files() -> set[str]:
    """Named segments of this process in /dev/shm (torch names them after the pid)."""
    return {n for n in os.listdir("/dev/shm") if f"_{os.getpid()}_" in n}


@pytest.fixture
def no_leftovers():
    """After the test: no child processes, no shared memory mapped or named by this process."""
    maps, files = shm_mappings(), our_shm_files()
    yield
    assert multiprocessing.active_children() == []
    assert shm_mappings() <= maps
    assert our_shm_files() <= files


def corrupt_cog(path: Path, tmp_path: Path) -> Path:
    """Rewrite ``path`` as a truncated COG: it opens, but its later blocks fail to decode."""
    cog = tmp_path / "cog_full.tif"
    rasterio.shutil.copy(path, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=16)
    raw = cog.read_bytes()
    cog.unlink()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path


def test_same_tiles_and_bytes_as_the_threads(tmp_path, no_leftovers):
    rng = np.random.default_rng(0)
    img = rng.integers(1, 1000, (3, 70, 90)).astype("uint16")
    img[:, :5, :7] = 0
    src = write_tif(tmp_path / "a.tif", img, nodata=0)
    pre = Preprocessing(bands=[3, 1], nodata=0, mean=[100.0, 200.0], std=[30.0, 40.0])
    small = write_tif(tmp_path / "small.tif", img[:, :10, :40], nodata=0, block=None)
    for path, grid in ((src, TileGrid.build(70, 90, 16, 4)), (small, TileGrid.build(10, 40, 16, 4))):  # small: padded
        batches = grid.batches(4)  # the last batch is shorter
        with PrefetchReader(path, grid, batches, pre, num_workers=2) as reader:
            want = list(reader)
        before = len(shm_mappings())
        with ProcessReader(path, grid, batches, pre, num_workers=2, prefetch=3) as reader:
            assert len(shm_mappings()) > before  # the ring is mapped ...
            assert our_shm_files() == set()  # ... but has no name left in /dev/shm
            got = list(reader)
            again = list(reader)  # a reader may be iterated again
            partial = iter(reader)
            next(partial)
            partial.close()  # abandoned with reads in flight
            third = list(reader)
        for run in (got, again, third):
            assert [b.tiles for b in run] == batches
            for a, b in zip(want, run):
                assert a.image.dtype == b.image.dtype and a.image.shape == b.image.shape
                assert a.image.numpy().tobytes() == b.image.numpy().tobytes()
                assert torch.equal(a.valid, b.valid)


@pytest.mark.parametrize("probabilities", ["none", "probs"])
def test_predict_writes_the_same_bytes_with_either_reader(tmp_path, probabilities, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(90, 70))
    model = conv_model(3)
    outs = {}
    for kind in ("threads", "processes"):
        dst = predict_raster(model, src, tmp_path / kind / "a_classes.tif", PRE, tile_size=32, overlap=8, batch_size=3,
                             probabilities=probabilities, progress=False, num_workers=2, reader=kind)
        outs[kind] = {key: path.read_bytes() for key, path in output_paths(dst, probabilities).items()}
    assert outs["threads"] == outs["processes"]


def test_reader_option_and_its_default():
    assert reader_kind(None, "cpu") == "threads" and reader_kind(None, "cuda:0") == "processes"
    assert reader_kind("processes", "cpu") == "processes"
    with pytest.raises(ConfigError, match="unknown reader 'fork'"):
        PredictOptions(reader="fork")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="number of readers must be positive"):
        PredictOptions(num_workers=0)


def assert_only_input_left(folder: Path, name: str = "a.tif") -> None:
    assert sorted(p.name for p in folder.iterdir()) == [name]
    assert not [t for t in threading.enumerate() if t.name.startswith("geobp-")]


def test_a_bad_block_gives_the_threads_message_and_leaves_nothing(tmp_path, no_leftovers):
    src = corrupt_cog(make_image(tmp_path / "a.tif", size=(96, 96), nodata_corner=False), tmp_path)
    messages = {}
    for kind in ("threads", "processes"):
        with pytest.raises(RasterReadError) as err:
            predict_raster(conv_model(), src, tmp_path / "a_classes.tif", PRE, tile_size=32, overlap=8, batch_size=2,
                           progress=False, num_workers=2, reader=kind)
        messages[kind] = str(err.value)
        assert_only_input_left(tmp_path)
    assert messages["threads"] == messages["processes"]
    assert "a.tif: failed to read window" in messages["processes"] and "Fix: " in messages["processes"]
    assert "\n" not in messages["processes"]


def test_a_worker_error_comes_at_its_batch_after_the_earlier_ones(tmp_path, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(64, 64))
    grid = TileGrid.build(64, 64, 16, 0)
    batches = grid.batches(4)
    with ProcessReader(src, grid, batches, PRE, num_workers=2) as reader:
        src.unlink()  # the workers open the file at their first batch
        with pytest.raises(DataNotFoundError, match=r"a.tif: file not found\. Fix: "):
            list(reader)
    src = make_image(tmp_path / "b.tif", size=(96, 96), nodata_corner=False)
    grid = TileGrid.build(96, 96, 16, 0)
    batches = grid.batches(6)  # one tile row per batch: the truncated file's later rows fail
    corrupt_cog(src, tmp_path)
    got = []
    with ProcessReader(src, grid, batches, PRE, num_workers=2) as reader:
        with pytest.raises(RasterReadError, match=r"b.tif: failed to read window \(row (\d+)"):
            for batch in reader:
                got.append(batch.tiles)
    assert 0 < len(got) < len(batches) and got == batches[: len(got)]


def test_a_killed_worker_is_reported_and_the_others_stopped(tmp_path, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(128, 64))
    grid = TileGrid.build(128, 64, 16, 0)
    with ProcessReader(src, grid, grid.batches(2), PRE, num_workers=2, prefetch=2) as reader:
        it = iter(reader)
        next(it)
        os.kill(reader._procs[0].pid, signal.SIGKILL)
        with pytest.raises(ReaderError, match=r"a.tif: reader process geobp-read-0 stopped unexpectedly \(exit code -9\)"
                                              r"\. Fix: it was killed"):
            list(it)
    for w in (0, 1):  # a worker dead before a read is sent to it: the broken pipe is reported as its death
        with ProcessReader(src, grid, grid.batches(2), PRE, num_workers=2, prefetch=4) as reader:
            os.kill(reader._procs[w].pid, signal.SIGKILL)
            reader._procs[w].join()
            with pytest.raises(ReaderError, match=rf"geobp-read-{w} stopped unexpectedly \(exit code -9\)"):
                list(reader)
    with ProcessReader(src, grid, grid.batches(2), PRE, num_workers=2, prefetch=2) as reader:
        reader._conns[1].send("not a batch")  # a worker that fails outside a read (here: a bad message) exits
        with pytest.raises(ReaderError, match=r"geobp-read-1 stopped unexpectedly \(exit code 1\)\. Fix: see its error above"):
            list(reader)


def test_workers_ignore_ctrl_c_and_the_parent_stops_them(tmp_path, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(128, 64))
    grid = TileGrid.build(128, 64, 16, 0)
    batches = grid.batches(2)
    with ProcessReader(src, grid, batches, PRE, num_workers=2) as reader:
        got = []
        for n, batch in enumerate(reader):
            if n == 1:  # Ctrl-C in a terminal reaches every process of the group: the workers go on
                for proc in reader._procs:
                    os.kill(proc.pid, signal.SIGINT)
            got.append(batch.tiles)
        assert got == batches and all(p.is_alive() for p in reader._procs)
    # the parent's KeyboardInterrupt (here from the model, mid-raster) stops them, and the output is not written
    with pytest.raises(KeyboardInterrupt):
        predict_raster(Interrupting(after=2), src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=4, batch_size=2,
                       progress=False, num_workers=2, reader="processes")
    assert_only_input_left(tmp_path)


class Interrupting(Exploding):
    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.conv(x)


@pytest.mark.parametrize("cog", [False, True])
def test_model_failure_mid_raster_stops_the_workers_and_leaves_nothing(tmp_path, cog, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(300, 70))
    with pytest.raises(RuntimeError, match="boom in forward"):
        predict_raster(Exploding(after=3), src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=8, batch_size=2,
                       probabilities="probs", cog=cog, progress=False, num_workers=2, reader="processes")
    assert_only_input_left(tmp_path)


def test_too_little_shared_memory_is_an_error_or_for_the_default_a_fallback(tmp_path, monkeypatch, no_leftovers):
    from geobp.errors import SharedMemoryError
    from geobp.inference import predict as predict_mod
    from geobp.inference import procreader

    src = make_image(tmp_path / "a.tif")
    want = predict_raster(conv_model(), src, tmp_path / "want" / "a_classes.tif", PRE, tile_size=16, overlap=8,
                          progress=False, reader="threads").read_bytes()
    monkeypatch.setattr(procreader, "shared_memory_free", lambda: 1000)  # as in a container with a small /dev/shm
    with pytest.raises(SharedMemoryError, match=r"/dev/shm: too little shared memory for the reader processes "
                                                r"\(expected \d+ MiB free, found 0 MiB\)\. Fix: use --reader threads"):
        predict_raster(conv_model(), src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=8, progress=False,
                       reader="processes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "want"]
    monkeypatch.setattr(predict_mod, "reader_kind", lambda reader, device: "processes")  # the default, as on a GPU
    with pytest.warns(RuntimeWarning, match="too little shared memory.*Reading with threads instead"):
        out = predict_raster(conv_model(), src, tmp_path / "b" / "a_classes.tif", PRE, tile_size=16, overlap=8,
                             progress=False)
    assert out.read_bytes() == want


def test_default_reader_processes_use_the_cores_this_process_may_run_on(monkeypatch):
    from geobp.inference.threads import default_processes

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert default_processes("cpu") == 4 and default_processes("cuda") == 14  # the model and the writer keep two
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert default_processes("cpu") == 8 and default_processes("cuda:1") == 32
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert default_processes("cpu") == 1 and default_processes("cuda") == 1


@pytest.mark.parametrize("count", ["--readers", "--reader_threads", "--workers"])
def test_cli_reader_options_reach_predict_many(monkeypatch, count):
    from geobp.cli import main
    from geobp.inference import InferenceSummary

    seen = {}

    def fake(ckpt, inputs, out, **kw):
        seen.update(kw)
        return InferenceSummary()

    monkeypatch.setattr("geobp.inference.predict_many", fake)
    assert main(["infer", "a.tif", "--ckpt", "m.ckpt", "--out", "o", "--accelerator", "cpu", "--reader", "processes",
                 count, "3"]) == 0
    assert seen["reader"] == "processes" and seen["num_workers"] == 3
    assert main(["infer", "a.tif", "--ckpt", "m.ckpt", "--out", "o", "--accelerator", "cpu"]) == 0
    assert seen["reader"] is None and seen["num_workers"] is None  # the defaults: by device
    with pytest.raises(SystemExit):
        main(["infer", "a.tif", "--ckpt", "m.ckpt", "--out", "o", "--reader", "fork"])


class BrokenPreprocessing(Preprocessing):
    """Normalising fails: a bug in a worker rather than a bad input."""

    def __call__(self, image):
        raise ValueError("normalising went wrong")


def test_a_bug_in_a_worker_keeps_its_type_message_and_where_it_happened(tmp_path, no_leftovers):
    src = make_image(tmp_path / "a.tif", size=(32, 32))
    grid = TileGrid.build(32, 32, 16, 0)
    pre = BrokenPreprocessing(bands=[1, 2, 3], nodata=0, mean=[0.0] * 3, std=[1.0] * 3)
    with ProcessReader(src, grid, grid.batches(2), pre, num_workers=1) as reader:
        with pytest.raises(ValueError) as err:
            list(reader)
    assert str(err.value) == "normalising went wrong"  # the one line a report shows; the worker's traceback is a note
    assert any("in a geobp reader process" in note and "in __call__" in note for note in err.value.__notes__)


def test_predict_many_with_reader_processes_reports_a_bad_block_and_finishes_the_rest(tmp_path, make_scene, no_leftovers):
    from geobp.inference import predict_many
    from geobp.task import SegmentationTask
    from tests.inference.test_many import NAMES
    from tests.inference.test_many import PRE as PRE_DICT

    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=NAMES, preprocessing=PRE_DICT,
                            tile_size=32)
    good, _ = make_scene("good", size=(40, 48), root=tmp_path / "d")
    bad, _ = make_scene("bad", size=(96, 96), root=tmp_path / "d", seed=1)
    corrupt_cog(bad, tmp_path)
    summaries = {kind: predict_many(task, [good, bad], tmp_path / kind, progress=False, reader=kind, num_workers=2)
                 for kind in ("threads", "processes")}
    assert summaries["processes"].failed == summaries["threads"].failed
    assert [src for src, _ in summaries["processes"].failed] == [bad]
    assert "bad.tif: failed to read window" in summaries["processes"].failed[0][1]
    assert (tmp_path / "processes" / "good_classes.tif").read_bytes() == (tmp_path / "threads" / "good_classes.tif").read_bytes()
    assert sorted(p.name for p in (tmp_path / "processes").iterdir()) == ["good_classes.tif"]


CTRL_C_SCRIPT = """
import signal, sys, time
from pathlib import Path

import torch

from geobp.inference import predict_raster
from tests.inference.test_predict import PRE


class Slow(torch.nn.Conv2d):
    def forward(self, x):
        print("predicting", flush=True)
        time.sleep(0.1)
        return super().forward(x)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started in the background: SIGINT may be ignored
    src, dst = map(Path, sys.argv[1:])
    predict_raster(Slow(3, 4, 1), src, dst, PRE, tile_size=16, overlap=4, batch_size=2, progress=False,
                   reader="processes", num_workers=2)
"""


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a container's init may not reap them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_everything_and_writes_nothing(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to every process of the group, in a fresh interpreter."""
    import subprocess
    import sys

    src = make_image(tmp_path / "a.tif", size=(256, 256))
    script = tmp_path / "run.py"
    script.write_text(CTRL_C_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(tmp_path / "a_classes.tif")], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "predicting\n"  # the workers run
        assert len(live_group_members(proc.pid)) >= 4  # this one, the fork server, two readers (and a resource tracker)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT)
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt")  # the parent's only
    # the fork server and the resource tracker leave once they see the parent gone: give them a moment
    for _ in range(100):
        left = live_group_members(proc.pid)
        if not left:
            break
        time.sleep(0.1)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "run.py"]


def test_the_next_read_is_sent_before_a_batch_is_handed_out(tmp_path, no_leftovers):
    """The workers read on while the consumer works on a batch: with one slot, the read of batch
    n + 1 is already out when batch n reaches the consumer (not when it asks for the next)."""
    src = make_image(tmp_path / "a.tif", size=(64, 64))
    grid = TileGrid.build(64, 64, 16, 0)
    batches = grid.batches(4)
    with ProcessReader(src, grid, batches, PRE, num_workers=1, prefetch=1) as reader:
        it = iter(reader)
        for n in range(len(batches) - 1):
            assert next(it).tiles == batches[n]
            assert list(reader._outstanding) == [n + 1]
        assert next(it).tiles == batches[-1] and not reader._outstanding
