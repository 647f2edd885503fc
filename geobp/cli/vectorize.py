"""``geobp vectorize``: polygons of an existing class map (a previous run's or a user's) for a GIS.

The parser is built without torch or the vector libraries; the work imports
:mod:`geobp.inference.vectorize` when it runs (which does not import torch either).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, get_args

from geobp.choices import VectorFormat
from geobp.cli.common import console


def add_vector_arguments(group: Any, required: bool = False) -> None:
    """``--vector``, ``--simplify``, ``--min_area`` and ``--classes`` (shared with ``geobp infer``)."""
    group.add_argument("--vector", choices=list(get_args(VectorFormat)), default="gpkg" if required else None,
                       help="polygon file format: GeoPackage, FlatGeobuf, GeoJSON or GeoParquet" + (" (default gpkg)" if required else
                            "; writes OUT/<name>_classes.<ext> beside each class map (one polygon per 4-connected region of a class)"))
    group.add_argument("--simplify", type=float, default=0.0, metavar="PIXELS",
                       help="simplify the polygons by this tolerance in pixels, keeping shared edges shared (no gaps, no overlaps)")
    group.add_argument("--min_area", "--min-area", type=int, default=0, metavar="PIXELS",
                       help="merge regions of fewer pixels into their largest neighbour first (as gdal_sieve)")
    group.add_argument("--classes", default=None, metavar="IDS", help="keep only these class ids, e.g. 3 or 1,3")


def vector_options(a: argparse.Namespace, overwrite: bool = False) -> Any:
    """The :class:`~geobp.inference.vectorize.VectorOptions` of parsed arguments, or None without ``--vector``."""
    if a.vector is None:
        return None
    from geobp.inference.vectorize import VectorOptions, parse_classes

    return VectorOptions(format=a.vector, simplify=a.simplify, min_area=a.min_area, classes=parse_classes(a.classes),
                         overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp vectorize`` (built without torch)."""
    p = argparse.ArgumentParser(
        prog="geobp vectorize",
        description="Polygonize a class map (one integer band; nodata never polygonized) into a vector file a GIS reads: "
        "one polygon per 4-connected region of one class, with class_id, class_name, area (CRS units^2), pixels and "
        "confidence. Streamed in strips, so any size fits in memory.",
    )
    p.add_argument("class_map", help="class map GeoTIFF, e.g. geobp infer's OUT/<name>_classes.tif")
    add_vector_arguments(p, required=True)
    p.add_argument("--out", default=None, help="output folder (default: the class map's folder); the file is <class map stem>.<ext>")
    p.add_argument("--confidence", default=None, metavar="FILE",
                   help="per-pixel confidence on the class map's grid (geobp infer's _confidence.tif or _probs.tif); "
                        "the polygons' confidence is its mean over each region (null without)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp vectorize``: write the polygon file; 0 on success (bad input raises a one-line error)."""
    a = build_parser().parse_args(argv)
    from geobp.inference.vectorize import vector_path, vectorize_class_map

    options = vector_options(a, a.overwrite)
    summary = vectorize_class_map(a.class_map, vector_path(a.class_map, a.vector, a.out), options, confidence=a.confidence)
    console.print(f"{a.class_map} -> {summary.path} ({summary.polygons} polygons)", highlight=False, soft_wrap=True)
    return 0
