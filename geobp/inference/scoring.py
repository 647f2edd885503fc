"""Scoring class maps against ground truth: the accuracy assessment of a land-cover map.

The labels come in any form :mod:`geobp.data.labels` accepts (label rasters on other grids, a
land-cover map, a vector file; read as a :class:`~geobp.data.labels.LabelOptions` says) and are
aligned onto each input raster's grid through the same cache as training. The confusion matrix is accumulated in pixel
counts over row strips (one ``numpy.bincount`` per strip, so a raster of any size is scored in
bounded memory); ignored labels and nodata predictions count nowhere. From it: per-class IoU,
F1, precision and recall, and overall accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window
from rich.table import Table

from geobp.atomic import atomic_path
from geobp.data.alignment import aligned_labels
from geobp.data.labels import LabelOptions, LabelReport, find_label_sources
from geobp.errors import ConfigError, format_error
from geobp.raster import check_same_grid, open_raster, read_info, read_window
from geobp.sources.locations import file_name
from geobp.sources.urls import redact

#: Rows per strip when streaming a class map and its labels.
STRIP_ROWS = 1024


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts ``[truth class, predicted class]``; pixels with either value outside the classes count nowhere.

    Args:
        truth: label class ids (ignore index and other values >= ``num_classes`` are skipped).
        pred: predicted class ids (the class map's nodata value is skipped).
        num_classes: K.

    Returns:
        int64 [K, K].
    """
    t, p = truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    return np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU, F1, precision and recall, their means, and overall accuracy (NaN where undefined: 0/0).

    Returns:
        A JSON-ready dict: ``overall_accuracy``, ``mean_iou``, ``mean_f1``, ``pixels``, ``per_class``
        (name -> iou, f1, precision, recall, support) and ``confusion`` (rows: truth, columns: predicted).
    """
    c = confusion.astype(np.float64)
    tp = np.diag(c)
    truth, pred = c.sum(axis=1), c.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + pred - tp)
        precision = tp / pred
        recall = tp / truth
        f1 = 2 * tp / (truth + pred)
        accuracy = tp.sum() / c.sum() if c.sum() else float("nan")

    def num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    present = truth > 0  # means over the classes present in the labels
    return {
        "pixels": int(c.sum()),
        "overall_accuracy": num(float(accuracy)),
        "mean_iou": num(float(np.nanmean(iou[present]))) if present.any() else None,
        "mean_f1": num(float(np.nanmean(f1[present]))) if present.any() else None,
        "per_class": {
            name: {"iou": num(iou[i]), "f1": num(f1[i]), "precision": num(precision[i]), "recall": num(recall[i]),
                   "support": int(truth[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion.astype(int).tolist(),
    }


@dataclass
class RasterScore:
    """The score of one class map."""

    input: str | Path
    class_map: Path
    confusion: np.ndarray
    report: LabelReport


@dataclass
class ScoreSummary:
    """Scores of every class map, their total, and the rasters that could not be scored."""

    class_names: list[str]
    rasters: list[RasterScore] = field(default_factory=list)
    failed: list[tuple[str | Path, str]] = field(default_factory=list)

    @property
    def total(self) -> np.ndarray:
        """The confusion matrix summed over the rasters."""
        k = len(self.class_names)
        return sum((r.confusion for r in self.rasters), np.zeros((k, k), np.int64))

    def to_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` holds (URLs with their signatures redacted)."""
        return {
            "class_names": self.class_names,
            "confusion_axes": "rows: labels (truth), columns: predictions; pixel counts",
            "total": metrics_from_confusion(self.total, self.class_names),
            "rasters": {
                redact(str(r.input)): {"class_map": str(r.class_map), "label_sources": [redact(s) for s in r.report.sources],
                               "label_coverage": r.report.coverage, **metrics_from_confusion(r.confusion, self.class_names)}
                for r in self.rasters
            },
            "failed": {redact(str(p)): redact(msg) for p, msg in self.failed},
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically; returns the path."""
        with atomic_path(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return Path(path)

    def tables(self) -> list[Table]:
        """Rich tables: per-class scores for each raster and in total."""
        out = []
        for title, conf in [(file_name(r.input), r.confusion) for r in self.rasters] + [("total", self.total)]:
            m = metrics_from_confusion(conf, self.class_names)
            table = Table(title=f"{title}: overall accuracy {_fmt(m['overall_accuracy'])}, mean IoU {_fmt(m['mean_iou'])}")
            for col in ("class", "IoU", "F1", "precision", "recall", "pixels"):
                table.add_column(col, justify="left" if col == "class" else "right")
            for name, s in m["per_class"].items():
                table.add_row(name, _fmt(s["iou"]), _fmt(s["f1"]), _fmt(s["precision"]), _fmt(s["recall"]), str(s["support"]))
            out.append(table)
        return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def class_map_classes(path: str | Path) -> list[str]:
    """Class names of a class map written by ``geobp infer`` (its ``CLASS_NAMES`` tag).

    Raises:
        ConfigError: the file has no class names tag.
    """
    with open_raster(path) as src:
        names = src.tags().get("CLASS_NAMES")
    if not names:
        raise ConfigError(format_error(path, "no CLASS_NAMES tag (not a class map written by geobp infer)", "score the outputs of geobp infer"))
    return names.split(",")


def score_raster(class_map: str | Path, labels: str | Path, num_classes: int) -> np.ndarray:
    """Confusion matrix of a class map against a label raster on its grid, streamed in row strips.

    Args:
        class_map: the predicted class ids (its nodata value, >= ``num_classes``, counts nowhere).
        labels: class ids on the same grid (the ignore index, >= ``num_classes``, counts nowhere).
        num_classes: K.

    Returns:
        int64 [K, K] pixel counts, rows labels, columns predictions.

    Raises:
        RasterMismatchError: the two are not on one grid.
    """
    info = read_info(class_map)
    check_same_grid(info, read_info(labels))
    conf = np.zeros((num_classes, num_classes), np.int64)
    with open_raster(class_map) as pred_src, open_raster(labels) as truth_src:
        for row in range(0, info.height, STRIP_ROWS):
            window = Window(0, row, info.width, min(STRIP_ROWS, info.height - row))
            conf += confusion_matrix(read_window(truth_src, window, 1), read_window(pred_src, window, 1), num_classes)
    return conf


def score_predictions(
    pairs: Sequence[tuple[Path, Path]],
    labels: str | Path | Sequence[str | Path],
    options: LabelOptions,
    out_dir: str | Path | None = None,
) -> ScoreSummary:
    """Score class maps against ground truth in any label form; write ``metrics.json`` into ``out_dir``.

    Classes come from the class maps' ``CLASS_NAMES`` tags. Labels are aligned onto each input's
    grid (cached in ``out_dir/.geobp_cache``). A raster whose labels fail (unmapped values, no
    label over it) is reported in ``failed``; the others are still scored.

    Args:
        pairs: (input raster, its class map) per prediction, as in ``InferenceSummary.succeeded``.
        labels: the label sources (folder, glob, list, one map, or a vector file).
        options: how raw labels become class ids (the ``data.label_*`` options); its classes
            must be those of the class maps (:func:`class_map_classes`).
        out_dir: where ``metrics.json`` goes (and the cache); nothing is written when None.

    Returns:
        The :class:`ScoreSummary`.

    Raises:
        ConfigError: no class map to score, class maps with different classes, or ``options``
            for other classes.
        DataNotFoundError: the label sources cannot be found.
    """
    if not pairs:
        raise ConfigError(format_error(None, "no class map to score", "fix the inputs that failed"))
    names = class_map_classes(pairs[0][1])
    if options.num_classes != len(names) or options.class_names not in (None, tuple(names)):
        theirs = list(options.class_names) if options.class_names is not None else f"{options.num_classes} classes"
        raise ConfigError(format_error(pairs[0][1], f"the label options are for other classes (expected {names}, found {theirs})",
                                       "build the LabelOptions from the class maps' classes (class_map_classes)"))
    sources = find_label_sources(labels, options.label_field)
    summary = ScoreSummary(names)
    cache = Path(out_dir) if out_dir is not None else Path(pairs[0][1]).parent
    for src, dst in pairs:
        try:
            if class_map_classes(dst) != names:
                raise ConfigError(format_error(dst, f"classes differ from {pairs[0][1]}", "score class maps of one model together"))
            mask, report = aligned_labels(read_info(src), sources, options, cache)
            if report.coverage == 0:
                raise ConfigError(format_error(src, "no label covers this raster", "check the --labels sources (paths, CRS, extent)"))
            summary.rasters.append(RasterScore(src, Path(dst), score_raster(dst, mask.path, len(names)), report))  # type: ignore[union-attr]
        except (ConfigError, OSError, ValueError) as err:
            summary.failed.append((src, str(err)))
    if out_dir is not None:
        summary.write(Path(out_dir) / "metrics.json")
    return summary
