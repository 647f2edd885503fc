"""What every verb of the command line shares: the console, one-line errors, option parsing helpers.

Nothing here imports torch or Lightning, so that ``geobp --help`` and ``geobp VERB --help`` stay
fast; the verbs import what their work needs when they run.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import warnings
from typing import Any

from rich.console import Console

#: Messages and tables for the user go to stderr; results (tables a script may read) to stdout.
console = Console(stderr=True)

#: Warnings raised inside the libraries about their own internals, which a geobp user cannot act
#: on: (message regex, why it is silenced).
LIBRARY_WARNINGS: tuple[tuple[str, str], ...] = (
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning 2.6's pytree helper on torch >= 2.10, at every checkpoint restore"),
    (r"LightningCLI's args parameter is intended to run from within Python",
     "geobp's one main(argv) always hands LightningCLI its arguments, also from the console script"),
)

#: Lightning's info-level advertisements (the start of the message), dropped from its loggers.
LIBRARY_TIPS: tuple[str, ...] = ("💡 Tip:",)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_utilities.core.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIBRARY_TIPS)


def quiet_library_warnings() -> None:
    """Silence :data:`LIBRARY_WARNINGS` and :data:`LIBRARY_TIPS` (only those: every other warning still shows)."""
    for message, _why in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def error_line(err: BaseException) -> str:
    """One readable line for a geobp error, also when it was re-raised from a DataLoader worker."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("geobp.errors.") else last
    return text


def print_error(text: str) -> None:
    """Print ``error: TEXT`` on stderr, as one (soft-wrapped) line."""
    console.print(f"[bold red]error:[/bold red] {text}", highlight=False, soft_wrap=True)


def yaml_mapping(text: str) -> dict[Any, int]:
    """An argparse ``type``: a YAML/JSON mapping such as ``'{-1: 255}'``.

    Raises:
        argparse.ArgumentTypeError: the text is not a mapping.
    """
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{-1: 255}}', found {text!r}")
    return value


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--section.option`` the parser takes, without the leading dashes."""
    return sorted({s.lstrip("-") for a in parser._actions for s in a.option_strings
                   if s.startswith("--") and "+" not in s})  # `--x+` appends to a list option x


def suggest(name: str, options: list[str]) -> str:
    """`` Did you mean --x?`` for the closest options to ``name``, else the options of its section, or ``""``."""
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.75)
    if close:
        return " Did you mean " + " or ".join(f"--{c}" for c in close) + "?"
    section, _, leaf = name.rpartition(".")
    if not section:
        return ""
    siblings = [o[len(section) + 1:] for o in options if o.startswith(section + ".") and "." not in o[len(section) + 1:]]
    near = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)
    if near:
        return " Did you mean " + " or ".join(f"--{section}.{c}" for c in near) + "?"
    if siblings:
        return f" The options of {section} are: {', '.join(siblings)}."
    return ""


def wants_help(argv: list[str] | tuple[str, ...]) -> bool:
    """True when the arguments ask for the help page (``-h`` or ``--help`` anywhere)."""
    return any(arg in ("-h", "--help") for arg in argv)
