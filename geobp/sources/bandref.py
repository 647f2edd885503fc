"""``BandRef``: one band of one file, named, as a source contributes it to a scene."""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.enums import Resampling

from geobp.errors import ConfigError, format_error


@dataclass(frozen=True)
class BandRef:
    """One band of a raster file (local path or GDAL virtual path), under the name the model sees.

    Args:
        name: the band's name as the model sees it: ``B04`` for a single source, ``s1:VV`` when a
            scene stacks several sources (``<source>:<band>``).
        path: a path rasterio opens: local, or a GDAL virtual path (``/vsicurl/https://...``,
            ``/vsis3/bucket/key``); see :mod:`geobp.sources.urls`.
        band: the 1-based band index in that file.
        resampling: how the band is brought onto the reference grid when its file is on another
            grid (a :class:`rasterio.enums.Resampling` name: ``bilinear`` for reflectances,
            ``nearest`` for categorical bands).
        nodata: the band's nodata value; the file's tag when None.
        source: the name of the source the band belongs to (``s2``, ``s1``, ``dem``); ``""`` for
            a single source.

    Raises:
        ConfigError: ``band`` is below 1 or ``resampling`` is not a rasterio resampling name.
    """

    name: str
    path: str
    band: int = 1
    resampling: str = "bilinear"
    nodata: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.band < 1:
            raise ConfigError(format_error(self.path, f"band {self.band} of {self.name!r} is not a 1-based index",
                                           "number bands from 1"))
        if self.resampling not in Resampling.__members__:
            names = ", ".join(sorted(Resampling.__members__))
            raise ConfigError(format_error(self.path, f"unknown resampling {self.resampling!r} for band {self.name!r}",
                                           f"use one of: {names}"))

    @property
    def method(self) -> Resampling:
        """The rasterio resampling enum of :attr:`resampling`."""
        return Resampling[self.resampling]
