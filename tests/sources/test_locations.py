"""Local paths and URLs side by side: forms, names, stamps, the cache folder, process-wide read options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from geobp.errors import ConfigError, DataNotFoundError
from geobp.sources.locations import (
    cache_root,
    default_cache_dir,
    file_name,
    file_stamp,
    file_stem,
    folder_of,
    is_folder_url,
    join,
    location,
    redacted,
    use_read_options,
)
from geobp.sources.urls import READ_OPTIONS

SIGNED = "https://h.example:8443/data/b04.tif?X-Amz-Credential=AKIA%2F2026%2Fus/x&X-Amz-Signature=abc&X-Amz-Expires=60"


def test_urls_stay_text_and_local_paths_become_paths():
    assert location("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert location("https://h/x.tif?sig=1") == "/vsicurl/https://h/x.tif?sig=1"
    assert location("data/x.tif") == Path("data/x.tif")
    assert location(Path("x.tif")) == Path("x.tif")


@pytest.mark.parametrize("path, name, stem", [
    (SIGNED, "b04.tif", "b04"),
    ("/vsicurl/" + SIGNED, "b04.tif", "b04"),
    ("s3://bucket/scenes/S2A.T33.tif", "S2A.T33.tif", "S2A.T33"),
    ("/vsis3/bucket/noext", "noext", "noext"),
    ("local/dir/a.tiff", "a.tiff", "a"),
])
def test_names_come_from_the_last_segment_without_the_query(path, name, stem):
    assert (file_name(path), file_stem(path)) == (name, stem)


def test_folder_urls_and_joins():
    assert is_folder_url("s3://bucket/scenes/") and is_folder_url("s3://bucket/scenes")
    assert not is_folder_url("s3://bucket/scenes/a.tif") and not is_folder_url(SIGNED)
    assert is_folder_url("s3://bucket/v1.2/")  # a trailing slash wins over a dot in the name
    assert join("/vsis3/b/ds", "images") == "/vsis3/b/ds/images" and join("ds", "images") == Path("ds/images")
    assert folder_of("/vsis3/b/ds/images/a.tif") == "/vsis3/b/ds/images"
    assert folder_of("/vsicurl/" + SIGNED) == "/vsicurl/https://h.example:8443/data"


def test_a_refreshed_signature_keeps_the_stamp(tmp_path):
    fresh = SIGNED.replace("Signature=abc", "Signature=zzz").replace("Expires=60", "Expires=3600")
    assert file_stamp(SIGNED) == file_stamp(fresh) and "abc" not in file_stamp(SIGNED)
    assert file_stamp("s3://b/k.tif") != file_stamp("s3://b/other.tif")
    local = tmp_path / "a.tif"
    local.write_bytes(b"1")
    before = file_stamp(local)
    local.write_bytes(b"12")
    assert file_stamp(local) != before
    with pytest.raises(FileNotFoundError):
        file_stamp(tmp_path / "missing.tif")


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "geobp"
    assert cache_root(["s3://b/a.tif"]) == tmp_path / "xdg" / "geobp"
    assert cache_root([tmp_path / "d" / "a.tif"]) == tmp_path / "d"
    assert cache_root([tmp_path / "a.tif"], fallback="s3://b/ds") == tmp_path / "xdg" / "geobp"
    assert cache_root(["s3://b/a.tif"], cache_dir=tmp_path / "c") == tmp_path / "c"
    with pytest.raises(ConfigError, match=r"^s3://b/cache: the cache folder must be local .* Fix: set data.cache_dir"):
        cache_root(["s3://b/a.tif"], cache_dir="s3://b/cache")


def test_redacted_keeps_local_paths_and_lists():
    assert redacted([SIGNED, "a/b.tif", Path("c.tif")]) == [
        SIGNED.replace("Credential=AKIA%2F2026%2Fus/x", "Credential=REDACTED").replace("Signature=abc", "Signature=REDACTED"),
        "a/b.tif", Path("c.tif")]
    assert redacted(None) is None


def test_read_options_become_environment_defaults_and_the_users_win(read_options_restored, monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "9")
    use_read_options()
    assert os.environ["GDAL_HTTP_MAX_RETRY"] == "9"
    for key, value in READ_OPTIONS.items():
        if key != "GDAL_HTTP_MAX_RETRY":
            assert os.environ[key] == value


def test_an_s3_prefix_that_holds_nothing_is_one_error(moto_server, s3_env):
    import boto3

    from geobp.raster import list_rasters

    boto3.client("s3", endpoint_url=moto_server.url).create_bucket(Bucket="geobp-empty")
    with pytest.raises(DataNotFoundError, match=r"^/vsis3/geobp-empty/nothing: no \.tif/\.tiff files in this folder"):
        list_rasters("s3://geobp-empty/nothing")
