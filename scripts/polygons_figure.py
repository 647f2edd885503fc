"""Render docs/img/polygons.png: polygons from `geobp vectorize` drawn over the image they came from.

A synthetic scene (smooth land-cover patches with speckle, as raw model output has) is written as
a class map, polygonized with --min_area 20 --simplify 1, and drawn with matplotlib over a
pseudo-colour image of the same patches. Run: python scripts/polygons_figure.py [OUT.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import geopandas as gpd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from benchmarks.vectorize import patches  # noqa: E402
from geobp.inference.outputs import colour_table  # noqa: E402
from geobp.inference.vectorize import VectorOptions, vectorize_class_map  # noqa: E402

NAMES = ["water", "forest", "grass", "crop", "urban", "bare"]


def main(out: Path) -> None:
    size = 256
    classes = patches(0, size, size, seed=3)
    transform = from_origin(500000, 5000000, 10, 10)
    colours = colour_table(len(NAMES), NAMES, 255)
    rng = np.random.default_rng(0)
    image = np.array([colours[c][:3] for c in range(len(NAMES))], np.float32)[classes] / 255
    image = np.clip(image * 0.75 + rng.normal(0, 0.06, image.shape), 0, 1)  # a muted, noisy "image"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene_classes.tif"
        profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633", nodata=255, transform=transform)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(classes, 1)
            dst.update_tags(CLASS_NAMES=",".join(NAMES))
        polygons = gpd.read_file(vectorize_class_map(path, options=VectorOptions(min_area=20, simplify=1.0)).path)
    left, top = transform.c, transform.f
    extent = (left, left + 10 * size, top - 10 * size, top)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.imshow(image, extent=extent)
    edge = [tuple(c / 255 for c in colours[int(k)][:3]) for k in polygons.class_id]
    polygons.plot(ax=ax, facecolor="none", edgecolor="white", linewidth=1.6)
    polygons.plot(ax=ax, facecolor="none", edgecolor=edge, linewidth=0.8)
    ax.set_title(f"{len(polygons)} polygons (--min_area 20 --simplify 1) over the image", fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "img" / "polygons.png")
