"""What the diagnosis works with: thresholds, findings, and reading the document's numbers.

The bottom of the diagnosis: :mod:`geobp.callbacks.rules` (the rule registry),
:mod:`geobp.callbacks.diagnosis` (the gradient rules and
:func:`~geobp.callbacks.diagnosis.diagnose`) and :mod:`geobp.callbacks.update_rules` (the
optimizer-step rules) build on it. The order of the kinds and the figure of each are declared
with the rules (:mod:`geobp.callbacks.rules`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from geobp.bands import default_band_name
from geobp.errors import ConfigError, format_error

#: The kinds of the built-in rules (a registered rule may add others: a finding's kind is a str).
FindingKind = Literal["vanishing", "exploding", "nonfinite", "dead_branch", "dead_band", "band_scale", "stalled",
                      "unstable_updates", "loss_scale"]


class GradientFlowWarning(UserWarning):
    """Category of the warnings issued for findings while training runs (filterable)."""


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the diagnosis rules (defaults suit ResNet/U-Net segmentation models).

    Attributes:
        vanishing_ratio: vanishing when the early layers' per-element RMS gradient is below this
            fraction of the head's (:func:`~geobp.callbacks.diagnosis.early_head_ratios`).
            Healthy ResNet U-Nets sit around 0.1 to 10; a 10-layer sigmoid MLP near 1e-9.
        exploding_norm: exploding when the total gradient norm stays above this.
        exploding_growth: exploding when the total norm stays above this multiple of its median
            over the first ``min_recordings`` recordings.
        clip_fraction: exploding when more than this fraction of steps is clipped.
        dead_branch_ratio: dead when a path carries less than this fraction of the gradient of
            the other path of its skip (residual branch vs shortcut; U-Net skip vs deeper path,
            either way round).
        dead_band_ratio: dead when an input band's gradient is below this fraction of the
            median band's.
        band_scale_ratio: mis-scaled when an input band's gradient is above this multiple of
            the median of the other bands'.
        stalled_ratio: stalled when a layer that receives a gradient changes by less than this
            fraction of its weight norm in an optimizer step (update ratio ``||dw|| / ||w||``;
            about 1e-3 is the classic healthy value), over at least a tenth of the run.
        unstable_update_ratio: unstable when the median layer's update ratio is above this.
        min_loss_scale: under fp16 with a loss scaler, non-finite steps are expected while the
            scale calibrates; they become a finding once the scale falls below this (or when
            the loss itself is non-finite).
        skip_fraction: ``loss_scale`` when the scale is below ``min_loss_scale`` and more than
            this fraction of the steps since the previous recording were skipped.
        extreme_input: a band of a tile is named as extreme in a non-finite finding when its
            largest absolute normalised value is above this.
        persist: fraction of recordings, from its start, in which a condition must hold.
        min_recordings: fewest recordings in which a condition must hold.
        extra: values of the thresholds that registered rules declare beyond these fields
            (:func:`geobp.callbacks.rules.threshold`), by name; a rule's default where absent.

    Raises:
        ConfigError: a value is out of its range (the message names the key and the range).
    """

    vanishing_ratio: float = 1e-4
    exploding_norm: float = 1e4
    exploding_growth: float = 1e3
    clip_fraction: float = 0.5
    dead_branch_ratio: float = 1e-3
    dead_band_ratio: float = 1e-3
    band_scale_ratio: float = 100.0
    stalled_ratio: float = 1e-6
    unstable_update_ratio: float = 0.1
    min_loss_scale: float = 1.0
    skip_fraction: float = 0.5
    extreme_input: float = 100.0
    persist: float = 0.8
    min_recordings: int = 3
    extra: dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        fractions = ("clip_fraction", "persist", "skip_fraction")
        if not isinstance(self.extra, Mapping):
            raise ConfigError(format_error(
                None, f"gradflow.thresholds.extra must be a mapping of threshold names to numbers (found {self.extra!r})",
                "set gradflow.thresholds.extra to {name: value}, or leave it out"))
        object.__setattr__(self, "extra", dict(self.extra))
        for name, value in self.extra.items():
            if not (_is_number(value) and 0 < value < math.inf):
                raise ConfigError(format_error(
                    None, f"gradflow.thresholds.extra.{name} must be a finite number > 0 (found {value!r})",
                    f"set gradflow.thresholds.extra.{name} to a finite number > 0, or remove it for the rule's default"))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if f.name == "min_recordings":
                ok, valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1"
            elif f.name in fractions:
                ok, valid = _is_number(value) and 0 < value <= 1, "a number in (0, 1]"
            else:
                ok, valid = _is_number(value) and 0 < value < math.inf, "a finite number > 0"
            if not ok:
                raise ConfigError(format_error(
                    None, f"gradflow.thresholds.{f.name} must be {valid} (found {value!r})",
                    f"set gradflow.thresholds.{f.name} to {valid}, e.g. its default {f.default!r}"))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: the kind of its rule (:mod:`geobp.callbacks.rules`): ``vanishing``, ``exploding``,
            ``nonfinite``, ``dead_branch``, ``dead_band``, ``band_scale``, ``stalled``,
            ``unstable_updates``, ``loss_scale``, or a registered rule's.
        where: the layer, skip (``<module> <path>``) or band (``<band name> (<conv>)``) concerned.
        step: first optimizer step at which it was seen.
        value: the measured quantity (a ratio, a norm, a fraction or a count; see ``message``).
        message: one line saying what was measured.
        fix: one line saying what to try.
    """

    kind: str
    where: str
    step: int
    value: float
    message: str
    fix: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (non-finite ``value`` as a string)."""
        out = asdict(self)
        out["value"] = encode_float(self.value)
        return out


def encode_float(x: float | None) -> float | str | None:
    """A float for JSON: non-finite values become ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_float(x: Any) -> float:
    """Inverse of :func:`encode_float`; None becomes NaN."""
    if x is None:
        return math.nan
    return float(x)


def as_array(rows: Sequence[Any] | None) -> np.ndarray:
    """A list (or list of lists) of JSON numbers, None and non-finite strings as a float64 array.

    None becomes NaN; a None standing for a whole row (e.g. no band gradient at a recording)
    becomes a row of NaN.
    """
    if not rows:
        return np.zeros((0,))
    try:
        return np.array(rows, dtype=np.float64)  # numpy parses "nan"/"inf" and maps None to NaN
    except ValueError:
        width = max((len(r) for r in rows if isinstance(r, (list, tuple))), default=0)
        return np.array([r if isinstance(r, (list, tuple)) else [None] * width for r in rows], dtype=np.float64)


def persistent_start(flags: np.ndarray, t: Thresholds) -> int | None:
    """Index of the first recording from which ``flags`` persist (see module doc), or None."""
    flags = np.asarray(flags, dtype=bool)
    n = len(flags)
    if n == 0:
        return None
    counts = np.cumsum(flags[::-1])[::-1]  # number of True from i on
    lengths = np.arange(n, 0, -1)
    ok = flags & (counts >= t.min_recordings) & (counts >= t.persist * lengths)
    hits = np.flatnonzero(ok)
    return int(hits[0]) if len(hits) else None


def default_band_names(count: int) -> list[str]:
    """``band_1`` .. ``band_<count>``: the names of bands whose files carry none."""
    return [default_band_name(b + 1) for b in range(count)]


def band_names(data: Mapping[str, Any]) -> list[str]:
    """The names of the document's input bands (``bands.names``, else :func:`default_band_names`)."""
    bands = data.get("bands") or {}
    norms = as_array(bands.get("norm"))
    names = [str(n) for n in bands.get("names") or []]
    count = norms.shape[1] if norms.ndim == 2 else len(names)
    return names if len(names) == count else default_band_names(count)
