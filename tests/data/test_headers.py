"""Scene headers read in parallel and cached; a changed file is read again."""

import numpy as np

from geobp.data import headers as headers_mod
from geobp.data.headers import read_headers
from geobp.errors import RasterReadError
from geobp.raster import read_info
from tests.conftest import write_tif


def test_headers_are_read_in_parallel_cached_and_refreshed(tmp_path, monkeypatch):
    paths = [write_tif(tmp_path / "d" / f"s{i}.tif", np.zeros((2, 8 + i, 8), "uint16")) for i in range(6)]
    bad = tmp_path / "d" / "bad.tif"
    bad.write_bytes(b"not a tiff")
    cache = tmp_path / "cache"
    first = read_headers([*paths, bad], cache, workers=4)
    assert all(first[str(p)] == read_info(p) for p in paths)
    assert isinstance(first[str(bad)], RasterReadError) and "bad.tif: not a readable raster" in str(first[str(bad)])
    assert (cache / "headers.json").is_file()

    opened = []
    monkeypatch.setattr(headers_mod, "read_info", lambda p: opened.append(p) or read_info(p))
    again = read_headers([*paths, bad], cache)
    assert opened == [str(bad)]  # the good headers came from the cache; errors are not cached
    assert all(again[str(p)] == first[str(p)] for p in paths)

    write_tif(paths[2], np.zeros((2, 20, 8), "uint16"))  # a changed file (size and time) is read again
    opened.clear()
    changed = read_headers(paths, cache)
    assert opened == [str(paths[2])] and changed[str(paths[2])].height == 20


def test_find_scenes_uses_the_header_cache(make_scene, tmp_path):
    from geobp.data.scenes import find_scenes

    make_scene("a")
    make_scene("b")
    scenes = find_scenes(tmp_path / "data")
    assert [s.name for s in scenes] == ["a", "b"]
    assert (tmp_path / "data" / ".geobp_cache" / "headers.json").is_file()
    assert find_scenes(tmp_path / "data") == scenes
