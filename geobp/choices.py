"""The choices of geobp's options, as ``Literal`` types, in a module that imports nothing heavy.

The command line builds its parsers (and ``--help``) from these without importing torch; the
modules that act on the values (:mod:`geobp.inference.predict`, :mod:`geobp.inference.outputs`,
:mod:`geobp.data.synth`) take the same types, so one spelling serves both.
"""

from __future__ import annotations

from typing import Literal, get_args

from geobp.errors import ConfigError, format_error

#: Inference arithmetic, spelled as ``trainer.precision``.
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
#: Short spellings of :data:`Precision` that ``geobp infer --precision`` also accepts.
PRECISION_ALIASES: dict[str, Precision] = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
#: How inference finds the model's bands in a raster: by band description, or by band number.
MatchBands = Literal["names", "order"]
#: Where inference reads and decodes its input: worker processes or threads of this process.
Reader = Literal["threads", "processes"]
#: Where inference normalises the tiles to float32: in the readers, or on the model's device.
NormalizeOn = Literal["reader", "device"]
#: What inference writes besides the class map: none, per-class probabilities, the top-class
#: confidence, or the predictive entropy. Each name other than ``none`` is a sink of
#: :data:`geobp.inference.sinks.SINKS`.
Probabilities = Literal["none", "probs", "confidence", "entropy"]
#: Test-time augmentation of inference: none, the four flips, or the eight flips and quarter turns
#: (the dihedral group D4) of each tile, whose class probabilities are averaged
#: (:mod:`geobp.inference.tta`).
TTA = Literal["none", "flips", "d4"]
#: Vector formats of the polygons (``geobp vectorize``, ``geobp infer --vector``): GeoPackage,
#: FlatGeobuf, GeoJSON, GeoParquet.
VectorFormat = Literal["gpkg", "fgb", "geojson", "parquet"]
#: Formats of ``geobp export``: an ONNX graph (ONNX Runtime) or a TorchScript module (``torch.jit.load``).
ExportFormat = Literal["onnx", "torchscript"]
#: Data types of synthetic scenes (``geobp synth --dtype``).
SynthDType = Literal["uint8", "uint16", "int16", "float32"]


def normalize_precision(precision: str) -> Precision:
    """Lightning's precision name for ``precision`` (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed`` ...).

    Raises:
        ConfigError: not a precision inference runs in.
    """
    valid = get_args(Precision)
    if precision in valid:
        return precision  # type: ignore[return-value]
    if precision in PRECISION_ALIASES:
        return PRECISION_ALIASES[precision]
    raise ConfigError(format_error(None, f"unknown precision {precision!r} (expected {', '.join(valid)})", "pick one of them"))


def check_choice(name: str, value: object, choices: object) -> None:
    """Refuse ``value`` unless it is one of the ``Literal`` type ``choices``.

    Raises:
        ConfigError: naming the option, the value and the valid ones.
    """
    valid = [str(v) for v in get_args(choices)]
    if value not in valid:
        expected = valid[0] if len(valid) == 1 else f"{', '.join(valid[:-1])} or {valid[-1]}"
        raise ConfigError(format_error(None, f"unknown {name} {value!r} (expected {expected})", "pick one of them"))
