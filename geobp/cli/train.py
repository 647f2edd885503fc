"""``geobp fit``, ``validate`` and ``test``: Lightning's CLI with geobp's links, callbacks and errors.

This module imports Lightning and torch; ``geobp fit --help`` is answered from a cache
(:mod:`geobp.cli.helpcache`) without importing it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from geobp.callbacks.classreport import ClassFrequencyReport
from geobp.callbacks.gradflow import GradientFlowMonitor
from geobp.callbacks.interrupt import CheckpointOnInterrupt
from geobp.cli.common import known_options, suggest
from geobp.data.datamodule import PATH_OPTIONS, GeoTiffDataModule
from geobp.sources.locations import redacted
from geobp.task import SegmentationTask

_UNKNOWN = re.compile(r"(?:option|key)s? '([\w.\-]+)'|unrecognized arguments: --([\w.\-]+)")


class RedactedSaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` of the run, with the signatures of signed URLs in ``data.root``,
    ``data.images`` and ``data.labels`` redacted (the run itself reads the real ones)."""

    def __init__(self, parser: LightningArgumentParser, config: Any, *args: Any, **kwargs: Any) -> None:
        config = config.clone()
        for name in PATH_OPTIONS:
            key = f"data.{name}"
            if config.get(key) is not None:
                config[key] = redacted(config[key])
        super().__init__(parser, config, *args, **kwargs)


class GeobpArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage on errors and suggestions for unknown options.

    jsonargparse answers a mistyped option with the usage of every option (over a hundred lines
    for ``fit``) above the one line that says what was wrong. Here the usage is one line, and an
    unknown option gets the closest known names, or else the options of its section.
    """

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


class GeobpCLI(LightningCLI):
    """LightningCLI with geobp's links: the data decides the model's bands, classes and preprocessing.

    Always-on callbacks: ``checkpoint`` (best ``val/mIoU`` and the last state), ``gradflow``
    (:class:`GradientFlowMonitor`: the gradient-flow report of every run), each configurable under
    its key, and :class:`CheckpointOnInterrupt` (Ctrl-C or SIGTERM saves ``last.ckpt``).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; Lightning's ``predict`` is left out: `geobp infer` predicts whole rasters."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GradientFlowMonitor, "gradflow")
        parser.add_lightning_class_args(ClassFrequencyReport, "class_report")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-mIoU{val/mIoU:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.ignore_index", "model.ignore_index")
        parser.link_arguments("data.tile_size", "model.tile_size")
        parser.link_arguments("data.class_names", "model.class_names")
        parser.link_arguments("data.num_bands", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.band_names", "model.in_band_names", apply_on="instantiate")
        # the label options as the data module built and checked them, saved for `geobp infer --labels`
        parser.link_arguments("data.label_options", "model.label_options", compute_fn=lambda o: o.settings,
                              apply_on="instantiate")
        # the other way round: torchgeo weights decide the data's default normalisation
        parser.link_arguments("model.weights", "data.pretrained_weights")
        parser.link_arguments(
            "data.preprocessing", "model.preprocessing", compute_fn=lambda pre: pre.to_dict(), apply_on="instantiate"
        )


def build_cli(args: Sequence[str], run: bool = True) -> GeobpCLI:
    """Instantiate (and with ``run`` execute) the LightningCLI on ``args`` (the verb first)."""
    return GeobpCLI(
        SegmentationTask,
        GeoTiffDataModule,
        args=list(args),
        run=run,
        save_config_callback=RedactedSaveConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [CheckpointOnInterrupt()]},
        parser_kwargs={"prog": "geobp", "description": "Land-cover segmentation of multi-band GeoTIFFs"},
        parser_class=GeobpArgumentParser,
    )


def lightning(argv: Sequence[str]) -> int:
    """Run LightningCLI on the whole command line (``fit ...``, ``validate ...``, ``test ...``, or global options first)."""
    build_cli(argv)
    return 0


def fit(argv: Sequence[str]) -> int:
    """``geobp fit``: train (LightningCLI)."""
    return lightning(["fit", *argv])


def validate(argv: Sequence[str]) -> int:
    """``geobp validate``: score a checkpoint on the validation split (LightningCLI)."""
    return lightning(["validate", *argv])


def test(argv: Sequence[str]) -> int:
    """``geobp test``: score a checkpoint on the test split (LightningCLI)."""
    return lightning(["test", *argv])


test.__test__ = False  # type: ignore[attr-defined]  # a verb, not a pytest test
