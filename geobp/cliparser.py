"""The argument parser of ``geobp fit|validate|test``: LightningCLI's, with errors a user can read.

jsonargparse answers a mistyped option with the usage of every option (over a hundred lines for
``fit``) above the one line that says what was wrong. Here the usage is one line, and an unknown
option gets the closest known names, or else the options of its section.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import IO, Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

_UNKNOWN = re.compile(r"(?:option|key)s? '([\w.\-]+)'|unrecognized arguments: --([\w.\-]+)")


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


class GeobpArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage on errors and suggestions for unknown options."""

    def print_usage(self, file: IO[str] | None = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config CONFIG.yaml] [--SECTION.OPTION VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        found = _UNKNOWN.search(message)
        options = known_options(parser)
        name = (found.group(1) or found.group(2)) if found else None
        hint = suggest(name, options) if name and name not in options else ""  # a known option's bad value: no hint
        if hint and "Did you mean" not in message:
            message = message.rstrip() + ("" if message.rstrip().endswith((".", "?")) else ".") + hint
        super().error(message, ex)
