"""Outputs of inference: the sink interface, the GeoTIFF outputs, and the table of outputs by name.

**To add an output format**, write one class here that implements :class:`OutputSink` and add it
to :data:`SINKS` under its name (the name also goes into
:data:`geobp.choices.Probabilities`, where the command line finds its choices; a test
checks that the two agree). Nothing else changes: the streaming writer, the distributed part
files (:mod:`geobp.inference.parts`) and the atomic, all-or-nothing writes serve every sink.

How a sink is driven, for one raster (:func:`geobp.inference.predict.predict_raster`):

1. it is made by its :data:`SINKS` entry from its final path and the :class:`PredictOptions`;
2. once the model's first batch tells the number of classes, :meth:`OutputSink.open` gets the
   :class:`OutputLayout` (the input's profile and the class names), in the writer thread;
3. for each finished cell of the blended prediction, :meth:`OutputSink.encode` turns the
   probabilities into the sink's own uint8 bands: numpy arrays on the CPU, torch tensors on the
   model's device (so only uint8 data leaves a GPU);
4. :meth:`OutputSink.write` gets the encoded bands of full-width row blocks, top to bottom, each
   pixel exactly once;
5. :meth:`OutputSink.commit` makes the output appear under its final name (it raises when rows
   are missing), or :meth:`OutputSink.abort` leaves nothing behind.

The outputs of one input raster ``<stem>.tif`` (``<stem>_classes.tif`` is the class map ``dst``):

- ``classes`` (always): uint8 class ids, nodata pixels set to ``nodata_value`` (255) with a
  nodata tag, a colour table, class names in the ``CLASS_NAMES`` tag (comma separated) and
  ``NUM_CLASSES``.
- ``probs`` (``probabilities="probs"``, ``<stem>_probs.tif``): one uint8 band per class,
  probability times 255 rounded (band scale 1/255; a pixel's bands sum to 255 up to rounding),
  band descriptions are the class names; nodata pixels are 0 in every band and masked by an
  internal mask band.
- ``confidence`` (``probabilities="confidence"``, ``<stem>_confidence.tif``): one uint8 band,
  the highest class probability times 255, masked like the probabilities.
- ``entropy`` (``probabilities="entropy"``, ``<stem>_entropy.tif``): one uint8 band, the
  predictive entropy of each pixel's class distribution divided by its largest value, log(K),
  times 254 rounded (band scale 1/254: 0 is one class with probability 1, 254 all K classes
  equally likely); nodata pixels are 255, the file's nodata value (a tag, not a mask: 0 is a
  meaningful value here, and a reader that ignores masks still sees 255 as no value). The
  value 255 is the entropy file's own, whatever the class map's ``nodata_value``.

All have the input's CRS, transform and size, are tiled (256 x 256) and deflate-compressed,
and are Cloud Optimized GeoTIFFs on request.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geobp.errors import OutputExistsError, format_error
from geobp.choices import Probabilities
from geobp.inference.options import PredictOptions
from geobp.inference.outputs import CLASSES_SUFFIX, atomic_output, aux_profile, classes_profile, colour_table

#: A numpy array or a torch tensor (on any device): what :meth:`OutputSink.encode` takes and returns.
Array = Any


@dataclass(frozen=True)
class OutputLayout:
    """What the outputs of one raster are laid out by, known once the model has run one batch.

    Attributes:
        profile: the input raster's rasterio profile (size, CRS, transform): the outputs' grid.
        class_names: one name per class id.
    """

    profile: dict[str, Any]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """K, the classes the model predicts."""
        return len(self.class_names)

    @property
    def height(self) -> int:
        """Rows of the raster."""
        return int(self.profile["height"])

    @property
    def width(self) -> int:
        """Columns of the raster."""
        return int(self.profile["width"])


@runtime_checkable
class OutputSink(Protocol):
    """One output of a predicted raster, written in full-width row blocks from top to bottom.

    Attributes:
        path: the file the output ends up in (checked before any work: it must not be the input,
            nor exist unless ``overwrite``).
    """

    path: Path

    def bands(self, layout: OutputLayout) -> int:
        """How many uint8 bands :meth:`encode` returns for ``layout``."""
        ...

    def open(self, layout: OutputLayout) -> None:
        """Get ready to take blocks (e.g. create a temporary file); called once, before any write."""
        ...

    def encode(self, probs: Array, valid: Array) -> Array:
        """This output's uint8 bands of a finished cell of the blended prediction.

        Args:
            probs: float32 [K, h, w] class probabilities (numpy, or torch on the model's device);
                the sink must not modify it (the other sinks encode the same cell).
            valid: bool [h, w], False at the input's nodata pixels; of the same kind.

        Returns:
            uint8 [:meth:`bands`, h, w], of the same kind as ``probs``.
        """
        ...

    def write(self, row: int, block: np.ndarray) -> None:
        """Take the encoded bands (uint8 [bands, rows, width], numpy) of rows ``row`` onwards.

        Blocks come in row order, each row once. The block may be a view of a larger array: copy
        what is kept after returning.
        """
        ...

    def commit(self) -> None:
        """Finish the output and make it appear under :attr:`path`, whole, or raise and leave nothing.

        Raises:
            RuntimeError: rows are missing (the output is discarded).
        """
        ...

    def abort(self) -> None:
        """Discard the output (nothing of it is left); safe to call at any point, and twice."""
        ...


# ----- encoding, the same on numpy arrays and torch tensors -----------------------------------


def class_ids(probs: Array, valid: Array, nodata_value: int) -> Array:
    """uint8 [1, h, w]: the most probable class, ``nodata_value`` where not ``valid``."""
    if isinstance(probs, torch.Tensor):
        return probs.argmax(dim=0).to(torch.uint8).masked_fill_(~valid, nodata_value)[None]
    ids = probs.argmax(axis=0).astype(np.uint8)
    ids[~valid] = nodata_value
    return ids[None]


def scaled(values: Array, valid: Array) -> Array:
    """uint8 [n, h, w]: ``values`` (float [n, h, w] in 0..1) times 255, rounded half to even, 0 where not ``valid``."""
    if isinstance(values, torch.Tensor):
        return (values * 255.0).round_().clamp_(0, 255).to(torch.uint8).masked_fill_(~valid, 0)
    out = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    out[:, ~valid] = 0
    return out


def mask_band(valid: Array) -> Array:
    """uint8 [1, h, w]: 255 where ``valid``, 0 elsewhere (a GeoTIFF's internal mask)."""
    if isinstance(valid, torch.Tensor):
        return valid.to(torch.uint8).mul_(255)[None]
    return np.where(valid, 255, 0).astype(np.uint8)[None]


def top_probability(probs: Array) -> Array:
    """float [1, h, w]: the highest class probability of each pixel."""
    if isinstance(probs, torch.Tensor):
        return probs.amax(dim=0, keepdim=True)
    return probs.max(axis=0, keepdims=True)


def normalized_entropy(probs: Array) -> Array:
    """float [1, h, w] in 0..1: each pixel's entropy ``-sum p log p`` over the K classes divided by
    log(K), its largest value (0 for a one-hot distribution, 1 for the uniform one; 0 when K is 1)."""
    k = probs.shape[0]
    scale = 1.0 / math.log(k) if k > 1 else 0.0
    if isinstance(probs, torch.Tensor):
        return torch.special.xlogy(probs, probs).sum(dim=0, keepdim=True).mul_(-scale).clamp_(0.0, 1.0)
    positive = probs > 0
    plogp = np.where(positive, probs * np.log(np.where(positive, probs, 1.0)), 0.0)
    return np.clip(plogp.sum(axis=0, keepdims=True) * -scale, 0.0, 1.0).astype(np.float32)


# ----- GeoTIFF outputs ------------------------------------------------------------------------


class BlockRows:
    """Holds row blocks back until whole block rows of a tiled file can be written, so that no
    compressed block is written twice.

    Holds fewer than ``block_height`` rows plus one block (uint8).
    """

    def __init__(self, block_height: int, height: int) -> None:
        self.block_height = block_height
        self.height = height
        self._pending: list[np.ndarray] = []
        self._row = 0  # first row not yet handed out
        self._pending_rows = 0
        self.peak_pending_rows = 0

    def add(self, row: int, block: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Queue ``block`` (rows ``row`` onwards); return ``(row, data)`` of the whole block rows now ready (none or one).

        Raises:
            RuntimeError: the block does not start where the last one ended.
        """
        if row != self._row + self._pending_rows:
            raise RuntimeError(f"strips out of order: expected row {self._row + self._pending_rows}, got {row}")
        self._pending.append(block)
        self._pending_rows += block.shape[1]
        self.peak_pending_rows = max(self.peak_pending_rows, self._pending_rows)
        last = self._row + self._pending_rows == self.height
        ready = self._pending_rows if last else self._pending_rows // self.block_height * self.block_height
        if ready:
            data = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=1)
            rest = data[:, ready:]
            self._pending = [rest.copy()] if rest.shape[1] else []
            start, self._row = self._row, self._row + ready
            self._pending_rows -= ready
            return [(start, data[:, :ready])]
        return []

    @property
    def complete(self) -> bool:
        """True when every row of the file has been handed out."""
        return self._row == self.height and not self._pending_rows


class GeoTiffSink:
    """Base of the GeoTIFF outputs: a temporary file written in whole block rows, renamed (or made
    a COG) on :meth:`commit`. A subclass gives :meth:`bands`, :meth:`encode`, :meth:`profile` and
    :meth:`describe`, and :meth:`write_rows` when it writes more than the bands (a mask).

    Args:
        path: the final file.
        options: the prediction options (``cog``, ``nodata_value``).
    """

    def __init__(self, path: str | Path, options: PredictOptions) -> None:
        self.path = Path(path)
        self.cog = options.cog
        self.nodata_value = options.nodata_value
        self.dataset: Any = None
        self.rows: BlockRows | None = None
        self._atomic: contextlib.AbstractContextManager[Path] | None = None

    def bands(self, layout: OutputLayout) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def encode(self, probs: Array, valid: Array) -> Array:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def profile(self, layout: OutputLayout) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        """The file's rasterio profile, derived from ``layout.profile``."""
        raise NotImplementedError

    def describe(self, dataset: Any, layout: OutputLayout) -> None:
        """Set the open file's tags, band descriptions and colours (nothing by default)."""

    def open(self, layout: OutputLayout) -> None:
        """Create the temporary file (beside :attr:`path`) with :meth:`profile` and :meth:`describe` it."""
        atomic = atomic_output(self.path, self.cog)
        tmp = atomic.__enter__()
        self._atomic = atomic
        try:
            self.dataset = rasterio.open(tmp, "w", **self.profile(layout))
            self.describe(self.dataset, layout)
        except BaseException:
            self.abort()
            raise
        self.rows = BlockRows(self.dataset.block_shapes[0][0], self.dataset.height)

    def write(self, row: int, block: np.ndarray) -> None:
        """Queue ``block`` and write the whole block rows it completes (:meth:`write_rows`)."""
        assert self.rows is not None, "open() first"
        for start, data in self.rows.add(row, block):
            self.write_rows(Window(0, start, self.dataset.width, data.shape[1]), data)

    def write_rows(self, window: Window, data: np.ndarray) -> None:
        """Write the encoded bands of ``window`` (whole block rows) to the file."""
        self.dataset.write(data, window=window)

    def commit(self) -> None:
        """Close the file and move it (as a COG when asked) to :attr:`path`.

        Raises:
            RuntimeError: rows are missing; nothing is written.
        """
        if self.rows is None or not self.rows.complete:
            self.abort()
            raise RuntimeError(f"{self.path}: prediction ended before every row was written")
        try:
            self.dataset.close()
            self.dataset = None
        except BaseException:
            self.abort()
            raise
        atomic, self._atomic = self._atomic, None
        assert atomic is not None
        atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if self.dataset is not None:
            with contextlib.suppress(Exception):
                self.dataset.close()
            self.dataset = None
        atomic, self._atomic = self._atomic, None
        if atomic is not None:
            # the exception makes atomic_output delete its temporary files instead of renaming them
            atomic.__exit__(_Aborted, _Aborted(), None)


class _Aborted(Exception):
    """Raised into :func:`~geobp.inference.outputs.atomic_output` to discard an unfinished output."""


class ClassMapSink(GeoTiffSink):
    """The class map: uint8 class ids, ``nodata_value`` at nodata pixels, a colour table and the class names."""

    def bands(self, layout: OutputLayout) -> int:
        return 1

    def encode(self, probs: Array, valid: Array) -> Array:
        return class_ids(probs, valid, self.nodata_value)

    def profile(self, layout: OutputLayout) -> dict[str, Any]:
        return classes_profile(layout.profile, self.nodata_value)

    def describe(self, dataset: Any, layout: OutputLayout) -> None:
        names = layout.class_names
        dataset.write_colormap(1, colour_table(len(names), names, self.nodata_value))
        dataset.set_band_description(1, "class")
        dataset.update_tags(CLASS_NAMES=",".join(names), NUM_CLASSES=str(len(names)), NODATA_VALUE=str(self.nodata_value))


class ProbabilitiesSink(GeoTiffSink):
    """Per-class probabilities: one uint8 band per class (value / 255 = probability), masked at nodata.

    :meth:`encode` returns the class bands and then the mask, which :meth:`write_rows` writes as
    the file's internal mask.
    """

    def bands(self, layout: OutputLayout) -> int:
        return self.file_bands(layout) + 1

    def file_bands(self, layout: OutputLayout) -> int:
        """Bands of the file (without the mask)."""
        return layout.num_classes

    def band_names(self, layout: OutputLayout) -> list[str]:
        """The file's band descriptions."""
        return list(layout.class_names)

    def values(self, probs: Array) -> Array:
        """float [file bands, h, w] in 0..1: what the bands hold."""
        return probs

    def encode(self, probs: Array, valid: Array) -> Array:
        data, mask = scaled(self.values(probs), valid), mask_band(valid)
        if isinstance(data, torch.Tensor):
            return torch.cat([data, mask])
        return np.concatenate([data, mask])

    def profile(self, layout: OutputLayout) -> dict[str, Any]:
        return aux_profile(layout.profile, self.file_bands(layout))

    def describe(self, dataset: Any, layout: OutputLayout) -> None:
        for b, name in enumerate(self.band_names(layout), start=1):
            dataset.set_band_description(b, name)
        dataset.scales = (1 / 255,) * self.file_bands(layout)
        dataset.update_tags(CLASS_NAMES=",".join(layout.class_names), NUM_CLASSES=str(layout.num_classes),
                            SCALE="value / 255 = probability")

    def write_rows(self, window: Window, data: np.ndarray) -> None:
        self.dataset.write(data[:-1], window=window)
        self.dataset.write_mask(data[-1], window=window)


class ConfidenceSink(ProbabilitiesSink):
    """The top-class confidence: one uint8 band, the highest class probability times 255, masked at nodata."""

    def file_bands(self, layout: OutputLayout) -> int:
        return 1

    def band_names(self, layout: OutputLayout) -> list[str]:
        return ["confidence"]

    def values(self, probs: Array) -> Array:
        return top_probability(probs)


class EntropySink(GeoTiffSink):
    """The predictive entropy: one uint8 band, entropy / log(K) times 254, 255 (the nodata value) at nodata."""

    #: the file's nodata value; the entropy takes 0..254
    NODATA = 255
    #: the uint8 value of the largest entropy, log(K)
    TOP = 254

    def bands(self, layout: OutputLayout) -> int:
        return 1

    def encode(self, probs: Array, valid: Array) -> Array:
        h = normalized_entropy(probs)
        if isinstance(h, torch.Tensor):
            return h.mul_(self.TOP).round_().to(torch.uint8).masked_fill_(~valid, self.NODATA)
        out = np.rint(h * self.TOP).astype(np.uint8)
        out[:, ~valid] = self.NODATA
        return out

    def profile(self, layout: OutputLayout) -> dict[str, Any]:
        return classes_profile(layout.profile, self.NODATA)  # one uint8 band with a nodata tag, as the class map

    def describe(self, dataset: Any, layout: OutputLayout) -> None:
        dataset.set_band_description(1, "entropy")
        dataset.scales = (1 / self.TOP,)
        dataset.update_tags(CLASS_NAMES=",".join(layout.class_names), NUM_CLASSES=str(layout.num_classes),
                            SCALE=f"value / {self.TOP} = entropy / log({layout.num_classes}) (0: certain, 1: all classes equally likely)",
                            NODATA_VALUE=str(self.NODATA))


# ----- the table of outputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class SinkEntry:
    """A registered output: how its file is named and how its sink is made.

    Attributes:
        suffix: added to the input's stem (``_probs`` makes ``a_probs.tif`` for ``a.tif``).
        make: ``make(final path, options)`` -> the sink.
        extension: the file's extension; the class map's (``.tif``) when None.
    """

    suffix: str
    make: Callable[[Path, PredictOptions], OutputSink]
    extension: str | None = None


#: Every output by name. ``classes`` is always written (at the class map path ``dst``); the
#: others are chosen by name (``PredictOptions.probabilities``, ``geobp infer --probabilities``).
SINKS: dict[str, SinkEntry] = {
    "classes": SinkEntry(CLASSES_SUFFIX, ClassMapSink),
    "probs": SinkEntry("_probs", ProbabilitiesSink),
    "confidence": SinkEntry("_confidence", ConfidenceSink),
    "entropy": SinkEntry("_entropy", EntropySink),
}


def output_names(probabilities: Probabilities) -> list[str]:
    """The outputs written: ``classes``, then ``probabilities`` unless it is ``none``."""
    return ["classes"] if probabilities == "none" else ["classes", probabilities]


def output_paths(dst: str | Path, probabilities: Probabilities = "none") -> dict[str, Path]:
    """Files written for class map ``dst``: ``{"classes": dst}`` plus ``"probs"``, ``"confidence"`` or ``"entropy"``.

    The other files sit beside ``dst``, named after its stem without ``_classes``:
    ``out/a_classes.tif`` gives ``out/a_probs.tif``, ``out/a_confidence.tif`` or ``out/a_entropy.tif``.
    """
    dst = Path(dst)
    stem = dst.stem.removesuffix(CLASSES_SUFFIX)
    paths = {}
    for name in output_names(probabilities):
        entry = SINKS[name]
        paths[name] = dst if name == "classes" else dst.with_name(f"{stem}{entry.suffix}{entry.extension or dst.suffix or '.tif'}")
    return paths


def output_sinks(dst: str | Path, options: PredictOptions) -> list[OutputSink]:
    """The sinks of the outputs of class map ``dst`` that ``options`` asks for (see :func:`output_paths`)."""
    return [SINKS[name].make(path, options) for name, path in output_paths(dst, options.probabilities).items()]


def check_outputs_free(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse to overwrite existing outputs unless asked.

    Raises:
        OutputExistsError: a path exists and ``overwrite`` is False; the message names it.
    """
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise OutputExistsError(
                format_error(path, "output exists", "pass --overwrite (overwrite=True) to replace it, or choose another output folder")
            )
