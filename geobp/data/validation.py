"""Dataset validation: every problem of every scene, as data, for ``geobp check`` and for ``fit``.

Header checks (readable, georeferenced, north-up, image/mask on one grid, consistent bands) are
cheap and run whenever a dataset is opened. A full check also reads every block of every file
(truncated downloads show up here), scans mask values against the classes, and counts nodata and
NaN pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from rasterio.windows import Window

from geobp.classes import invalid_labels
from geobp.data.preprocessing import valid_pixels
from geobp.errors import BandMismatchError, DataNotFoundError, GeobpError, LabelError, format_error
from geobp.raster import RasterInfo, check_georeferenced, check_same_grid, open_raster, read_info, read_window
from geobp.sources.locations import file_name, folder_of, join

if TYPE_CHECKING:
    from geobp.data.labels import LabelReport

Severity = Literal["fatal", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scene. ``error`` is the exception to raise for fatal problems."""

    severity: Severity
    message: str
    error: GeobpError | None = None


@dataclass
class SceneReport:
    """What a check found about one scene."""

    name: str
    image: RasterInfo | None = None
    mask: RasterInfo | None = None
    problems: list[Problem] = field(default_factory=list)
    valid_fraction: float | None = None
    labels: list[int] | None = None
    label_report: LabelReport | None = None  # labels aligned from data.labels (see geobp.data.labels)

    @property
    def fatal(self) -> bool:
        """True when the scene cannot be used."""
        return any(p.severity == "fatal" for p in self.problems)


def _guard(report: SceneReport, fn: Callable[[], object]) -> object | None:
    """Run ``fn``; a geobp error becomes a fatal problem of the report."""
    try:
        return fn()
    except GeobpError as err:
        report.problems.append(Problem("fatal", str(err), err))
        return None


def check_headers(
    name: str, image_path: str | Path, mask_path: str | Path | None, require_mask: bool = True,
    headers: Mapping[str, RasterInfo | GeobpError] | None = None,
) -> SceneReport:
    """Header-level checks of one scene (no pixels read); ``headers`` holds headers read before
    (:func:`geobp.data.headers.read_headers`), files missing from it are opened here."""

    def info(path: str | Path) -> RasterInfo:
        found = headers.get(str(path)) if headers is not None else None
        if isinstance(found, GeobpError):
            raise found
        return found if found is not None else read_info(path)

    report = SceneReport(name)
    report.image = _guard(report, lambda: info(image_path))  # type: ignore[assignment]
    if report.image is not None:
        _guard(report, lambda: check_georeferenced(report.image))  # type: ignore[arg-type]
    if mask_path is None:
        if require_mask:
            err = DataNotFoundError(
                format_error(
                    join(folder_of(folder_of(image_path)), "masks/" + file_name(image_path)),
                    f"mask for image {image_path} not found",
                    "add the mask with the same file name, or remove the image",
                )
            )
            report.problems.append(Problem("fatal", str(err), err))
        return report
    report.mask = _guard(report, lambda: info(mask_path))  # type: ignore[assignment]
    if report.mask is not None and report.mask.count != 1:
        err = BandMismatchError(
            format_error(report.mask.path, f"mask must have 1 band (found {report.mask.count})", "write class ids in a single band")
        )
        report.problems.append(Problem("fatal", str(err), err))
    if report.image is not None and report.mask is not None:
        _guard(report, lambda: check_same_grid(report.image, report.mask))  # type: ignore[arg-type]
    if report.image is not None and report.image.nodata is None:
        report.problems.append(
            Problem("warning", format_error(report.image.path, "no nodata value declared", "set data.nodata if the scene has missing pixels"))
        )
    return report


def check_consistency(reports: Iterable[SceneReport]) -> None:
    """Flag scenes whose band count or dtype differs from the first readable scene."""
    first: RasterInfo | None = None
    for r in reports:
        if r.image is None:
            continue
        if first is None:
            first = r.image
            continue
        if (r.image.count, r.image.dtype) != (first.count, first.dtype):
            err = BandMismatchError(
                format_error(
                    r.image.path,
                    f"band count/dtype differs from {first.path} (expected {first.count} x {first.dtype}, "
                    f"found {r.image.count} x {r.image.dtype})",
                    "give every scene the same bands in the same order and dtype",
                )
            )
            r.problems.append(Problem("fatal", str(err), err))


def scan_pixels(report: SceneReport, num_classes: int | None, ignore_index: int, nodata: float | None, chunk_rows: int = 512) -> None:
    """Read every block of the scene: decode errors, NaN, nodata share and mask labels."""
    image = report.image
    if image is None:
        return
    nodata = image.nodata if nodata is None else nodata
    valid_count, nan_count, labels = 0, 0, set[int]()
    try:
        with open_raster(image.path) as src:
            for row in range(0, image.height, chunk_rows):
                data = read_window(src, Window(0, row, image.width, min(chunk_rows, image.height - row)))
                if np.issubdtype(data.dtype, np.floating):
                    nan_count += int(np.isnan(data).any(axis=0).sum())
                valid_count += int(valid_pixels(data, nodata).sum())
        if report.mask is not None:
            with open_raster(report.mask.path) as src:
                for row in range(0, image.height, chunk_rows):
                    m = read_window(src, Window(0, row, image.width, min(chunk_rows, image.height - row)), 1)
                    labels.update(np.unique(m).tolist())
    except GeobpError as err:
        report.problems.append(Problem("fatal", str(err), err))
        return
    total = image.width * image.height
    report.valid_fraction = valid_count / total if total else 0.0
    report.labels = sorted(labels) if report.mask is not None else None
    if nan_count:
        report.problems.append(
            Problem("warning", format_error(image.path, f"{nan_count} pixels are NaN", "they are treated as nodata; fill them if they should be data"))
        )
    if valid_count == 0:
        report.problems.append(
            Problem(
                "warning",
                format_error(image.path, f"every pixel is nodata (nodata = {nodata})", "remove the scene, or fix its nodata value"),
            )
        )
    if num_classes is not None and report.labels is not None:
        values = np.asarray(report.labels, dtype=np.int64)
        bad = values[invalid_labels(values, num_classes, ignore_index)].tolist()
        if bad:
            err = LabelError(
                format_error(
                    report.mask.path if report.mask else None,
                    f"mask values {bad[:5]} are outside the {num_classes} classes and the ignore index {ignore_index}",
                    "set num_classes to cover every label, or recode those pixels to the ignore index",
                )
            )
            report.problems.append(Problem("fatal", str(err), err))

