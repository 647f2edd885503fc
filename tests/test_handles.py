"""Bounded open-file handles: many scenes under a low open-files limit."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from geobp.errors import TooManyOpenFilesError
from geobp.handles import HandleCache, default_capacity
from tests.conftest import write_tif

REPO = Path(__file__).resolve().parents[1]


def rasters(folder: Path, n: int) -> list[Path]:
    return [write_tif(folder / f"r{i:03d}.tif", np.full((1, 8, 8), i, "uint8")) for i in range(n)]


def test_cache_keeps_the_most_recently_used_up_to_its_capacity(tmp_path):
    paths = rasters(tmp_path, 5)
    cache = HandleCache(capacity=3)
    handles = [cache.get(p) for p in paths[:3]]
    assert cache.get(paths[0]) is handles[0]  # reused, and now the most recent
    cache.get(paths[3])  # closes the least recently used: paths[1]
    assert len(cache) == 3 and handles[1].closed and not handles[0].closed
    assert cache.get(paths[1]).read(1)[0, 0] == 1  # reopened on demand
    copy = pickle.loads(pickle.dumps(cache))  # a DataLoader worker's copy holds no handle
    assert len(copy) == 0 and copy.capacity == 3
    cache.close()
    assert len(cache) == 0 and handles[0].closed


def test_default_capacity_follows_the_limit():
    assert default_capacity(1024) == 384  # (1024 - 256) / 2
    assert default_capacity(100) == 18  # (100 - 64) / 2
    assert default_capacity(40) == 4 and default_capacity(1_000_000) == 512


@pytest.fixture
def low_limit():
    """Lower this process's soft open-files limit so that at most ``extra`` more files open; restored after.

    The limit bounds descriptor numbers: a new file gets the lowest free number, and fails from
    the limit on.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower(extra: int) -> None:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + extra, hard))

    yield lower
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_file_can_be_opened_gives_the_limit_and_the_fix(tmp_path, low_limit):
    path = rasters(tmp_path, 1)[0]
    cache = HandleCache(capacity=8)
    low_limit(0)
    with pytest.raises(TooManyOpenFilesError, match=r"r000.tif: too many open files \(this process may keep \d+ open.*Fix: raise the limit"):
        cache.get(path)


def test_a_lower_limit_than_assumed_shrinks_the_cache(tmp_path, low_limit):
    paths = rasters(tmp_path, 12)
    cache = HandleCache(capacity=100)  # more than the limit will allow
    low_limit(6)
    for p in paths * 2:
        assert cache.get(p).read(1)[0, 0] == int(p.stem[1:])
    assert 1 <= cache.capacity <= 6
    cache.close()


@pytest.mark.slow
def test_loader_workers_read_hundreds_of_scenes_under_a_low_limit(tmp_path):
    """Two DataLoader workers read a tile of every one of 150 scenes (300 files) under a soft limit
    of 128 open files: without the bounded cache each worker would keep all 300 open."""
    from geobp.data.synth import write_scenes

    write_scenes(tmp_path / "d", scenes=150, size=32, bands=2, classes=2, block_size=16, nodata_every=0)
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from torch.utils.data import DataLoader
        from geobp.data.dataset import TileDataset, TileSpec, collate_tiles
        from geobp.data.preprocessing import Preprocessing
        root = Path({str(tmp_path / "d")!r})
        images = sorted(str(p) for p in (root / "images").glob("*.tif"))
        masks = [str(root / "masks" / Path(p).name) for p in images]
        pre = Preprocessing(bands=[1, 2], mean=[0.0, 0.0], std=[1.0, 1.0])
        ds = TileDataset(images, masks, [Path(p).stem for p in images], pre, tile_size=16, num_classes=2)
        specs = [TileSpec(i, 0, 0, 16, 16) for i in range(len(images))] * 2
        loader = DataLoader(ds, sampler=specs, batch_size=10, num_workers=2, collate_fn=collate_tiles)
        print("soft limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "tiles", sum(len(b["scene"]) for b in loader))
    """)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "soft limit 128 tiles 300" in proc.stdout
