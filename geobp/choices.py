"""The choices of geobp's options, as ``Literal`` types, in a module that imports nothing heavy.

The command line builds its parsers (and ``--help``) from these without importing torch; the
modules that act on the values (:mod:`geobp.inference.predict`, :mod:`geobp.inference.outputs`,
:mod:`geobp.data.synth`) take the same types, so one spelling serves both.
"""

from __future__ import annotations

from typing import Literal

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
#: What inference writes besides the class map.
Probabilities = Literal["none", "probs", "confidence"]
#: Data types of synthetic scenes (``geobp synth --dtype``).
SynthDType = Literal["uint8", "uint16", "int16", "float32"]
