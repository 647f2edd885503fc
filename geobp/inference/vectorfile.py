"""Polygon files written in batches and atomically: GeoPackage, FlatGeobuf, GeoJSON, GeoParquet.

:class:`VectorFileWriter` creates a temporary file beside the destination, appends batches of
features to it (so the features never have to be in memory all at once) and renames it into
place on :meth:`~VectorFileWriter.commit`; :meth:`~VectorFileWriter.abort` (or a failure)
leaves nothing. GeoPackage, FlatGeobuf and GeoJSON are written by GDAL through ``pyogrio``;
GeoParquet (GDAL's Parquet driver is often missing from wheels) by ``pyarrow``, row group by row
group, with the ``geo`` metadata of the GeoParquet 1.0 specification (WKB geometries, the CRS as
PROJJSON), so ``geopandas.read_parquet`` and GDAL read it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geobp.atomic import AtomicFile
from geobp.choices import VectorFormat

#: File extension of each format.
EXTENSIONS: dict[str, str] = {"gpkg": ".gpkg", "fgb": ".fgb", "geojson": ".geojson", "parquet": ".parquet"}
#: GDAL driver of each format written through pyogrio.
_DRIVERS: dict[str, str] = {"gpkg": "GPKG", "fgb": "FlatGeobuf", "geojson": "GeoJSON"}


class VectorFileWriter:
    """A polygon layer written in batches to a temporary file, then renamed to ``path``.

    Args:
        path: the final file.
        fmt: its format.
        crs: the layer's CRS as WKT (or None).
        fields: the attribute names, in order; their types come from the first batch's arrays.
    """

    def __init__(self, path: str | Path, fmt: VectorFormat, crs: str | None, fields: list[str]) -> None:
        self.path = Path(path)
        self.format = fmt
        self.crs = crs
        self.fields = fields
        self.features = 0
        self._atomic = AtomicFile(self.path, suffix=EXTENSIONS[fmt])
        self._tmp: Path = self._atomic.path
        self._tmp.unlink()  # the drivers create the file themselves
        self._parquet: Any = None
        self._started = False

    def write(self, geometry: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Append features: shapely polygons and one array per field (float NaN is written as null)."""
        if self.format == "parquet":
            self._write_parquet(geometry, columns)
        else:
            from pyogrio.raw import write

            write(self._tmp, shapely.to_wkb(geometry), [columns[f] for f in self.fields], self.fields,
                  layer=self.path.stem, driver=_DRIVERS[self.format], geometry_type="Polygon", crs=self.crs,
                  promote_to_multi=False, append=self._started)
        self._started = True
        self.features += len(geometry)

    def _write_parquet(self, geometry: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {f: pa.array(columns[f], from_pandas=True) for f in self.fields}  # from_pandas: NaN -> null
        arrays["geometry"] = pa.array(shapely.to_wkb(geometry).tolist(), pa.binary())
        table = pa.table(arrays)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._tmp, table.schema.with_metadata({b"geo": self._geo_metadata()}))
        self._parquet.write_table(table.cast(self._parquet.schema))

    def _geo_metadata(self) -> bytes:
        """The GeoParquet ``geo`` key: WKB polygons, the CRS as PROJJSON."""
        column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"]}
        if self.crs is not None:
            from pyproj import CRS

            column["crs"] = CRS.from_user_input(self.crs).to_json_dict()
        else:
            column["crs"] = None
        return json.dumps({"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()

    def commit(self, empty_columns: dict[str, np.ndarray] | None = None) -> Path:
        """Finish the file and rename it to :attr:`path`; an empty layer when nothing was written.

        Args:
            empty_columns: zero-length arrays of the fields' types, for a file without features.
        """
        try:
            if not self._started:
                self.write(np.zeros(0, object), empty_columns or {f: np.zeros(0) for f in self.fields})
            if self._parquet is not None:
                self._parquet.close()
                self._parquet = None
        except BaseException:
            self.abort()
            raise
        return self._atomic.commit()

    def abort(self) -> None:
        """Delete the temporary file; safe to call twice."""
        if self._parquet is not None:
            with contextlib.suppress(Exception):
                self._parquet.close()
            self._parquet = None
        self._atomic.abort()
