"""The ``geobp`` command: LightningCLI for ``fit``/``validate``/``test``, plus ``synth`` and ``demo``.

One :func:`main` serves the console script, ``python -m geobp`` and the tests. It is the top
layer: nothing in geobp imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table

from geobp.callbacks.classreport import ClassFrequencyReport, class_table
from geobp.callbacks.gradflow import GradientFlowMonitor
from geobp.callbacks.interrupt import CheckpointOnInterrupt
from geobp.cliparser import GeobpArgumentParser
from geobp.data.datamodule import GeoTiffDataModule
from geobp.errors import ConfigError, GeobpError, format_error
from geobp.inference.outputs import Probabilities
from geobp.inference.predict import PRECISION_ALIASES, MatchBands, Precision, Reader
from geobp.task import SegmentationTask

console = Console(stderr=True)
#: The demo run's config, shipped inside the package (``configs/demo.yaml`` in the repository links to it).
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


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
        # the other way round: torchgeo weights decide the data's default normalisation
        parser.link_arguments("model.weights", "data.pretrained_weights")
        parser.link_arguments(
            "data.preprocessing", "model.preprocessing", compute_fn=lambda pre: pre.to_dict(), apply_on="instantiate"
        )


def build_cli(args: Sequence[str], run: bool = True) -> GeobpCLI:
    """Instantiate (and with ``run`` execute) the LightningCLI on ``args``."""
    return GeobpCLI(
        SegmentationTask,
        GeoTiffDataModule,
        args=list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [CheckpointOnInterrupt()]},
        parser_kwargs={"prog": "geobp", "description": "Land-cover segmentation of multi-band GeoTIFFs"},
        parser_class=GeobpArgumentParser,
    )


# ----- synth --------------------------------------------------------------------------------


def cmd_synth(argv: Sequence[str]) -> int:
    """``geobp synth``: write synthetic land-cover scenes."""
    from geobp.data.synth import DTYPES, write_scenes

    p = argparse.ArgumentParser(prog="geobp synth", description="Write synthetic multi-band land-cover scenes with masks.")
    p.add_argument("--out", required=True, help="output folder (gets images/ and masks/)")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="scene width and height in pixels")
    p.add_argument("--bands", type=int, default=6)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--dtype", default="uint16", choices=DTYPES)
    p.add_argument("--block-size", type=int, default=256, help="internal GeoTIFF tile size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write_scenes(
        a.out, scenes=a.scenes, size=a.size, bands=a.bands, classes=a.classes, dtype=a.dtype,
        block_size=a.block_size, seed=a.seed, progress=True,
    )
    console.print(f"wrote {len(paths)} scenes to {a.out}/images and {a.out}/masks")
    return 0


# ----- demo ---------------------------------------------------------------------------------

DEMO_SCENES = dict(scenes=8, size=384, bands=6, classes=5, block_size=128, seed=0)


def cmd_demo(argv: Sequence[str]) -> int:
    """``geobp demo``: make the demo data if missing, train on the CPU, report validation IoU."""
    p = argparse.ArgumentParser(
        prog="geobp demo", allow_abbrev=False,
        description="Train a small model on synthetic scenes and report validation IoU. Other options are "
        "LightningCLI overrides of the demo config, e.g. --trainer.max_epochs 2.")
    p.add_argument("--data", default="data/demo", help="demo data folder (generated when missing)")
    p.add_argument("--scenes", type=int, default=DEMO_SCENES["scenes"], help="scenes to generate when the folder is missing")
    p.add_argument("--size", type=int, default=DEMO_SCENES["size"], help="their width and height in pixels")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="LightningCLI config of the demo run")
    # every other argument is a LightningCLI override, e.g. --trainer.max_epochs 2, kept in order
    a, extra = p.parse_known_args(argv)
    start = time.perf_counter()
    data = Path(a.data)
    if not (data / "images").is_dir():
        from geobp.data.synth import write_scenes

        console.print(f"[bold]Generating demo scenes in {data}[/bold]")
        write_scenes(data, progress=True, **{**DEMO_SCENES, "scenes": a.scenes, "size": a.size})  # type: ignore[arg-type]
    cli = build_cli(["--config", a.config, "--data.root", str(data), *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt or None, verbose=False)
    print_iou_table(results[0] if results else {}, cli.model.class_names)
    log_dir = Path(cli.trainer.log_dir or "runs")
    console.print(f"best checkpoint: {ckpt or '(none)'}")
    console.print(f"logs: {log_dir}  (tensorboard --logdir {log_dir.parent})")
    gradflow = log_dir / "gradflow" / "gradflow.json"
    if gradflow.exists():
        import json

        findings = json.loads(gradflow.read_text()).get("diagnoses", [])
        console.print(f"gradient-flow report: {gradflow.parent / 'report.html'} ({len(findings)} finding(s))")
        for f in findings:
            console.print(f"  {f['kind']} at {f['where']} (step {f['step']}): {f['message']}", highlight=False)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def print_iou_table(metrics: dict[str, float], class_names: list[str]) -> None:
    """Print validation per-class IoU and mean IoU as a table."""
    table = Table(title="Validation (best checkpoint)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name in class_names:
        value = metrics.get(f"val/IoU_{name}")
        table.add_row(name, f"{value:.3f}" if value is not None else "-")
    table.add_row("[bold]mean IoU[/bold]", f"[bold]{metrics.get('val/mIoU', float('nan')):.3f}[/bold]")
    Console().print(table)


# ----- check --------------------------------------------------------------------------------


def cmd_check(argv: Sequence[str]) -> int:
    """``geobp check DATA_DIR``: validate a dataset folder; exit 1 when any scene is unusable."""
    from geobp.data.scenes import check_dataset

    p = argparse.ArgumentParser(
        prog="geobp check",
        description="Check every scene of a dataset folder: readable end to end, georeferenced and north-up, "
        "image and mask on one grid, consistent bands, labels within the classes, nodata declared.",
        epilog="Labels in other forms: `geobp check --config CFG` (its data: section) or the `geobp fit` data options "
        "(--data.images, --data.labels, --data.num_classes, --data.label_map '{-1: 255}', --data.label_field ...); "
        "per scene it reports the label sources covering it, their CRS and resolution, coverage, classes and unmapped values.",
    )
    p.add_argument("root", nargs="?", default=None, help="dataset folder with images/ and masks/ (or --config / --data.* options)")
    p.add_argument("--config", default=None, help="a `geobp fit` config: its data section is checked (data.images, data.labels ...)")
    p.add_argument("--num-classes", type=int, default=None, help="mask values must be below this (or the ignore index)")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: the files' tags)")
    p.add_argument("--quick", action="store_true", help="headers only: do not read the pixels")
    p.add_argument("--workers", type=int, default=1, help="processes reading the files in parallel (default 1)")
    p.add_argument("--classes", action="store_true", help="also count the pixels of each class (needs the number of classes)")
    rest = [arg for i, arg in enumerate(argv) if _is_data_arg(argv, i)]
    a = p.parse_args([arg for i, arg in enumerate(argv) if not _is_data_arg(argv, i)])
    data = data_options(a.config, rest)
    if data.get("images") is not None or data.get("labels") is not None:
        return check_labels(data, a)
    a.root = a.root or data.get("root")
    if a.root is None:
        p.error("give the dataset folder ROOT, or --config / --data.root / --data.images and --data.labels")
    a.num_classes = a.num_classes or data.get("num_classes")
    if a.classes and a.num_classes is None:
        raise ConfigError(format_error(None, "--classes needs the number of classes", "pass --num-classes N or --data.num_classes N"))
    reports = check_dataset(a.root, a.num_classes, a.ignore_index, a.nodata, full=not a.quick, progress=True,
                            workers=a.workers)
    table = Table(title=f"geobp check {a.root}", show_lines=True)
    for col in ("scene", "size", "bands", "valid", "labels", "status", "problems"):
        table.add_column(col, overflow="fold")
    for r in reports:
        img = r.image
        status = "[red]FATAL[/red]" if r.fatal else ("[yellow]warn[/yellow]" if r.problems else "[green]ok[/green]")
        table.add_row(
            r.name,
            f"{img.height}x{img.width}" if img else "-",
            f"{img.count} x {img.dtype}" if img else "-",
            f"{r.valid_fraction:.0%}" if r.valid_fraction is not None else "-",
            ",".join(map(str, r.labels[:12])) if r.labels is not None else "-",
            status,
            "\n".join(p.message for p in r.problems) or "",
        )
    Console(width=max(Console().width, 160)).print(table)
    fatal = sum(r.fatal for r in reports)
    if a.classes and not fatal:
        from geobp.data.classbalance import class_counts

        pixels = class_counts([r.mask.path for r in reports if r.mask is not None], a.num_classes)
        total = max(sum(pixels), 1)
        summary = {"names": [f"class_{i}" for i in range(a.num_classes)], "pixels": pixels, "share": [n / total for n in pixels]}
        Console().print(class_table(summary, title="Pixels per class (all scenes)"))
    print_check_summary(reports, a.nodata)
    return 1 if fatal else 0


def print_check_summary(reports: Sequence[Any], nodata: float | None) -> None:
    """The last lines of ``geobp check``: what start-up will have to read, and the counts of scenes."""
    from geobp.data.validity import startup_note

    note = startup_note([r.image for r in reports if r.image is not None and not r.fatal], nodata)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
    fatal = sum(r.fatal for r in reports)
    console.print(f"{len(reports)} scenes, {fatal} unusable, {sum(bool(r.problems) and not r.fatal for r in reports)} with warnings")


def _is_data_arg(argv: Sequence[str], i: int) -> bool:
    """True for a ``--data.KEY[=VALUE]`` option and for the value that follows ``--data.KEY``."""
    arg = argv[i]
    if arg.startswith("--data."):
        return True
    return i > 0 and argv[i - 1].startswith("--data.") and "=" not in argv[i - 1]


def data_options(config: str | None, args: Sequence[str]) -> dict[str, Any]:
    """The ``data:`` section of a config file, updated by ``--data.KEY VALUE`` options (values read as YAML).

    Raises:
        ConfigError: the config cannot be read, or an option is not a ``--data.*`` option.
    """
    import yaml

    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = dict((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {})
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise ConfigError(format_error(config, f"cannot read the config ({err})", "pass a YAML file with a data: section")) from err
    args = list(args)
    while args:
        key = args.pop(0)
        if not key.startswith("--data."):
            raise ConfigError(format_error(None, f"unknown option {key}", "see `geobp check --help`; data options are --data.KEY VALUE"))
        key, eq, value = key[len("--data."):].partition("=")
        if not eq:
            if not args:
                raise ConfigError(format_error(None, f"--data.{key} needs a value", f"pass --data.{key} VALUE"))
            value = args.pop(0)
        data[key] = yaml.safe_load(value)
    return data


def check_labels(data: dict[str, Any], a: argparse.Namespace) -> int:
    """``geobp check`` on ``data.images`` + ``data.labels``: per scene, the label sources and what they give."""
    from geobp.data.alignment import check_labelled_dataset
    from geobp.data.labels import LabelOptions

    num_classes = a.num_classes or data.get("num_classes")
    if num_classes is None:
        raise ConfigError(format_error(None, "num_classes is not set", "pass --data.num_classes (or --num-classes)"))
    names = data.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    ignore = int(data.get("ignore_index", a.ignore_index))
    options = LabelOptions(int(num_classes), ignore, names, data.get("label_map"), data.get("label_field"),
                           data.get("label_background"), data.get("all_touched", False))
    root = data.get("root")
    images = data.get("images") or (str(Path(root) / "images") if root else None)
    labels = data.get("labels") or (str(Path(root) / "masks") if root else None)
    if images is None or labels is None:
        raise ConfigError(format_error(None, "data.images and data.labels are both needed", "pass --data.images and --data.labels"))
    reports = check_labelled_dataset(images, labels, options, data.get("cache_dir") or root,
                                     a.nodata if a.nodata is not None else data.get("nodata"), full=not a.quick, progress=True)
    table = Table(title="geobp check (labels aligned onto each image)", show_lines=True)
    for col in ("scene", "image", "label sources", "labels", "coverage", "classes (pixels)", "unmapped", "status", "problems"):
        table.add_column(col, overflow="fold")
    for r in reports:
        img, rep = r.image, r.label_report
        status = "[red]FATAL[/red]" if r.fatal else ("[yellow]warn[/yellow]" if r.problems else "[green]ok[/green]")
        table.add_row(
            r.name,
            f"{img.height}x{img.width} {img.count} x {img.dtype}\n{img.crs} {img.transform[0]:g} x {-img.transform[4]:g}" if img else "-",
            "\n".join(Path(s).name for s in rep.sources) if rep else "-",
            "\n".join(f"{c} {res[0]:g} x {res[1]:g}" if res else str(c) for c, res in zip(rep.source_crs, rep.source_res)) if rep else "-",
            f"{rep.coverage:.1%}" if rep else "-",
            ", ".join(f"{n}: {c}" for n, c in zip(names, rep.histogram)) if rep and rep.histogram else "-",
            ", ".join(rep.unmapped) if rep else "-",
            status,
            "\n".join(p.message for p in r.problems),
        )
    Console(width=max(Console().width, 180)).print(table)
    print_check_summary(reports, a.nodata if a.nodata is not None else data.get("nodata"))
    return 1 if any(r.fatal for r in reports) else 0


# ----- infer --------------------------------------------------------------------------------


def cmd_infer(argv: Sequence[str]) -> int:
    """``geobp infer``: predict whole rasters with a checkpoint; exit 1 when any input failed."""
    from geobp.inference import predict_many

    p = argparse.ArgumentParser(
        prog="geobp infer",
        description="Predict land cover over whole GeoTIFFs of any size with a checkpoint from `geobp fit`. "
        "Writes OUT/<name>_classes.tif (uint8 class ids, colour table, class names, input's CRS and grid).",
    )
    p.add_argument("inputs", nargs="+", help="GeoTIFFs and/or folders of them")
    p.add_argument("--ckpt", "--ckpt_path", required=True, help="checkpoint written by `geobp fit` (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="output folder")
    # Spellings follow Lightning and geobp's config (tile_size, batch_size, accelerator, devices,
    # num_nodes, precision); the earlier hyphenated ones stay as aliases.
    p.add_argument("--tile_size", "--tile-size", type=int, default=None, help="default: the training tile size")
    p.add_argument("--overlap", type=int, default=None,
                   help="pixels neighbouring tiles share, as data.overlap; here the overlaps are blended, "
                        "so the default is not 0 but tile size / 8")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--accelerator", "--device", default="auto",
                   help="auto (a GPU when there is one), gpu, cuda, cuda:N or cpu")
    p.add_argument("--precision", default="32-true", choices=[*get_args(Precision), *PRECISION_ALIASES],
                   help="as trainer.precision: 32-true, or bf16-mixed / 16-mixed autocast on a GPU (32, bf16, 16 also accepted)")
    p.add_argument("--probabilities", default="none", choices=list(get_args(Probabilities)),
                   help="also write per-class probabilities (uint8, 0-255) or the top-class confidence")
    p.add_argument("--cog", action="store_true", help="write Cloud Optimized GeoTIFFs")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--reader", choices=list(get_args(Reader)), default=None,
                   help="read and decode the input in worker processes (they use every core given: for a GPU) or "
                        "in threads of this process (they start at once: enough on the CPU, where the model needs "
                        "the cores); default: processes on a GPU, threads on the CPU")
    p.add_argument("--readers", "--reader_threads", "--workers", type=int, default=None,
                   help="reader processes or threads; default: a quarter of the usable cores (at least one), "
                        "on a GPU all but two as processes, or a few threads each decoding with several GDAL threads")
    p.add_argument("--devices", type=int, default=1,
                   help="processes per node, one per GPU (or CPU processes with --accelerator cpu); >1 splits the work")
    p.add_argument("--num_nodes", "--num-nodes", type=int, default=1, help="nodes (under srun or torchrun, with --devices per node)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process on the CPU (default: the process's share of the usable cores). "
                        "Outputs are byte for byte the same for any --devices when every run uses the same --threads")
    p.add_argument("--match_bands", "--match-bands", default="names", choices=list(get_args(MatchBands)),
                   help="names (default): find the model's bands in each raster by its band descriptions, in any order; "
                        "order: read the training band numbers whatever the descriptions say")
    add_label_arguments(p.add_argument_group("scoring against ground truth (writes OUT/metrics.json)"), "--labels")
    a = p.parse_args(argv)
    ranks, device = _infer_processes(_torch_device(a.accelerator), a.devices, a.num_nodes, a.threads)
    summary = predict_many(
        a.ckpt, a.inputs, a.out, tile_size=a.tile_size, overlap=a.overlap, batch_size=a.batch_size, device=device,
        precision=a.precision, probabilities=a.probabilities, cog=a.cog, overwrite=a.overwrite, progress=True,
        num_workers=a.readers, reader=a.reader, ranks=ranks, match_bands=a.match_bands,
    )
    if ranks.rank != 0:  # every process has the same summary; rank 0 prints it
        return summary.exit_code
    for src, dst in summary.succeeded:
        console.print(f"{src} -> {dst}", highlight=False)
    for line in summary.lines():
        console.print(line, highlight=False, soft_wrap=True)
    if a.labels:
        return max(summary.exit_code, score_outputs(a, summary.succeeded))
    return summary.exit_code


def add_label_arguments(group: Any, labels_flag: str) -> None:
    """The label options (``--labels`` and ``--label-*``), as the ``data.label*`` options of ``fit``."""
    group.add_argument(labels_flag, nargs="+", default=None, dest="labels", metavar="LABELS",
                       help="label rasters (any grid/CRS: folder, glob or files), one land-cover map, or a vector file")
    group.add_argument("--label_field", "--label-field", default=None, help="vector labels: the attribute holding the class id or name")
    group.add_argument("--label_map", "--label-map", type=_yaml_mapping, default=None,
                       help="raw label value -> class id or ignore, e.g. '{-1: 255}' or '{11: 0, 21: 1}'")
    group.add_argument("--label_background", "--label-background", type=int, default=None,
                       help="vector labels: class outside every feature (default: ignored)")
    group.add_argument("--all_touched", "--all-touched", action="store_true", help="vector labels: label every pixel a feature touches")


def _yaml_mapping(text: str) -> dict[Any, int]:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{-1: 255}}', found {text!r}")
    return value


def score_outputs(a: argparse.Namespace, pairs: list[tuple[Path, Path]]) -> int:
    """Score the class maps against ``a.labels``: tables, and ``OUT/metrics.json``; 1 when any raster failed."""
    from geobp.inference.scoring import score_predictions

    summary = score_predictions(pairs, a.labels, out_dir=a.out, label_map=a.label_map, label_field=a.label_field,
                                label_background=a.label_background, all_touched=a.all_touched)
    out = Console(width=max(Console().width, 100))
    for table in summary.tables():
        out.print(table)
    for _, message in summary.failed:
        console.print(f"NOT SCORED {message}", highlight=False, soft_wrap=True)
    console.print(f"metrics: {Path(a.out) / 'metrics.json'}", highlight=False)
    return 1 if summary.failed else 0


def _infer_processes(device: str, devices: int, num_nodes: int, threads: int | None = None) -> tuple[Any, str]:
    """Start (or join) the inference processes with Lightning Fabric; this one's ranks and device.

    One process unless ``devices * num_nodes > 1``; then Fabric's DDP set-up applies: under
    ``srun`` or ``torchrun`` it joins the processes they started, otherwise it starts the others
    by running the same command again.
    """
    from geobp.inference.distributed import Ranks

    if devices < 1 or num_nodes < 1:
        raise ConfigError(format_error(None, f"--devices and --num_nodes must be >= 1 (found {devices}, {num_nodes})", "pass positive numbers"))
    if threads is not None and threads < 1:
        raise ConfigError(format_error(None, f"--threads must be >= 1 (found {threads})", "pass a positive number, or leave it out"))
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != devices * num_nodes:
        raise ConfigError(format_error(
            None, f"started as {launched} processes (WORLD_SIZE) but --devices {devices} x --num-nodes {num_nodes} = {devices * num_nodes}",
            "pass --devices (processes per node) and --num-nodes matching the launcher"))
    if devices * num_nodes == 1:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return Ranks(), device
    from lightning.fabric import Fabric

    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    # On the CPU the processes of a node share its cores instead of each taking all of them. The
    # intra-op thread count changes the order of floating-point sums (logits differ in the last
    # bits), so byte-identical outputs across process counts need the same --threads.
    if accelerator == "cpu":
        import torch

        from geobp.cores import usable_cores

        torch.set_num_threads(threads or max(1, usable_cores() // devices))
    return Ranks(fabric.global_rank, fabric.world_size), str(fabric.device)


def _torch_device(accelerator: str) -> str:
    """The torch device of an ``--accelerator`` value (Lightning's names, plus ``cuda:N``)."""
    import torch

    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        return "cuda"
    if accelerator == "cpu" or accelerator.startswith("cuda"):
        return accelerator
    raise ConfigError(format_error(None, f"unknown accelerator {accelerator!r}", "use auto, gpu, cuda, cuda:N or cpu"))


# ----- report -------------------------------------------------------------------------------


def cmd_report(argv: Sequence[str]) -> int:
    """``geobp report RUN_DIR``: re-render the gradient-flow report; ``--compare``: runs side by side."""
    from geobp.callbacks.compare import render_compare
    from geobp.callbacks.report import render_report_from_run_dir

    p = argparse.ArgumentParser(prog="geobp report", description="Re-render RUN_DIR/gradflow/report.html from gradflow.json, "
                                "or compare runs side by side on one page (--compare).")
    p.add_argument("run_dir", nargs="?", help="a run folder, e.g. runs/demo/version_0")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="runs to put side by side (after RUN_DIR, if given)")
    p.add_argument("--out", default="gradflow-compare.html", help="the comparison page (default: %(default)s)")
    a = p.parse_args(argv)
    if a.compare:
        out = render_compare([*([a.run_dir] if a.run_dir else []), *a.compare], a.out)
        console.print(f"wrote {out}", highlight=False)
        return 0
    if a.run_dir is None:
        p.error("give RUN_DIR, or --compare RUN_A RUN_B ...")
    for html in render_report_from_run_dir(a.run_dir):
        console.print(f"wrote {html}", highlight=False)
    return 0


# ----- weights ------------------------------------------------------------------------------


def cmd_weights(argv: Sequence[str]) -> int:
    """``geobp weights``: list the torchgeo ResNet weights ``model.weights`` accepts, and which are cached."""
    from geobp.pretrained import list_pretrained

    p = argparse.ArgumentParser(
        prog="geobp weights",
        description="List torchgeo's pretrained ResNet weights that model.weights accepts: sensor, bands, "
        "normalisation, and whether the file is in torch's hub cache ($TORCH_HOME/hub/checkpoints).",
    )
    p.add_argument("--urls", action="store_true", help="also print each file's URL and cache path")
    a = p.parse_args(argv)
    table = Table(title="model.weights (torchgeo)", show_lines=a.urls)
    table.add_column("name", no_wrap=True)
    for col in ("encoder", "sensor", "bands", "normalisation", "cached"):
        table.add_column(col, overflow="fold")
    entries = list_pretrained()
    for w in entries:
        norm = _describe_normalisation(w.mean, w.std)
        name = f"{w.name}\n{w.url}\n-> {w.cache_path}" if a.urls else w.name
        table.add_row(name, w.encoder, w.sensor, " ".join(w.bands), norm,
                      "[green]yes[/green]" if w.cache_path.is_file() else "no")
    Console(width=max(Console().width, 160)).print(table)
    cached = sum(w.cache_path.is_file() for w in entries)
    console.print(f"{len(entries)} weights, {cached} in the cache; fetch a missing file from its URL (--urls) "
                  "into the cache path on a machine with internet", highlight=False)
    return 0


def _describe_normalisation(mean: Sequence[float], std: Sequence[float]) -> str:
    """``(x - m) / s`` when every band shares it, else the per-band ranges."""
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return f"x / {std[0]:g}" if mean[0] == 0 else f"(x - {mean[0]:g}) / {std[0]:g}"
    return f"per band: mean {min(mean):g}..{max(mean):g}, std {min(std):g}..{max(std):g}"


# ----- entry point --------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "synth": cmd_synth,
    "demo": cmd_demo,
    "check": cmd_check,
    "infer": cmd_infer,
    "report": cmd_report,
    "weights": cmd_weights,
}


def error_line(err: BaseException) -> str:
    """One readable line for a geobp error, also when it was re-raised from a DataLoader worker."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("geobp.errors.") else last
    return text


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


#: Every verb with its line on the help page (``geobp --help``); LightningCLI's come first.
VERBS: dict[str, str] = {
    "fit": "train a model on GeoTIFF scenes (LightningCLI: --config, --data.*, --model.*, --trainer.*)",
    "validate": "score a checkpoint on the validation split (--config, --ckpt_path)",
    "test": "score a checkpoint on the test split (needs data.test_fraction > 0)",
    "infer": "predict whole GeoTIFFs of any size with a checkpoint; writes georeferenced class maps",
    "check": "check a dataset before training: readable, georeferenced, labels within the classes",
    "report": "re-render a run's gradient-flow report from its gradflow.json",
    "synth": "write synthetic multi-band land-cover scenes with masks",
    "demo": "generate demo scenes and train a small U-Net on the CPU, then print validation IoU",
    "weights": "list torchgeo's pretrained ResNet weights model.weights accepts, and which are cached",
}
LIGHTNING_VERBS = ("fit", "validate", "test")
assert set(COMMANDS) | set(LIGHTNING_VERBS) == set(VERBS)


def help_text() -> str:
    """The top-level help page: every verb with one line."""
    width = max(map(len, VERBS)) + 2
    lines = [
        "usage: geobp VERB [options]     (geobp VERB --help: the verb's options)",
        "",
        "Land-cover segmentation of multi-band GeoTIFFs: train, check data, predict, diagnose.",
        "",
        "verbs:",
        *(f"  {verb:<{width}}{text}" for verb, text in VERBS.items()),
        "",
        "Training verbs read a YAML config (--config) and dotted overrides; `geobp fit --print_config`",
        "prints every option with its value.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``geobp``. Returns the process exit code (0 success, 1 failed work, 2 bad input, 143 stopped by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_warnings()
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(help_text())
            return 0 if argv else 2
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv[0] == "predict":
            raise ConfigError(format_error(
                None, "`geobp predict` is not a geobp verb (it was Lightning's, and needs a predict dataloader)",
                "use `geobp infer RASTERS --ckpt CKPT --out DIR`, which predicts whole rasters of any size"))
        if not argv[0].startswith("-") and argv[0] not in VERBS:
            raise ConfigError(format_error(None, f"unknown verb {argv[0]!r}", f"use one of: {', '.join(VERBS)} (geobp --help)"))
        build_cli(argv)
        return 0
    except GeobpError as err:
        console.print(f"[bold red]error:[/bold red] {error_line(err)}", highlight=False, soft_wrap=True)
        return 2
    except SIGTERMException:
        # Lightning stops at a batch boundary with SystemExit(None), which would exit 0 as if training
        # had finished; CheckpointOnInterrupt has saved last.ckpt by now.
        return 128 + signal.SIGTERM
