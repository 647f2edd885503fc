"""The choices of inference as ``Literal`` types, torch-free, so that the CLI can offer them without importing torch.

Each type is the single list of valid values: :class:`~geobp.inference.predict.PredictOptions`
checks its fields against them and the CLI builds its ``choices`` from them (``typing.get_args``).
"""

from __future__ import annotations

from typing import Literal, get_args

from geobp.errors import ConfigError, format_error

#: Numeric precision of the forward pass, as Lightning's ``trainer.precision`` names it.
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
#: Earlier spellings of :data:`Precision`, still accepted.
PRECISION_ALIASES: dict[str, Precision] = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
#: How the model's bands are found in a raster: by band description, or by training band number.
MatchBands = Literal["names", "order"]
#: How the input is read: ``threads`` (:class:`~geobp.inference.reader.PrefetchReader`) or
#: ``processes`` (:class:`~geobp.inference.procreader.ProcessReader`).
Reader = Literal["threads", "processes"]
#: Where tiles are normalised: in the ``reader`` (threads or processes), or on the model's ``device``.
NormalizeOn = Literal["reader", "device"]
#: The output written beside the class map: none, per-class probabilities, or the top-class
#: confidence. Each name other than ``none`` is a sink of :data:`geobp.inference.sinks.SINKS`.
Probabilities = Literal["none", "probs", "confidence"]


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
