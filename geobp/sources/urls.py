"""Remote rasters: URLs to GDAL virtual paths, read options, redaction, folder listing, error reporting.

A remote band is read by GDAL itself (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``), so
GDAL's own configuration applies, read from the environment when a file is opened:

- S3 (``s3://``, ``/vsis3/``): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
  ``AWS_NO_SIGN_REQUEST=YES`` (public buckets), ``AWS_REQUEST_PAYER=requester``, and for
  S3-compatible stores (MinIO, Ceph) ``AWS_S3_ENDPOINT=host:port``, ``AWS_HTTPS=NO``,
  ``AWS_VIRTUAL_HOSTING=FALSE``. :func:`list_prefix` builds its boto3 client from the same
  variables.
- Google Cloud Storage (``gs://``, ``/vsigs/``): ``GS_ACCESS_KEY_ID``/``GS_SECRET_ACCESS_KEY``,
  ``GS_OAUTH2_REFRESH_TOKEN``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``GS_NO_SIGN_REQUEST=YES``.
- Azure (``az://container/blob``, ``/vsiaz/``): ``AZURE_STORAGE_CONNECTION_STRING``, or
  ``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_ACCESS_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``,
  ``AZURE_NO_SIGN_REQUEST=YES``.
- HTTP (``https://``, ``/vsicurl/``): ``GDAL_HTTP_HEADERS``, ``GDAL_HTTP_USERPWD``,
  ``GDAL_HTTP_TIMEOUT``, ``GDAL_HTTP_PROXY``, ``CURL_CA_BUNDLE``; signed URLs work as they are.

:func:`gdal_read_options` adds the options that make cloud-optimized reads fast and robust; any of
them set in the environment wins.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import RasterioIOError

from geobp.errors import ConfigError, DataNotFoundError, RasterReadError, format_error
from geobp.sources import stackpath

#: URL scheme -> GDAL virtual file system prefix.
SCHEMES: dict[str, str] = {
    "http": "/vsicurl/",
    "https": "/vsicurl/",
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
}

#: GDAL virtual file systems that read over the network.
NETWORK_VSI = ("/vsicurl/", "/vsicurl?", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/",
               "/vsiswift/", "/vsiwebhdfs/")

#: The options :func:`gdal_read_options` sets, each with why.
READ_OPTIONS: dict[str, str] = {
    # opening a COG must not list its "folder" (one LIST or HTML request per file, slow on buckets)
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # belt and braces beside EMPTY_DIR: no probing for side-car files (.aux.xml, .ovr, .msk); {noext}
    # keeps extension-less hrefs readable; GeoPackage, GeoJSON and FlatGeobuf are vector labels. Any
    # other ending is refused by GDAL without a request (check_remote says so): set the variable to add one
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.JP2,.vrt,.gpkg,.geojson,.fgb,{noext}",
    # one request for adjacent byte ranges (the tiles of one window are often contiguous)
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # several ranges in flight on one HTTP/2 connection where the server offers it
    "GDAL_HTTP_MULTIPLEX": "YES",
    # GDAL itself retries 429, 500, 502, 503 and 504 (and connection resets/timeouts), not 401/403/404:
    # it waits RETRY_DELAY seconds, then multiplies the wait by 2 plus jitter each time (5 retries
    # from 1 s: about a minute at most); GDAL_HTTP_RETRY_CODES (GDAL >= 3.10) changes the codes
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    # a dead host fails after 30 s instead of curl's 300 s
    "GDAL_HTTP_CONNECTTIMEOUT": "30",
    # keep the header and recently read ranges of each file in memory (25 MB per file)
    "VSI_CACHE": "TRUE",
}

# query parameters that carry a secret (matched case-insensitively; also any key ending with one
# of _SECRET_SUFFIXES): AWS SigV4 and SigV2, GCS V4 and V2, Azure SAS, OAuth-style tokens, API keys
_SECRET_KEYS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "sig", "api_key", "apikey", "key", "code",
})
_SECRET_SUFFIXES = ("token", "signature", "secret", "password")
# parameters that change when a signature is refreshed (dropped by stable_key), beside the secrets
_VOLATILE_KEYS = frozenset({"expires", "se", "st", "skt", "ske", "skoid", "sktid", "sks", "skv",
                            "awsaccesskeyid", "googleaccessid"})
_VOLATILE_PREFIXES = ("x-amz-", "x-goog-")

_SEP = r"(?:[?&;]|%3[Ff]|%26)"
_EQ = r"(?:=|%3[Dd])"
_QUERY_PARAM = re.compile(rf"({_SEP})([A-Za-z0-9_.\-]+)({_EQ})((?:(?!%26|%3[Ff])[^&#\s\"'<>])*)")
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^/\s:@?#]*):([^/\s@?#]+)@")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
REDACTED = "REDACTED"


def _is_secret(key: str) -> bool:
    key = key.lower()
    return key in _SECRET_KEYS or key.endswith(_SECRET_SUFFIXES)


def _is_volatile(key: str) -> bool:
    key = key.lower()
    return _is_secret(key) or key in _VOLATILE_KEYS or key.startswith(_VOLATILE_PREFIXES)


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``scheme://...``, not ``file://``) rather than a local path."""
    match = _URL.match(str(path))
    return match is not None and match.group(1).lower() != "file"


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is read over the network: a URL, or a GDAL network path (``/vsis3/...``); a
    stack path (:mod:`~geobp.sources.stackpath`) when any of its files is."""
    text = str(path)
    if stackpath.is_stack_path(text):
        return any(is_remote(f) for f in stackpath.members(text))
    return is_url(text) or any(part in text for part in NETWORK_VSI)


def gdal_path(path_or_url: str | Path) -> str:
    """The path GDAL opens for a local path, a URL or a GDAL virtual path.

    ``https://h/k`` and ``http://`` become ``/vsicurl/https://h/k``, ``s3://b/k`` ``/vsis3/b/k``,
    ``gs://b/k`` ``/vsigs/b/k``, ``az://container/k`` ``/vsiaz/container/k``, ``file:///p`` ``/p``;
    local paths and ``/vsi...`` paths come back unchanged.

    Raises:
        ConfigError: a URL scheme GDAL cannot read here.
    """
    text = str(path_or_url)
    match = _URL.match(text)
    if match is None or stackpath.is_stack_path(text):
        return text
    scheme = match.group(1).lower()
    rest = text[match.end():]
    if scheme == "file":
        return "/" + rest.lstrip("/")
    if scheme in ("http", "https"):
        return "/vsicurl/" + text
    if scheme in SCHEMES:
        return SCHEMES[scheme] + rest
    raise ConfigError(format_error(redact(text), f"unsupported URL scheme {scheme}:// (expected one of: "
                                   f"{', '.join(s + '://' for s in SCHEMES)})",
                                   "give a local path, an http(s)/s3/gs/az URL or a GDAL /vsi path"))


def gdal_read_options() -> dict[str, str]:
    """Options for ``rasterio.Env(**gdal_read_options())`` around remote reads.

    Every option of :data:`READ_OPTIONS` that is not already set in the environment, so a user's
    ``GDAL_HTTP_MAX_RETRY=10`` (say) wins. ``GDAL_CACHEMAX`` is left alone.
    """
    return {key: value for key, value in READ_OPTIONS.items() if key not in os.environ}


def redact(text: str) -> str:
    """``text`` with the credentials in any URL it holds replaced by ``REDACTED``.

    Handles a bare URL, a ``/vsicurl/`` path and URLs inside a longer message: secret query
    parameters (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``,
    ``X-Goog-Signature``, ``X-Goog-Credential``, Azure SAS ``sig``, ``Signature``, ``*token``,
    ``key`` ...), also percent-encoded inside ``/vsicurl?url=``, and the password of
    ``user:password@`` in the authority. Expiry and permission parameters are kept.
    """

    def query(match: re.Match[str]) -> str:
        sep, key, eq, value = match.groups()
        return f"{sep}{key}{eq}{REDACTED}" if value and _is_secret(key) else match.group(0)

    text = str(text)
    if stackpath.PREFIX in text:  # a stack path: shown by its scene's name, its files' URLs nowhere
        text = _STACK.sub(lambda m: _stack_display(m.group(0)), text)
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text)
    return _QUERY_PARAM.sub(query, text)


#: a stack path inside a message (its JSON runs to the last closing brace on the line)
_STACK = re.compile(re.escape(stackpath.PREFIX) + r"\{.*\}")


def _stack_display(text: str) -> str:
    try:
        return stackpath.display(text)
    except (ValueError, KeyError, TypeError):
        return "a stacked scene"


def stable_key(path: str | Path) -> str:
    """A cache key for a raster that stays the same when its URL's signature is refreshed.

    The GDAL path of ``path`` without the query parameters that carry a signature, credential,
    token or expiry (``X-Amz-*``, ``X-Goog-*``, ``Signature``, ``Expires``, Azure ``sig``, ``st``,
    ``se``, ``sk*``), and without a password; other parameters keep their order.
    """
    if stackpath.is_stack_path(str(path)):  # its name and a hash of its files' stable keys
        return f"stack|{stackpath.stack_name(str(path))}|{stackpath.digest(str(path), stable_key)}"
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}@", gdal_path(path))
    if text.startswith("/vsicurl?"):  # GDAL's option form, the URL percent-encoded inside: a key, not a path
        return _QUERY_PARAM.sub(lambda m: "" if _is_volatile(m.group(2)) else m.group(0), text)
    base, _, query = text.partition("?")
    kept = [part for part in query.split("&") if part and not _is_volatile(part.split("=", 1)[0])]
    return f"{base}?{'&'.join(kept)}" if kept else base


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("YES", "TRUE", "ON", "1")


def s3_client() -> Any:
    """A boto3 S3 client configured from GDAL's variables.

    ``AWS_S3_ENDPOINT`` (``host:port``, http when ``AWS_HTTPS=NO``), path-style addressing when
    ``AWS_VIRTUAL_HOSTING=FALSE``, unsigned requests when ``AWS_NO_SIGN_REQUEST=YES``; credentials
    and region come from boto3's usual chain (``AWS_*`` variables, profiles).
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
    if _env_flag("AWS_NO_SIGN_REQUEST"):
        options["signature_version"] = UNSIGNED
    if os.environ.get("AWS_VIRTUAL_HOSTING", "").strip().upper() in ("FALSE", "NO", "OFF", "0"):
        options["s3"] = {"addressing_style": "path"}
    endpoint = os.environ.get("AWS_S3_ENDPOINT")
    endpoint_url = None
    if endpoint:
        https = os.environ.get("AWS_HTTPS", "YES").strip().upper() not in ("NO", "FALSE", "OFF", "0")
        endpoint_url = endpoint if "://" in endpoint else f"{'https' if https else 'http'}://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(**options))


def _split_s3(path: str) -> tuple[str, str]:
    text = path[len("s3://"):] if path.startswith("s3://") else path[len("/vsis3/"):]
    bucket, _, key = text.partition("/")
    return bucket, key


def _suffix_ok(name: str, suffixes: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(s.lower() for s in suffixes))


def list_prefix(url_or_folder: str | Path, suffixes: tuple[str, ...] = (".tif", ".tiff")) -> list[str]:
    """The rasters directly inside a local folder or an S3 prefix, sorted, hidden files left out.

    An S3 prefix (``s3://bucket/folder`` or ``/vsis3/bucket/folder``) is listed like a folder (one
    level, through boto3 configured as :func:`s3_client`) and its files come back in the form given.

    Args:
        url_or_folder: a local folder, ``s3://bucket/prefix`` or ``/vsis3/bucket/prefix``.
        suffixes: file name endings to keep (case-insensitive).

    Returns:
        Paths (local) or URLs (in the input's form), sorted.

    Raises:
        ConfigError: an HTTP(S), GCS or Azure folder (they cannot be listed here).
        DataNotFoundError: the folder or bucket does not exist, or holds no matching file.
        RasterReadError: access denied, or the server cannot be reached.
    """
    text = str(url_or_folder)
    wanted = "/".join(suffixes)
    if text.startswith(("s3://", "/vsis3/")):
        files = _list_s3(text, suffixes)
    elif text.startswith(("http://", "https://", "/vsicurl")):
        raise ConfigError(format_error(redact(text), "an HTTP folder cannot be listed (HTTP has no directory "
                                       "listing, so a glob is impossible too)",
                                       "give the files one by one, or a STAC item, item collection or catalog"))
    elif is_remote(text):
        raise ConfigError(format_error(redact(text), "only local and s3:// folders can be listed",
                                       "give the files one by one, or a STAC item, item collection or catalog"))
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise DataNotFoundError(format_error(folder, "folder not found", "check the path"))
        files = sorted(str(p) for p in folder.iterdir() if p.is_file() and _suffix_ok(p.name, suffixes))
    if not files:
        raise DataNotFoundError(format_error(redact(text), f"no {wanted} files in this folder",
                                             f"put the rasters ({wanted}) directly in it, or give the files"))
    return files


def _list_s3(text: str, suffixes: tuple[str, ...]) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split_s3(text)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    head = "s3://" if text.startswith("s3://") else "/vsis3/"
    files = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for entry in page.get("Contents", []):
                name = entry["Key"][len(prefix):]
                if _suffix_ok(name, suffixes):
                    files.append(f"{head}{bucket}/{entry['Key']}")
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise _remote_error(text, f"{code} {error}") from None
    except BotoCoreError as error:
        raise _remote_error(text, str(error)) from None
    return sorted(files)


_NOT_FOUND = re.compile(r"response code:? 404|\b404\b|NoSuchKey|NoSuchBucket|specified (key|bucket) does not exist|"
                        r"does not exist in the file system|No such file or directory", re.I)
_DENIED = re.compile(r"response code:? 40[13]|\b40[13]\b|AccessDenied|Access Denied|Forbidden|InvalidAccessKeyId|"
                     r"SignatureDoesNotMatch|InvalidToken|ExpiredToken|AuthenticationFailed|"
                     r"AWS_SECRET_ACCESS_KEY|credentials", re.I)
_UNREACHABLE = re.compile(r"could not connect|couldn't connect|failed to connect|connection refused|timed out|"
                          r"timeout|could not resolve|resolve host|connection reset|unreachable|"
                          r"Connect timeout|Name or service not known|EndpointConnectionError", re.I)


def _remote_error(path: str, message: str) -> Exception:
    """The geobp error for a failed remote access, from the underlying library's message."""
    where = redact(path)
    said = redact(" ".join(str(message).split()))[:200]
    if _UNREACHABLE.search(said):
        return RasterReadError(format_error(where, f"server unreachable ({said})",
                                            "check the host and port, the network or proxy (GDAL_HTTP_PROXY), "
                                            "and AWS_S3_ENDPOINT for S3-compatible stores"))
    if _NOT_FOUND.search(said):
        return DataNotFoundError(format_error(where, f"not found ({said})", "check the URL/key (and bucket)"))
    if _DENIED.search(said):
        return RasterReadError(format_error(where, f"access denied ({said})",
                                            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; GS_*/"
                                            "AZURE_* for gs:// and az://), or AWS_NO_SIGN_REQUEST=YES for public "
                                            "buckets; refresh an expired signed URL"))
    return RasterReadError(format_error(where, f"cannot read the raster ({said})",
                                        "check that the URL points to a GeoTIFF/COG and that the server serves "
                                        "byte ranges"))


def check_remote(path: str | Path) -> dict[str, Any]:
    """Open a (remote or local) raster once, turning GDAL's failures into one-line geobp errors.

    Args:
        path: a URL, GDAL virtual path or local path.

    Returns:
        The raster's profile (``driver``, ``width``, ``height``, ``count``, ``dtype``, ``crs``,
        ``transform``, ``nodata`` ...).

    Raises:
        DataNotFoundError: 404 / NoSuchKey / no such file ("not found ... Fix: check the URL/key").
        RasterReadError: 401/403/AccessDenied ("access denied ... Fix: set AWS_ACCESS_KEY_ID/... or
            AWS_NO_SIGN_REQUEST=YES for public buckets"), connection refused or timed out ("server
            unreachable"), or anything else GDAL cannot read. Messages name the redacted URL.
    """
    vsi = gdal_path(path)
    try:
        with rasterio.Env(**gdal_read_options()), rasterio.open(vsi) as src:
            return dict(src.profile)
    except RasterioIOError as error:
        said = str(error)
        refused = _refused_extension(vsi)
        if refused and "does not exist in the file system" in said:
            allowed = os.environ.get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", READ_OPTIONS["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"])
            raise RasterReadError(format_error(redact(str(path)), f"GDAL opens only files ending in {allowed} over "
                                               f"the network here (CPL_VSIL_CURL_ALLOWED_EXTENSIONS), found {refused!r}",
                                               f"set CPL_VSIL_CURL_ALLOWED_EXTENSIONS={allowed},{refused}")) from None
        if "response code" not in said and not any(p.search(said) for p in (_UNREACHABLE, _DENIED)):
            # GDAL said "not recognized as a supported format", or "does not exist in the file system"
            # (which it also says of a server that is down): ask the server
            said = _probe(vsi) or said
        raise _remote_error(str(path), said) from None


def _refused_extension(vsi: str) -> str | None:
    """The file's extension when CPL_VSIL_CURL_ALLOWED_EXTENSIONS (ours or the user's) leaves it out."""
    if not any(vsi.startswith(prefix) for prefix in NETWORK_VSI):
        return None
    allowed = os.environ.get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", READ_OPTIONS["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"])
    name = vsi.split("?", 1)[0].rsplit("/", 1)[-1]
    ext = "." + name.rsplit(".", 1)[1] if "." in name else "{noext}"
    listed = [e.strip().lower() for e in allowed.split(",")]
    return None if ext.lower() in listed or not allowed.strip() else ext


def _probe(vsi: str) -> str | None:
    """What the server answers for a remote file GDAL could not open, as an error text (None if it is fine)."""
    if vsi.startswith("/vsis3/"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split_s3(vsi)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            return f"HTTP response code: {error.response.get('Error', {}).get('Code', '')}"
        except BotoCoreError as error:
            return str(error)
        return None
    if vsi.startswith("/vsicurl/http"):
        request = urllib.request.Request(vsi[len("/vsicurl/"):], headers={"Range": "bytes=0-0"})
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as error:
            return f"HTTP response code: {error.code}"
        except (urllib.error.URLError, OSError) as error:
            return str(getattr(error, "reason", error))
    return None


def _retry_settings() -> tuple[int, float]:
    try:
        retries = int(os.environ.get("GDAL_HTTP_MAX_RETRY", READ_OPTIONS["GDAL_HTTP_MAX_RETRY"]))
        delay = float(os.environ.get("GDAL_HTTP_RETRY_DELAY", READ_OPTIONS["GDAL_HTTP_RETRY_DELAY"]))
    except ValueError as error:
        raise ConfigError(format_error("GDAL_HTTP_MAX_RETRY/GDAL_HTTP_RETRY_DELAY", f"not a number ({error})",
                                       "set an integer count and a delay in seconds")) from None
    return max(retries, 0), max(delay, 0.0)


def read_bytes(path_or_url: str | Path, timeout: float = 60.0) -> bytes:
    """The whole content of a small file (a STAC JSON): local, ``http(s)://`` or ``s3://``.

    HTTP(S) goes through urllib and retries 429 and 5xx answers like GDAL does (the same
    ``GDAL_HTTP_MAX_RETRY`` and ``GDAL_HTTP_RETRY_DELAY``, the wait doubling each time); ``s3://``
    goes through :func:`s3_client`.

    Raises:
        DataNotFoundError: 404 / NoSuchKey / no such file.
        RasterReadError: access denied, server unreachable, or retries exhausted.
    """
    text = str(path_or_url)
    if text.startswith(("s3://", "/vsis3/")):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split_s3(text)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            raise _remote_error(text, f"{error.response.get('Error', {}).get('Code', '')} {error}") from None
        except BotoCoreError as error:
            raise _remote_error(text, str(error)) from None
    if text.startswith("/vsicurl/"):
        text = text[len("/vsicurl/"):]
    if text.startswith(("http://", "https://")):
        return _http_get(text, timeout)
    if is_remote(text):
        raise ConfigError(format_error(redact(text), "only local, http(s):// and s3:// files can be read here",
                                       "give an http(s) or s3 URL, or copy the file locally"))
    local = Path(text[len("file://"):] if text.startswith("file://") else text)
    if not local.is_file():
        raise DataNotFoundError(format_error(local, "file not found", "check the path"))
    return local.read_bytes()


def _http_get(url: str, timeout: float) -> bytes:
    retries, delay = _retry_settings()
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            if error.code in (429, 500, 502, 503, 504) and attempt < retries:
                time.sleep(delay * 2**attempt)
                continue
            raise _remote_error(url, f"HTTP response code: {error.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise _remote_error(url, str(getattr(error, "reason", error))) from None
    raise AssertionError("unreachable")  # the loop always returns or raises
