"""The ``geobp`` command: one :func:`main` for the console script, ``python -m geobp`` and the tests.

Each verb lives in its own module (:mod:`geobp.cli.train` for LightningCLI's ``fit``,
``validate`` and ``test``; :mod:`geobp.cli.infer`, ``vectorize``, ``export``, ``check``, ``synth``, ``demo``, ``report``,
``weights``), imported only when the verb runs, so ``geobp --help`` and ``geobp VERB --help`` do
not import torch. This is the top layer: nothing in geobp imports it.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from geobp.cli.common import console, error_line, print_error, quiet_library_warnings
from geobp.errors import ConfigError, GeobpError, format_error


class Verb(NamedTuple):
    """A verb of the command line: where its code is (``module:function``) and its line on the help page."""

    target: str
    help: str


#: Every verb with its line on the help page (``geobp --help``); LightningCLI's come first.
VERBS: dict[str, Verb] = {
    "fit": Verb("geobp.cli.train:fit", "train a model on GeoTIFF scenes (LightningCLI: --config, --data.*, --model.*, --trainer.*)"),
    "validate": Verb("geobp.cli.train:validate", "score a checkpoint on the validation split (--config, --ckpt_path)"),
    "test": Verb("geobp.cli.train:test", "score a checkpoint on the test split (needs data.test_fraction > 0)"),
    "infer": Verb("geobp.cli.infer:run", "predict whole GeoTIFFs of any size with a checkpoint; writes georeferenced class maps"),
    "vectorize": Verb("geobp.cli.vectorize:run", "polygonize a class map into a GeoPackage, FlatGeobuf, GeoJSON or GeoParquet file"),
    "export": Verb("geobp.cli.export:run", "export a checkpoint as one ONNX or TorchScript file that runs without geobp"),
    "check": Verb("geobp.cli.check:run", "check a dataset before training: readable, georeferenced, labels within the classes"),
    "report": Verb("geobp.cli.report:run", "re-render a run's gradient-flow report from its gradflow.json"),
    "synth": Verb("geobp.cli.synth:run", "write synthetic multi-band land-cover scenes with masks"),
    "demo": Verb("geobp.cli.demo:run", "generate demo scenes and train a small U-Net on the CPU, then print validation IoU"),
    "weights": Verb("geobp.cli.weights:run", "list torchgeo's pretrained ResNet weights model.weights accepts, and which are cached"),
}
#: The verbs LightningCLI runs (their help comes from :mod:`geobp.cli.helpcache`).
LIGHTNING_VERBS: tuple[str, ...] = ("fit", "validate", "test")
#: The verbs geobp parses itself (argparse), each a module with ``build_parser()`` and ``run(argv)``.
COMMANDS: tuple[str, ...] = tuple(v for v in VERBS if v not in LIGHTNING_VERBS)

#: Names that used to live in the one-module CLI, importable from here without importing their modules up front.
_LAZY: dict[str, str] = {
    "GeobpCLI": "geobp.cli.train", "GeobpArgumentParser": "geobp.cli.train", "build_cli": "geobp.cli.train",
    "DEMO_CONFIG": "geobp.cli.demo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def verb_function(verb: str) -> Callable[[Sequence[str]], int]:
    """The function that runs ``verb`` on the arguments after it (imports the verb's module)."""
    module, _, function = VERBS[verb].target.partition(":")
    return getattr(importlib.import_module(module), function)


def help_text() -> str:
    """The top-level help page: every verb with one line."""
    width = max(map(len, VERBS)) + 2
    lines = [
        "usage: geobp VERB [options]     (geobp VERB --help: the verb's options)",
        "",
        "Land-cover segmentation of multi-band GeoTIFFs: train, check data, predict, diagnose.",
        "",
        "verbs:",
        *(f"  {verb:<{width}}{v.help}" for verb, v in VERBS.items()),
        "",
        "Training verbs read a YAML config (--config) and dotted overrides; `geobp fit --print_config`",
        "prints every option with its value.",
    ]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    verb = argv[0]
    if verb in LIGHTNING_VERBS and argv[1:] in (["--help"], ["-h"]):
        from geobp.cli.helpcache import print_help

        return print_help(verb)
    if verb in VERBS:
        return verb_function(verb)(argv[1:])
    if verb == "predict":
        raise ConfigError(format_error(
            None, "`geobp predict` is not a geobp verb (it was Lightning's, and needs a predict dataloader)",
            "use `geobp infer RASTERS --ckpt CKPT --out DIR`, which predicts whole rasters of any size"))
    if not verb.startswith("-"):
        raise ConfigError(format_error(None, f"unknown verb {verb!r}", f"use one of: {', '.join(VERBS)} (geobp --help)"))
    from geobp.cli.train import lightning  # global LightningCLI options before the verb

    return lightning(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``geobp``. Returns the process exit code (0 success, 1 failed work, 2 bad input, 143 stopped by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return 0 if argv else 2
    try:
        return _dispatch(argv)
    except GeobpError as err:
        print_error(error_line(err))
        return 2
    except SystemExit as stop:
        # Lightning stops at a batch boundary with SIGTERMException (a SystemExit(None)), which would
        # exit 0 as if training had finished; CheckpointOnInterrupt has saved last.ckpt by now.
        exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if exceptions is not None and isinstance(stop, exceptions.SIGTERMException):
            return 128 + signal.SIGTERM
        raise


__all__ = ["COMMANDS", "LIGHTNING_VERBS", "VERBS", "Verb", "console", "help_text", "main", "quiet_library_warnings",
           "verb_function"]
