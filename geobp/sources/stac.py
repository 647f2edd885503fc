"""Static STAC: items, item collections and catalogs as items, and an item's assets as BandRefs.

Reading needs no STAC API: a search saved by pystac-client (an ItemCollection), an Item, or a
Catalog/Collection to walk are JSON files, local or at an ``http(s)://`` or ``s3://`` URL (read
through :func:`geobp.sources.urls.read_bytes`, with its retries and S3 settings).

Choosing bands by name (:func:`select_bands`) accepts, in this order of precedence:

1. an asset key (``B04`` on Planetary Computer, ``red`` or ``rededge1`` on Earth Search);
2. a band name from the asset's ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1) (``B04``);
3. a common name from the same lists (``blue``, ``green``, ``red``, ``nir``, ``swir16`` ...).

When a name or common name matches several assets, GeoTIFF assets win over JPEG2000 copies
(Earth Search lists both); if several remain (``rededge`` is B05, B06 and B07) the error lists
them. Integers are 1-based positions in the item's *band assets*: its raster assets in the item's
asset order, without ``visual`` previews, and without JPEG2000 copies when GeoTIFFs are present.
Names are the safer choice: providers order assets differently.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import pystac
from pystac.utils import make_absolute_href

from geobp.errors import ConfigError, DataNotFoundError, GeobpError, format_error
from geobp.sources.bandref import BandRef
from geobp.sources.urls import check_remote, gdal_path, is_url, read_bytes, redact

#: media types of raster assets (matched as prefixes, case-insensitive)
RASTER_MEDIA_TYPES = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-hdf")
#: roles of assets that are not bands, even in a raster format
NON_BAND_ROLES = frozenset({"thumbnail", "overview", "metadata"})
#: EO common names (STAC eo extension): a request for one of these that the item lacks is a
#: missing asset, not a typo
COMMON_NAMES = frozenset({
    "pan", "coastal", "blue", "green", "green05", "yellow", "red", "rededge", "rededge071", "rededge075",
    "rededge078", "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12",
})
#: roles and asset keys of categorical rasters (scene classification, quality bits): read with
#: nearest-neighbour resampling
CATEGORICAL_ROLES = frozenset({"cloud", "cloud-shadow", "snow-ice", "water-mask", "land-water", "saturation",
                               "quality", "classification", "mask"})
CATEGORICAL_KEYS = frozenset({"scl", "qa_pixel", "qa_radsat", "qa", "fmask", "mask", "cloud", "cloudmask"})


class _StacReader(pystac.StacIO):
    """pystac's reader for the documents of a catalog: local, http(s) and s3, through geobp's reader."""

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        href = source.get_absolute_href() if isinstance(source, pystac.Link) else str(source)
        return read_bytes(href).decode("utf-8")

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(format_error(str(dest), "STAC documents are only read here", "write them with pystac"))


def _location(source: str | Path) -> str:
    """Where a document is, in the form hrefs resolve against (absolute path, https:// or s3:// URL)."""
    text = str(source)
    if text.startswith("/vsis3/"):
        return "s3://" + text[len("/vsis3/"):]
    if text.startswith("/vsicurl/"):
        return text[len("/vsicurl/"):]
    if is_url(text):
        return text
    return str(Path(text[len("file://"):] if text.startswith("file://") else text).resolve())


def _absolute_assets(item: pystac.Item, base: str) -> pystac.Item:
    for asset in item.assets.values():
        if asset.href:
            asset.href = make_absolute_href(asset.href, base)
    return item


def _where(item: pystac.Item) -> str:
    href = item.get_self_href()
    return f"{redact(href)} (item {item.id})" if href else f"item {item.id}"


def load_items(source: str | Path) -> list[pystac.Item]:
    """The items of a STAC Item, ItemCollection, Collection or Catalog, asset hrefs made absolute.

    Args:
        source: a local path or ``http(s)://`` / ``s3://`` URL of a STAC JSON document: an Item
            (``"type": "Feature"``), an ItemCollection (``"FeatureCollection"``, as pystac-client's
            ``ItemCollection.save_object`` writes a search), or a Catalog/Collection, which is walked
            (every item below it, in link order).

    Returns:
        The items. Relative asset hrefs are resolved against the document holding the item, and an
        item without a self link gets that document's location as its self href.

    Raises:
        ConfigError: the file is not JSON, or not a STAC document pystac can read.
        DataNotFoundError: the document (or one it links to) is missing, or holds no items.
        RasterReadError: access denied or server unreachable (see :func:`~geobp.sources.urls.read_bytes`).
    """
    location = _location(source)
    where = redact(location)
    try:
        doc = json.loads(read_bytes(location).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(format_error(where, f"not a JSON document ({error})",
                                       "give a STAC Item, ItemCollection, Collection or Catalog (.json)")) from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "Feature":
            item = pystac.Item.from_dict(doc, href=location, preserve_dict=False)
            items = [_absolute_assets(item, location)]
        elif kind == "FeatureCollection":
            items = []
            for feature in pystac.ItemCollection.from_dict(doc, preserve_dict=False):
                _absolute_assets(feature, location)
                if not feature.get_self_href():
                    feature.set_self_href(location)
                items.append(feature)
        elif kind in ("Catalog", "Collection"):
            cls = pystac.Collection if kind == "Collection" else pystac.Catalog
            root = cls.from_file(location, stac_io=_StacReader())
            items = [_absolute_assets(item, item.get_self_href() or location) for item in root.get_items(recursive=True)]
        else:
            raise ConfigError(format_error(where, f"not a STAC document (expected type Feature, FeatureCollection, "
                                           f"Catalog or Collection, found {kind!r})",
                                           "give a STAC Item, ItemCollection, Collection or Catalog"))
    except (pystac.STACError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        cause = _geobp_cause(error)
        if cause is not None:  # pystac wrapped our reader's error (a linked document missing, denied ...)
            raise cause from None
        raise ConfigError(format_error(where, f"not a valid STAC {kind} ({type(error).__name__}: {error})",
                                       "check the document against the STAC specification")) from None
    for item in items:
        if not isinstance(item.id, str) or not item.id:
            raise ConfigError(format_error(redact(item.get_self_href() or location), f"a STAC item without an id "
                                           f"(expected a string, found {item.id!r})", "give every item its \"id\""))
    if not items:
        raise DataNotFoundError(format_error(where, f"the STAC {kind} holds no items",
                                             "choose a search or catalog with items (check its filters and dates)"))
    return items


def _geobp_cause(error: BaseException) -> GeobpError | None:
    """The geobp error that caused ``error``, if any (pystac re-raises reader errors as STACError)."""
    seen = error.__cause__ or error.__context__
    while seen is not None:
        if isinstance(seen, GeobpError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_raster(asset: pystac.Asset) -> bool:
    roles = set(asset.roles or [])
    if roles & NON_BAND_ROLES:
        return False
    media = (asset.media_type or "").lower()
    if media:
        return media.startswith(RASTER_MEDIA_TYPES)
    return "data" in roles or asset.href.lower().split("?")[0].endswith((".tif", ".tiff", ".jp2"))


def _band_list(asset: pystac.Asset) -> list[dict[str, Any]]:
    """The asset's bands: STAC 1.1 ``bands``, else ``eo:bands``; raster:bands fields merged in."""
    fields = asset.extra_fields
    bands = fields.get("bands") or fields.get("eo:bands") or []
    raster = fields.get("raster:bands") or []
    count = max(len(bands), len(raster))
    return [{**(raster[i] if i < len(raster) else {}), **(bands[i] if i < len(bands) else {})} for i in range(count)]


def _nodata(asset: pystac.Asset, band: dict[str, Any]) -> float | None:
    value = band.get("nodata", asset.extra_fields.get("nodata"))
    if value is None:
        return None
    if isinstance(value, str):
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value.lower(), value)
    return float(value)


def _resampling(key: str, asset: pystac.Asset, band: dict[str, Any]) -> str:
    categorical = (key.lower() in CATEGORICAL_KEYS or set(asset.roles or []) & CATEGORICAL_ROLES
                   or any(k.startswith("classification:") for k in (*asset.extra_fields, *band)))
    return "nearest" if categorical else "bilinear"


def _is_tiff(asset: pystac.Asset) -> bool:
    media = (asset.media_type or "").lower()
    return "tiff" in media or (not media and asset.href.lower().split("?")[0].endswith((".tif", ".tiff")))


def _is_jp2(asset: pystac.Asset) -> bool:
    media = (asset.media_type or "").lower()
    return "jp2" in media or (not media and asset.href.lower().split("?")[0].endswith(".jp2"))


def band_assets(item: pystac.Item) -> list[str]:
    """The keys of the item's band assets, in asset order: what ``None`` and integers select.

    Raster assets without ``visual`` previews, and without JPEG2000 copies when GeoTIFFs are present.
    """
    keys = [k for k, a in item.assets.items() if _is_raster(a) and "visual" not in (a.roles or []) and k != "visual"]
    if any(_is_tiff(item.assets[k]) for k in keys):
        keys = [k for k in keys if not _is_jp2(item.assets[k])]
    return keys


def _refs_of_asset(item: pystac.Item, key: str, name: str | None) -> list[BandRef]:
    asset = item.assets[key]
    bands = _band_list(asset) or [{}]
    path = gdal_path(asset.href)
    if len(bands) == 1:
        return [BandRef(name=name or key, path=path, band=1, resampling=_resampling(key, asset, bands[0]),
                        nodata=_nodata(asset, bands[0]))]
    return [BandRef(name=f"{name or key}_{b.get('name', i + 1)}", path=path, band=i + 1,
                    resampling=_resampling(key, asset, b), nodata=_nodata(asset, b)) for i, b in enumerate(bands)]


def _names(item: pystac.Item) -> tuple[list[str], list[str], list[str]]:
    """The raster asset keys, band names and common names of the item, each once, in asset order."""
    keys, names, commons = [], [], []
    for key, asset in item.assets.items():
        if not _is_raster(asset):
            continue
        keys.append(key)
        for band in _band_list(asset):
            names.append(str(band.get("name", "")))
            commons.append(str(band.get("eo:common_name") or band.get("common_name") or ""))
    return tuple(list(dict.fromkeys(v for v in values if v)) for values in (keys, names, commons))  # type: ignore[return-value]


def _available(item: pystac.Item) -> str:
    keys, names, commons = _names(item)
    text = f"asset keys {', '.join(keys) or '(none)'}"
    if names:
        text += f"; band names {', '.join(names)}"
    if commons:
        text += f"; common names {', '.join(commons)}"
    return text


def _find(item: pystac.Item, name: str) -> list[BandRef]:
    """The BandRefs for one requested name (see the module docstring for the precedence)."""
    wanted = name.casefold()
    for key, asset in item.assets.items():
        if key.casefold() == wanted:
            if not _is_raster(asset):
                raise ConfigError(format_error(_where(item), f"asset {key!r} is not a raster band (media type "
                                               f"{asset.media_type}, roles {', '.join(asset.roles or []) or 'none'})",
                                               f"choose among {_available(item)}"))
            return _refs_of_asset(item, key, name)
    for fields in (("name",), ("eo:common_name", "common_name")):
        hits = []
        for key, asset in item.assets.items():
            if not _is_raster(asset) or "visual" in (asset.roles or []):  # previews: by asset key only
                continue
            for index, band in enumerate(_band_list(asset)):
                if any(str(band.get(f, "")).casefold() == wanted for f in fields):
                    hits.append((key, asset, index, band))
        if len(hits) > 1 and any(_is_tiff(a) for _, a, _, _ in hits):
            hits = [hit for hit in hits if _is_tiff(hit[1])]
        if len(hits) > 1:
            keys = ", ".join(key for key, *_ in hits)
            raise ConfigError(format_error(_where(item), f"band {name!r} is ambiguous (it matches the assets {keys})",
                                           f"name one asset key instead: {keys}"))
        if hits:
            key, asset, index, band = hits[0]
            return [BandRef(name=name, path=gdal_path(asset.href), band=index + 1,
                            resampling=_resampling(key, asset, band), nodata=_nodata(asset, band))]
    available = _available(item)
    pool = [n for names in _names(item) for n in names]
    same = [n for n in pool if _normal(n) == _normal(name)]  # B4 for B04
    if not same and (wanted in COMMON_NAMES or _looks_like_band(name)):
        raise DataNotFoundError(format_error(_where(item), f"the item has no asset for band {name!r} "
                                             f"(expected it among {available})",
                                             "choose bands every item has, or leave out items without this one"))
    close = same or difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(format_error(_where(item), f"no band {name!r} in the item (expected an asset key, band name "
                                   f"or common name, found {available})", f"{hint}use one of those names"))


def _normal(name: str) -> str:
    """A name without case and leading zeros in numbers (``B04`` and ``b4`` are the same)."""
    return re.sub(r"(?<!\d)0+(?=\d)", "", name.casefold())


def _looks_like_band(name: str) -> bool:
    """Sensor band names (Sentinel-2 ``B8A``, Landsat ``SR_B4``, ``B10``): valid elsewhere, absent here."""
    return re.fullmatch(r"(SR_|ST_)?B\d{1,2}A?", name, flags=re.I) is not None


def select_bands(item: pystac.Item, bands: list[str | int] | None = None) -> list[BandRef]:
    """The BandRefs of ``bands`` in ``item``, in the order asked.

    Args:
        item: a STAC item with absolute asset hrefs (as :func:`load_items` returns them).
        bands: asset keys, band names or common names (see the module docstring), or 1-based
            positions among :func:`band_assets`; None for every band asset.

    Returns:
        One BandRef per band: ``path`` is the asset's GDAL path (``/vsicurl/https://...``,
        ``/vsis3/...``), ``band`` its index in the file, ``name`` the name asked (the asset key for
        positions and None), ``nodata`` from ``bands``/``raster:bands``/the asset's ``nodata``,
        ``resampling`` ``nearest`` for categorical assets (SCL, QA, classification) else ``bilinear``.

    Raises:
        ConfigError: a name no asset or band has (with close matches), an ambiguous name, a non-raster
            asset, a position out of range, or the same name twice. Messages name the item and its
            file/URL and list the available names.
        DataNotFoundError: a common name or sensor band name (``nir``, ``B8A``) this item lacks, or
            an item with no band assets.
    """
    keys = band_assets(item)
    if not keys:
        raise DataNotFoundError(format_error(_where(item), "the item has no raster band assets (expected GeoTIFF or "
                                             f"JPEG2000 assets, found {', '.join(item.assets) or 'no assets'})",
                                             "choose items with data assets (check the collection)"))
    if bands is None:
        return [ref for key in keys for ref in _refs_of_asset(item, key, None)]
    refs: list[BandRef] = []
    for wanted in bands:
        if isinstance(wanted, bool) or not isinstance(wanted, (int, str)):
            raise ConfigError(format_error(_where(item), f"band {wanted!r} is neither a name nor a position",
                                           "give asset keys, band names or 1-based positions"))
        if isinstance(wanted, int):
            if not 1 <= wanted <= len(keys):
                raise ConfigError(format_error(_where(item), f"band position {wanted} is out of range (expected 1.."
                                               f"{len(keys)}, the band assets {', '.join(keys)})",
                                               "count from 1 in that order, or give names"))
            refs.extend(_refs_of_asset(item, keys[wanted - 1], None))
        else:
            refs.extend(_find(item, wanted))
    names = [ref.name for ref in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(format_error(_where(item), f"band {', '.join(twice)} selected twice",
                                       "list each band once"))
    return refs


def _asset_of(item: pystac.Item, ref: BandRef) -> pystac.Asset | None:
    for asset in item.assets.values():
        if asset.href and gdal_path(asset.href) == ref.path:
            return asset
    return None


def asset_resolutions(item: pystac.Item, refs: list[BandRef]) -> list[float]:
    """The pixel size (CRS units, x direction) of each BandRef's file, to choose the reference grid.

    Taken from the asset's ``proj:transform``, else its ``raster:bands`` ``spatial_resolution``, else
    its ``gsd``, else the item's ``proj:transform`` (which applies to assets without their own), else
    the file's header (one read per file, through :func:`~geobp.sources.urls.check_remote`). The
    item-level ``gsd`` is not used: it is nominal (10 m for every Sentinel-2 band).

    Raises:
        DataNotFoundError, RasterReadError: a header had to be read and could not be.
    """
    out = []
    for ref in refs:
        asset = _asset_of(item, ref)
        res = None
        if asset is not None:
            fields = asset.extra_fields
            bands = _band_list(asset)
            band = bands[ref.band - 1] if ref.band <= len(bands) else {}
            if fields.get("proj:transform"):
                res = abs(float(fields["proj:transform"][0]))
            elif band.get("spatial_resolution"):
                res = float(band["spatial_resolution"])
            elif fields.get("gsd"):
                res = float(fields["gsd"])
            elif item.properties.get("proj:transform"):
                res = abs(float(item.properties["proj:transform"][0]))
        if res is None:
            res = abs(check_remote(ref.path)["transform"].a)
        out.append(res)
    return out
