"""A real labelled scene for the accuracy benchmarks: the SpaceNet sample that solaris ships.

solaris (CosmiQ Works, Apache-2.0) publishes on PyPI a wheel that holds, as test data, a real
900 x 900 px panchromatic WorldView-3 chip of Atlanta (0.5 m, uint16, EPSG:32616) and the 43
building footprints drawn over it for SpaceNet (GeoJSON, the same CRS). PyPI is reachable where the
benchmarks run, so the wheel is fetched once from PyPI's file host (pinned by URL and sha256; pip
refuses this old wheel's metadata) and the two files are kept in the benchmarks' cache; nothing of
solaris is installed or imported.
"""

from __future__ import annotations

import hashlib
import tempfile
import urllib.request
import zipfile
from pathlib import Path

WHEEL = "solaris-0.4.0-py3-none-any.whl"
WHEEL_URL = ("https://files.pythonhosted.org/packages/86/16/d6bd1d5a09c9a8c565227659817030b636be743d1487b41b069b0f1793fd/"
             + WHEEL)
WHEEL_SHA256 = "09445946221410ebb2ae807580cf7dea9fe3c9aa3bf045947b61a162d2d3a8df"
#: member of the wheel -> (file name in the cache, sha256)
MEMBERS = {
    "solaris/data/sample_geotiff.tif": ("atlanta_pan.tif", "f135d521b13a7e16a97983df976579217afbb07550c878115e0c71c36de193c5"),
    "solaris/data/geotiff_labels.geojson": ("atlanta_buildings.geojson",
                                            "d2d7b5c75d444947691404b8d018dc72b7aa48500f3f0fb2956320125201b8e2"),
}
SOURCE = ("SpaceNet sample chip (Atlanta, WorldView-3 panchromatic, 0.5 m, 900 x 900 px) and its 43 building "
          f"footprints, from the test data of solaris 0.4.0 on PyPI (`{WHEEL}`, Apache-2.0)")


class RealDataUnavailable(RuntimeError):
    """The real scene could not be fetched or did not match its pinned checksum."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract(wheel: Path, folder: Path, members: dict[str, tuple[str, str]] = MEMBERS) -> dict[str, Path]:
    """Copy ``members`` of the zip ``wheel`` into ``folder`` (checked against their sha256, written
    to a temporary name, then renamed); returns their cache names -> paths.

    Raises:
        RealDataUnavailable: a member is missing or its checksum differs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as z:
        for member, (name, digest) in members.items():
            dst = folder / name
            tmp = dst.with_name(dst.name + ".part")
            try:
                with z.open(member) as src, open(tmp, "wb") as f:
                    f.write(src.read())
            except KeyError as err:
                raise RealDataUnavailable(f"{wheel.name} has no {member}") from err
            if sha256(tmp) != digest:
                tmp.unlink()
                raise RealDataUnavailable(f"{member} of {wheel.name} does not match its pinned sha256")
            tmp.replace(dst)
            out[name] = dst
    return out


def fetch_spacenet_sample(cache: Path) -> dict[str, Path]:
    """The image and footprints (cache names -> paths), fetched from PyPI on first use.

    Raises:
        RealDataUnavailable: the wheel could not be downloaded (no access to PyPI) or does not match.
    """
    folder = cache / "realdata" / "spacenet_atlanta"
    have = {name: folder / name for name, digest in MEMBERS.values()}
    if all(p.exists() for p in have.values()):
        return have
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / WHEEL
        try:
            with urllib.request.urlopen(WHEEL_URL, timeout=120) as response, open(wheel, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as err:
            raise RealDataUnavailable(f"could not download {WHEEL_URL}: {err}") from err
        if sha256(wheel) != WHEEL_SHA256:
            raise RealDataUnavailable(f"{WHEEL} does not match its pinned sha256")
        return extract(wheel, folder)
