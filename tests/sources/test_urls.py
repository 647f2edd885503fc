"""geobp.sources.urls: GDAL paths, read options, redaction, listing, remote reads and their errors.

Every server is local (127.0.0.1) and started by the fixtures in conftest.py.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geobp.errors import ConfigError, DataNotFoundError, RasterReadError
from geobp.sources.urls import (
    READ_OPTIONS,
    check_remote,
    gdal_path,
    gdal_read_options,
    is_remote,
    is_url,
    list_prefix,
    read_bytes,
    redact,
    stable_key,
)
from tests.sources.conftest import BUCKET, S2_BANDS, StacTree
from tests.sources.servers import ServerProcess, parse_ranges

S3_SIGNED = ("https://geobp-s2.s3.us-west-2.amazonaws.com/tiles/B04.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20261207%2Fus-west-2%2Fs3%2Faws4_request&X-Amz-Date=20261207T001500Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
             "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0")
GCS_SIGNED = ("https://storage.googleapis.com/bucket/B04.tif?X-Goog-Algorithm=GOOG4-RSA-SHA256"
              "&X-Goog-Credential=svc%40proj.iam.gserviceaccount.com%2F20261207%2Fauto%2Fstorage%2Fgoog4_request"
              "&X-Goog-Date=20261207T001500Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
              "&X-Goog-Signature=9a8b7c6d5e4f")
AZ_SAS = ("https://acct.blob.core.windows.net/container/B04.tif?st=2026-12-07T00%3A00%3A00Z"
          "&se=2026-12-08T00%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c&skoid=1a2b&sktid=3c4d"
          "&skt=2026-12-07T00%3A00%3A00Z&ske=2026-12-14T00%3A00%3A00Z&sks=b&skv=2024-05-04&sig=AzSeCrEt%2Bvalue%3D")
SECRETS = ("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLETOKEN", "9a8b7c6d5e4f",
           "svc%40proj", "AzSeCrEt", "hunter2")


def read_all(path: str) -> np.ndarray:
    with rasterio.Env(**gdal_read_options()), rasterio.open(path) as src:
        return src.read()


def unique(name: str) -> str:
    """A file name GDAL has not seen in this process (its /vsicurl/ cache remembers answers per URL)."""
    return f"{uuid.uuid4().hex[:8]}-{name}"


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("https://h.example/a/B04.tif", "/vsicurl/https://h.example/a/B04.tif"),
    ("http://127.0.0.1:8000/B04.tif?x=1", "/vsicurl/http://127.0.0.1:8000/B04.tif?x=1"),
    ("s3://bucket/key/B04.tif", "/vsis3/bucket/key/B04.tif"),
    ("S3://bucket/key.tif", "/vsis3/bucket/key.tif"),
    ("gs://bucket/key.tif", "/vsigs/bucket/key.tif"),
    ("az://container/blob.tif", "/vsiaz/container/blob.tif"),
    ("file:///data/B04.tif", "/data/B04.tif"),
    ("/data/B04.tif", "/data/B04.tif"),
    ("relative/B04.tif", "relative/B04.tif"),
    ("C:/data/B04.tif", "C:/data/B04.tif"),
    ("/vsis3/bucket/key.tif", "/vsis3/bucket/key.tif"),
    ("/vsicurl/https://h/x.tif", "/vsicurl/https://h/x.tif"),
    ("/vsizip//vsicurl/https://h/x.zip/B04.tif", "/vsizip//vsicurl/https://h/x.zip/B04.tif"),
])
def test_gdal_path_maps_urls_and_keeps_paths(given: str, expected: str) -> None:
    assert gdal_path(given) == expected


def test_gdal_path_takes_path_objects(tmp_path: Path) -> None:
    assert gdal_path(tmp_path / "B04.tif") == str(tmp_path / "B04.tif")
    assert gdal_path(Path("/vsis3/bucket/key.tif")) == "/vsis3/bucket/key.tif"


def test_gdal_path_rejects_an_unknown_scheme_without_leaking_the_password() -> None:
    with pytest.raises(ConfigError, match=r"^ftp://u:REDACTED@h/x.tif: unsupported URL scheme ftp:// "
                                          r"\(expected one of: http://, https://, s3://.*\)\. Fix: give a local path"):
        gdal_path("ftp://u:hunter2@h/x.tif")


def test_is_url_and_is_remote() -> None:
    assert is_url("https://h/x.tif") and is_url("s3://b/k") and is_url("gs://b/k")
    assert not is_url("/data/x.tif") and not is_url("C:/x.tif") and not is_url("file:///x.tif")
    assert not is_url("/vsis3/b/k")
    assert is_remote("/vsis3/b/k") and is_remote("/vsizip//vsicurl/https://h/a.zip/x.tif")
    assert not is_remote("/data/x.tif") and not is_remote("/vsimem/x.tif")


# --- options -----------------------------------------------------------------------------------


def test_read_options_defaults_and_user_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in READ_OPTIONS:
        monkeypatch.delenv(key, raising=False)
    options = gdal_read_options()
    assert options["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert options["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    assert options["GDAL_HTTP_MULTIPLEX"] == "YES"
    assert options["VSI_CACHE"] == "TRUE"
    assert int(options["GDAL_HTTP_MAX_RETRY"]) > 0 and float(options["GDAL_HTTP_RETRY_DELAY"]) > 0
    assert ".tif" in options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"]
    assert "GDAL_CACHEMAX" not in options
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "11")
    options = gdal_read_options()
    assert "GDAL_HTTP_MAX_RETRY" not in options  # the environment's 11 applies, not ours
    with rasterio.Env(**options):
        assert rasterio.env.getenv().get("GDAL_HTTP_MAX_RETRY") is None


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [S3_SIGNED, GCS_SIGNED, AZ_SAS])
def test_redact_removes_signatures_and_keeps_the_rest(url: str) -> None:
    for form in (url, gdal_path(url), f"RasterioIOError: '{gdal_path(url)}' not recognized, retry later"):
        out = redact(form)
        assert not any(secret in out for secret in SECRETS), out
        assert "REDACTED" in out
        assert out.split("?")[0] == form.split("?")[0]  # the path itself is kept
    assert "X-Amz-Expires=3600" in redact(S3_SIGNED) and "X-Amz-Signature=REDACTED" in redact(S3_SIGNED)
    assert "se=2026-12-08T00%3A00%3A00Z" in redact(AZ_SAS) and "sig=REDACTED" in redact(AZ_SAS)


def test_redact_userinfo_percent_encoded_and_plain_text() -> None:
    assert redact("https://alice:hunter2@h.example/x.tif") == "https://alice:REDACTED@h.example/x.tif"
    msg = "failed: /vsicurl/http://bob:hunter2@10.0.0.1/x.tif?token=abc123&band=1 (timeout)"
    assert redact(msg) == "failed: /vsicurl/http://bob:REDACTED@10.0.0.1/x.tif?token=REDACTED&band=1 (timeout)"
    encoded = "/vsicurl?max_retry=3&url=https%3A%2F%2Fh%2Fx.tif%3Fsig%3DAzSeCrEt%26sp%3Drl"
    assert redact(encoded) == "/vsicurl?max_retry=3&url=https%3A%2F%2Fh%2Fx.tif%3Fsig%3DREDACTED%26sp%3Drl"
    plain = "/data/x.tif: band 3 of 2 (expected 1..2). Fix: key=value pairs stay? no query here"
    assert redact(plain) == plain
    assert redact("https://h/x.tif?band=1&format=tif") == "https://h/x.tif?band=1&format=tif"


def test_stable_key_ignores_a_refreshed_signature() -> None:
    refreshed = (S3_SIGNED.replace("20261207T001500Z", "20261207T011500Z")
                 .replace("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "ffffeeee").replace("EXAMPLETOKEN", "OTHERTOKEN"))
    assert refreshed != S3_SIGNED
    assert stable_key(S3_SIGNED) == stable_key(refreshed) == "/vsicurl/https://geobp-s2.s3.us-west-2.amazonaws.com/tiles/B04.tif"
    az2 = AZ_SAS.replace("2026-12-08", "2026-12-09").replace("AzSeCrEt", "NewSecret")
    assert stable_key(AZ_SAS) == stable_key(az2) == "/vsicurl/https://acct.blob.core.windows.net/container/B04.tif?sp=rl&sv=2024-05-04&sr=c"
    assert stable_key(GCS_SIGNED) == "/vsicurl/https://storage.googleapis.com/bucket/B04.tif"
    # other files and meaningful parameters still differ; s3:// and /vsis3/ are one key
    assert stable_key(S3_SIGNED) != stable_key(S3_SIGNED.replace("B04", "B08"))
    assert stable_key("https://h/x.tif?band=1") != stable_key("https://h/x.tif?band=2")
    assert stable_key("s3://b/k.tif") == stable_key("/vsis3/b/k.tif") == "/vsis3/b/k.tif"
    assert stable_key("https://u:pw1@h/x.tif") == stable_key("https://u:pw2@h/x.tif") == "/vsicurl/https://u@h/x.tif"


# --- the test server itself --------------------------------------------------------------------


def test_range_parsing_of_the_test_server() -> None:
    assert parse_ranges("bytes=0-9", 100) == [(0, 9)]
    assert parse_ranges("bytes=90-", 100) == [(90, 99)]
    assert parse_ranges("bytes=-5", 100) == [(95, 99)]
    assert parse_ranges("bytes=0-1,10-19", 100) == [(0, 1), (10, 19)]
    assert parse_ranges("bytes=200-300", 100) is None


def test_http_server_answers_multiple_ranges(http_server: ServerProcess, stac_tree: StacTree) -> None:
    import urllib.request

    rel = f"{stac_tree.ids[0]}/B04.tif"
    data = (stac_tree.root / rel).read_bytes()
    request = urllib.request.Request(f"{http_server.url}/{rel}", headers={"Range": "bytes=0-3,100-103"})
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 206
        assert answer.headers["Content-Type"].startswith("multipart/byteranges")
        body = answer.read()
    assert data[:4] in body and data[100:104] in body and f"bytes 100-103/{len(data)}".encode() in body


# --- remote reads ------------------------------------------------------------------------------


def test_vsicurl_read_equals_local_read(http_server: ServerProcess, stac_tree: StacTree) -> None:
    rel = f"{stac_tree.ids[0]}/B04.tif"
    http_server.reset()
    # a query GDAL has not seen: its /vsicurl/ cache would answer a URL another test of this worker read
    remote = read_all(gdal_path(f"{http_server.url}/{rel}?t={unique('x')}"))
    np.testing.assert_array_equal(remote, read_all(str(stac_tree.root / rel)))
    stats = http_server.stats()
    assert stats["requests"][f"/{rel}"] >= 1
    assert stats["ranges"].get(f"/{rel}", 0) >= 1  # GDAL read byte ranges, not the file
    assert set(stats["requests"]) == {f"/{rel}"}  # no folder listing, no .aux.xml/.msk probes
    # a window reads fewer bytes than the file holds
    http_server.reset()
    rel8 = f"{stac_tree.ids[0]}/B08.tif"
    with rasterio.Env(**gdal_read_options()), rasterio.open(gdal_path(f"{http_server.url}/{rel8}?t={unique('x')}")) as src:
        window = src.read(1, window=rasterio.windows.Window(0, 0, 32, 32))
    np.testing.assert_array_equal(window, stac_tree.array(0, "B08")[0, :32, :32])


def test_without_the_options_gdal_probes_side_car_files(http_server: ServerProcess, stac_tree: StacTree,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The counterpart of the test above: what GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR saves."""
    from geobp.sources.urls import READ_OPTIONS

    for key in READ_OPTIONS:  # set process-wide by any earlier test of this worker that opened a URL
        monkeypatch.delenv(key, raising=False)
    rel = f"{stac_tree.ids[1]}/B03.tif"
    http_server.reset()
    with rasterio.Env(), rasterio.open(gdal_path(f"{http_server.url}/{rel}")) as src:
        src.read()
    requested = set(http_server.stats()["requests"])
    assert f"/{rel}.aux.xml" in requested and f"/{stac_tree.ids[1]}/" in requested


def test_extension_filter_is_reported(http_server: ServerProcess, stac_tree: StacTree,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", raising=False)
    url = f"{http_server.url}/{stac_tree.ids[0]}/{unique('B04.img')}?sig=hunter2"
    with pytest.raises(RasterReadError, match=r"^http://.*\.img\?sig=REDACTED: GDAL opens only files ending in "
                                              r"\.tif,.*,\{noext\} over the network here \(CPL_VSIL_CURL_ALLOWED_"
                                              r"EXTENSIONS\), found '\.img'\. Fix: set CPL_VSIL_CURL_ALLOWED_"
                                              r"EXTENSIONS=\.tif,.*,\{noext\},\.img\.$"):
        check_remote(url)
    # a file without an extension is allowed ({noext}): here it is simply missing
    with pytest.raises(DataNotFoundError, match=r"not found \(HTTP response code: 404\)"):
        check_remote(f"{http_server.url}/{stac_tree.ids[0]}/{unique('B04')}")


def test_multirange_get_through_the_server(http_server: ServerProcess, stac_tree: StacTree) -> None:
    rel = f"{stac_tree.ids[1]}/B02.tif"
    with rasterio.Env(**gdal_read_options(), GDAL_HTTP_MULTIRANGE="SINGLE_GET"), \
            rasterio.open(gdal_path(f"{http_server.url}/{rel}")) as src:
        remote = src.read()
    np.testing.assert_array_equal(remote, stac_tree.array(1, "B02"))


def test_vsis3_read_equals_local_read(s3_bucket: str, stac_tree: StacTree) -> None:
    rel = f"{stac_tree.ids[0]}/B8A.tif"
    remote = read_all(gdal_path(f"s3://{s3_bucket}/{rel}"))
    np.testing.assert_array_equal(remote, read_all(str(stac_tree.tif(0, "B8A"))))
    assert check_remote(f"s3://{s3_bucket}/{rel}")["width"] == 60


def test_vsis3_anonymous_access(s3_bucket: str, stac_tree: StacTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    remote = read_all(gdal_path(f"s3://{s3_bucket}/{stac_tree.ids[0]}/B01.tif"))
    np.testing.assert_array_equal(remote, stac_tree.array(0, "B01"))
    assert list_prefix(f"s3://{s3_bucket}/{stac_tree.ids[0]}")[0].endswith("/B01.tif")


def test_retries_503_every_other_request(start_http, stac_tree: StacTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")  # the user's value wins over ours (1 s)
    server = start_http("--fail-every", "2")
    # a distinct URL: GDAL's /vsicurl/ cache must not serve an earlier answer
    url = f"{server.url}/{stac_tree.ids[2]}/B03.tif?t={unique('x')}"
    remote = read_all(gdal_path(url))
    np.testing.assert_array_equal(remote, stac_tree.array(2, "B03"))
    stats = server.stats()
    assert stats["statuses"]["503"] >= 1  # failures happened and were retried


@pytest.mark.parametrize("status", [429, 500, 502, 504])
def test_gdal_retries_these_codes_itself(status: int, start_http, stac_tree: StacTree,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.02")
    server = start_http("--fail-every", "2", "--fail-status", str(status))
    remote = read_all(gdal_path(f"{server.url}/{stac_tree.ids[1]}/B05.tif?t={unique('x')}"))
    np.testing.assert_array_equal(remote, stac_tree.array(1, "B05"))
    assert server.stats()["statuses"][str(status)] >= 1


def test_a_403_is_not_retried(start_http, stac_tree: StacTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.02")
    server = start_http("--fail-every", "1", "--fail-status", "403")
    with pytest.raises(RasterReadError, match=r"access denied \(HTTP response code: 403\)"):
        check_remote(f"{server.url}/{stac_tree.ids[1]}/B05.tif")
    assert server.stats()["statuses"] == {"403": 1}


def test_vsis3_retries_503_too(start_http, stac_tree: StacTree, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto cannot fail on purpose, so the HTTP server plays an S3 endpoint (path style: /bucket/key)."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    server = start_http("--fail-every", "2")
    monkeypatch.setenv("AWS_S3_ENDPOINT", f"127.0.0.1:{server.port}")
    remote = read_all(gdal_path(f"s3://{stac_tree.ids[1]}/B11.tif"))  # the scene folder is the "bucket"
    np.testing.assert_array_equal(remote, stac_tree.array(1, "B11"))
    stats = server.stats()
    assert stats["statuses"]["503"] >= 1 and set(stats["requests"]) == {f"/{stac_tree.ids[1]}/B11.tif"}


def test_retries_give_up_with_a_one_line_error(start_http, stac_tree: StacTree,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "3")
    server = start_http("--fail-every", "1")
    url = f"{server.url}/{stac_tree.ids[0]}/B03.tif?sig=hunter2"
    with pytest.raises(RasterReadError) as info:
        check_remote(url)
    message = str(info.value)
    assert message.startswith(f"/vsicurl/{server.url}/{stac_tree.ids[0]}/B03.tif?sig=REDACTED: ") or \
        message.startswith(f"{server.url}/{stac_tree.ids[0]}/B03.tif?sig=REDACTED: ")
    assert "503" in message and "\n" not in message and "hunter2" not in message
    times = [t for t, _, status in server.stats()["times"] if status == 503]
    assert len(times) == 4  # 1 + GDAL_HTTP_MAX_RETRY attempts
    gaps = np.diff(times)
    assert gaps[-1] > gaps[0]  # the delay grows (GDAL's exponential backoff)


def test_unreachable_server_gives_one_line_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/scene/B04.tif?X-Amz-Signature=hunter2"
    with pytest.raises(RasterReadError, match=rf"^http://127\.0\.0\.1:{port}/scene/B04\.tif\?X-Amz-Signature=REDACTED: "
                                              r"server unreachable \(.*\)\. Fix: check the host and port"):
        check_remote(url)


def test_slow_server_times_out_as_unreachable(start_http, stac_tree: StacTree,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    server = start_http("--latency", "3")
    started = time.monotonic()
    with pytest.raises(RasterReadError, match=r"server unreachable \(.*timed out.*\)"):
        check_remote(f"{server.url}/{stac_tree.ids[0]}/{unique('B04.tif')}")
    assert time.monotonic() - started < 10


def test_404_and_403_give_their_one_line_errors(http_server: ServerProcess, stac_tree: StacTree) -> None:
    missing = f"{http_server.url}/{stac_tree.ids[0]}/{unique('B13.tif')}?X-Goog-Signature=hunter2"
    with pytest.raises(DataNotFoundError) as info:
        check_remote(missing)
    assert str(info.value) == (f"{redact(missing)}: not found (HTTP response code: 404). "
                               "Fix: check the URL/key (and bucket).")
    forbidden = f"{http_server.url}/status/403/{unique('B04.tif')}"
    with pytest.raises(RasterReadError) as info:
        check_remote(forbidden)
    assert str(info.value).startswith(f"{forbidden}: access denied (HTTP response code: 403). "
                                      "Fix: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    assert "AWS_NO_SIGN_REQUEST=YES for public buckets" in str(info.value)


def test_s3_missing_key_and_bucket(s3_bucket: str) -> None:
    with pytest.raises(DataNotFoundError, match=rf"^s3://{s3_bucket}/nope/B04\.tif: not found \(.*\)\. "
                                                r"Fix: check the URL/key"):
        check_remote(f"s3://{s3_bucket}/nope/B04.tif")
    with pytest.raises(DataNotFoundError, match=r"^s3://no-such-bucket-geobp/B04\.tif: not found"):
        check_remote("s3://no-such-bucket-geobp/B04.tif")


def test_s3_without_credentials_is_access_denied(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    # no credentials at all: GDAL refuses before asking
    with pytest.raises(RasterReadError, match=rf"^s3://{s3_bucket}/private/B04\.tif: access denied \(.*\)\. "
                                              r"Fix: set AWS_ACCESS_KEY_ID"):
        check_remote(f"s3://{s3_bucket}/private/B04.tif")
    # unsigned requests for a private object: the server answers 403
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    with pytest.raises(RasterReadError, match=rf"^s3://{s3_bucket}/private/B04\.tif: access denied \(.*403.*\)\. "
                                              r"Fix: set AWS_ACCESS_KEY_ID"):
        check_remote(f"s3://{s3_bucket}/private/B04.tif")
    monkeypatch.delenv("AWS_NO_SIGN_REQUEST")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # (GDAL remembers the 403 for that key for the rest of the process: ask for another one)
    assert check_remote(f"s3://{s3_bucket}/private/B08.tif")["width"] == 120


def test_local_path_through_check_remote(stac_tree: StacTree, tmp_path: Path) -> None:
    assert check_remote(stac_tree.tif(0, "B09"))["count"] == 1
    with pytest.raises(DataNotFoundError, match=r"missing\.tif: not found"):
        check_remote(tmp_path / "missing.tif")


# --- listing -----------------------------------------------------------------------------------


def test_list_prefix_on_s3_lists_like_a_folder(s3_bucket: str, stac_tree: StacTree) -> None:
    scene = stac_tree.ids[0]
    listed = list_prefix(f"s3://{s3_bucket}/{scene}")
    assert listed == [f"s3://{s3_bucket}/{scene}/{b}.tif" for b in sorted(S2_BANDS)]
    assert listed == list_prefix(f"s3://{s3_bucket}/{scene}/")  # a trailing slash changes nothing
    local = list_prefix(stac_tree.root / scene)
    assert [Path(p).name for p in local] == [u.rsplit("/", 1)[1] for u in listed]
    assert list_prefix(f"/vsis3/{s3_bucket}/{scene}")[0].startswith(f"/vsis3/{s3_bucket}/{scene}/")
    # one level only: the bucket's top holds folders and json, no rasters
    with pytest.raises(DataNotFoundError, match=rf"^s3://{s3_bucket}: no \.tif/\.tiff files in this folder"):
        list_prefix(f"s3://{s3_bucket}")
    assert list_prefix(f"s3://{s3_bucket}", suffixes=(".json",)) == [f"s3://{s3_bucket}/empty.json",
                                                                     f"s3://{s3_bucket}/search.json"]
    with pytest.raises(DataNotFoundError, match=r"^s3://no-such-bucket-geobp/x: not found \(NoSuchBucket"):
        list_prefix("s3://no-such-bucket-geobp/x")


def test_list_prefix_local_folder(tmp_path: Path) -> None:
    for name in ("b.tif", "a.TIF", ".hidden.tif", "c.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.tif").mkdir()
    assert [Path(p).name for p in list_prefix(tmp_path)] == ["a.TIF", "b.tif", "c.tiff"]
    with pytest.raises(DataNotFoundError, match=r"nowhere: folder not found\. Fix: check the path\."):
        list_prefix(tmp_path / "nowhere")


def test_list_prefix_refuses_http_and_says_what_to_give() -> None:
    with pytest.raises(ConfigError, match=r"^https://h\.example/scene/: an HTTP folder cannot be listed \(HTTP has no "
                                          r"directory listing, so a glob is impossible too\)\. Fix: give the files "
                                          r"one by one, or a STAC item, item collection or catalog\.$"):
        list_prefix("https://h.example/scene/")
    with pytest.raises(ConfigError, match=r"^gs://b/scene: only local and s3:// folders can be listed"):
        list_prefix("gs://b/scene")


# --- small files -------------------------------------------------------------------------------


def test_read_bytes_local_http_s3_with_retries(start_http, s3_bucket: str, stac_tree: StacTree,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    expected = (stac_tree.root / stac_tree.item).read_bytes()
    assert read_bytes(stac_tree.root / stac_tree.item) == expected
    assert read_bytes(f"s3://{BUCKET}/{stac_tree.item}") == expected
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.01")
    server = start_http("--fail-every", "2")
    for _ in range(3):  # every other request fails: each read needs its retry
        assert read_bytes(f"{server.url}/{stac_tree.item}") == expected
    assert server.stats()["statuses"]["503"] >= 2
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    with pytest.raises(RasterReadError, match=r"server unreachable|503"):
        read_bytes(f"{server.url}/{stac_tree.item}")
        read_bytes(f"{server.url}/{stac_tree.item}")
    with pytest.raises(DataNotFoundError, match=r"^s3://geobp-s2/nope\.json: not found \(NoSuchKey"):
        read_bytes(f"s3://{BUCKET}/nope.json")


def test_the_loopback_guard_stops_outside_connections() -> None:
    import socket

    with pytest.raises(AssertionError, match=r"tests stay on 127\.0\.0\.1"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never sent


@pytest.mark.usefixtures("read_options_restored")
def test_a_band_file_of_a_stack_is_opened_with_the_read_options(http_server: ServerProcess, stac_tree: StacTree) -> None:
    """A STAC asset's header is read (``read_header``) before any other geobp open of a URL in a process:
    the read options apply from that first open, so GDAL neither lists the folder nor probes side-car files
    (nine requests per file, each a round trip)."""
    from geobp.sources.files import read_header

    rel = f"header-{uuid.uuid4().hex}.tif"  # a file GDAL has not seen in this process (its caches are per URL)
    (stac_tree.root / rel).write_bytes(stac_tree.tif(2, "B02").read_bytes())
    try:
        http_server.reset()
        assert read_header(gdal_path(f"{http_server.url}/{rel}")).width == 120
        assert set(http_server.stats()["requests"]) == {f"/{rel}"}
    finally:
        (stac_tree.root / rel).unlink()
