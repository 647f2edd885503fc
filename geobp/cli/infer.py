"""``geobp infer``: predict whole GeoTIFFs with a checkpoint; optionally score them against labels.

The parser is built without torch (the choices come from :mod:`geobp.choices`); the work
imports inference when it runs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from geobp.choices import PRECISION_ALIASES, TTA, MatchBands, NormalizeOn, Precision, Probabilities, Reader
from geobp.cli.common import console, yaml_mapping
from geobp.cli.vectorize import add_vector_arguments, vector_options
from geobp.errors import ConfigError, format_error

#: The label options of ``geobp infer`` (``--label_*``), by their ``data.*`` names.
LABEL_OPTION_NAMES = ("label_map", "label_field", "label_background", "all_touched")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp infer`` (built without torch)."""
    p = argparse.ArgumentParser(
        prog="geobp infer",
        description="Predict land cover over whole GeoTIFFs of any size with a checkpoint from `geobp fit`. "
        "Writes OUT/<name>_classes.tif (uint8 class ids, colour table, class names, input's CRS and grid).",
    )
    p.add_argument("inputs", nargs="*", help="GeoTIFFs and/or folders of them; URLs too (https://, s3://, gs://, az://; "
                   "an s3:// prefix is listed like a folder); STAC Items, ItemCollections or Catalogs (.json, path or URL): "
                   "one scene per item, its bands stacked as in training")
    p.add_argument("--images", type=yaml_mapping, default=None, metavar="SOURCES",
                   help="several sources per scene, as data.images takes them: a YAML/JSON mapping such as "
                        "'{s2: items.json, s1: s1/, dem: dem.vrt}' (the first source is the grid the outputs are on)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", "--ckpt_path", help="checkpoint written by `geobp fit` (e.g. <run>/checkpoints/last.ckpt)")
    model.add_argument("--model", help="instead of --ckpt: a model written by `geobp export` (.onnx, run by ONNX Runtime; "
                       ".pt or .ts, TorchScript); bands, classes, tile size and normalisation come from its metadata")
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
                   help="also write per-class probabilities (uint8, 0-255), the top-class confidence (0-255), or the "
                        "predictive entropy (0 certain .. 254 all classes equally likely; 255 nodata)")
    p.add_argument("--tta", default="none", choices=list(get_args(TTA)),
                   help="test-time augmentation: average each tile's class probabilities over its 4 flips (flips: "
                        "4 forward passes) or its 8 flips and quarter turns (d4: 8); the tiles are read once")
    p.add_argument("--cog", action="store_true", help="write Cloud Optimized GeoTIFFs")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--reader", choices=list(get_args(Reader)), default=None,
                   help="read and decode the input in worker processes (they use every core given: for a GPU) or "
                        "in threads of this process (they start at once: enough on the CPU, where the model needs "
                        "the cores); default: processes on a GPU, threads on the CPU")
    p.add_argument("--readers", "--reader_threads", "--workers", type=int, default=None,
                   help="reader processes or threads; default: a quarter of the usable cores (at least one), "
                        "on a GPU all but two as processes, or a few threads each decoding with several GDAL threads")
    p.add_argument("--normalize_on", "--normalize-on", choices=list(get_args(NormalizeOn)), default=None,
                   help="where the tiles become float32: in the readers, or on the model's device (the readers then "
                        "hand over the raw integers, less to copy); default: device on a GPU, reader on the CPU")
    p.add_argument("--devices", type=int, default=1,
                   help="processes per node, one per GPU (or CPU processes with --accelerator cpu); >1 splits the work")
    p.add_argument("--num_nodes", "--num-nodes", type=int, default=1, help="nodes (under srun or torchrun, with --devices per node)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process on the CPU (default: the process's share of the usable cores). "
                        "Outputs are byte for byte the same for any --devices when every run uses the same --threads")
    p.add_argument("--match_bands", "--match-bands", default="names", choices=list(get_args(MatchBands)),
                   help="names (default): find the model's bands in each raster by its band descriptions, in any order; "
                        "order: read the training band numbers whatever the descriptions say")
    add_vector_arguments(p.add_argument_group(
        "polygons for a GIS", "--vector writes OUT/<name>_classes.<ext> once the class map is complete; the polygons' "
        "confidence is read from the confidence (or probabilities) output, so --vector also writes <name>_confidence.tif "
        "unless --probabilities asks for one"))
    add_label_arguments(p.add_argument_group(
        "scoring against ground truth (writes OUT/metrics.json)",
        "The labels are read with the checkpoint's label options (those of training: data.label_map ...) "
        "unless any --label_* option is given; then those given (and the defaults of the others) apply."))
    return p


def add_label_arguments(group: Any) -> None:
    """The label options (``--labels`` and ``--label_*``), as the ``data.label*`` options of ``fit``."""
    group.add_argument("--labels", type=label_spec, default=None, metavar="LABELS",
                       help="the ground truth, one value as data.labels takes it: label rasters (any grid/CRS: a folder, "
                            "a glob, or a list such as '[a.tif, b.tif]'), one land-cover map, or a vector file")
    group.add_argument("--label_field", "--label-field", default=None, help="vector labels: the attribute holding the class id or name")
    group.add_argument("--label_map", "--label-map", type=yaml_mapping, default=None,
                       help="raw label value -> class id or ignore, e.g. '{-1: 255}' or '{11: 0, 21: 1}'")
    group.add_argument("--label_background", "--label-background", type=int, default=None,
                       help="vector labels: class outside every feature (default: ignored)")
    group.add_argument("--all_touched", "--all-touched", action="store_true", help="vector labels: label every pixel a feature touches")


def label_spec(text: str) -> str | list[str]:
    """An argparse ``type``: one label source, or a YAML/JSON list of them (``'[a.tif, b.tif]'``).

    Raises:
        argparse.ArgumentTypeError: a ``[...]`` value that is not a list of paths.
    """
    if not text.lstrip().startswith("["):
        return text
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a file, folder, glob or a list like '[a.tif, b.tif]', found {text!r}")
    return value


def run(argv: Sequence[str]) -> int:
    """``geobp infer``: predict whole rasters with a checkpoint; 1 when any input failed or could not be scored."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.inputs and a.images is None:
        parser.error("give input rasters (or STAC documents), or --images with a mapping of sources")
    from geobp.inference import predict_many
    from geobp.sources.urls import redact

    vector = vector_options(a)  # polygons need a per-pixel confidence: the confidence output unless probabilities are written
    probabilities = "confidence" if vector is not None and a.probabilities == "none" else a.probabilities
    ranks, device = infer_processes(torch_device(a.accelerator), a.devices, a.num_nodes, a.threads)
    if a.model is not None:
        from geobp.inference.exported import load_exported

        model: Any = load_exported(a.model, device)
    else:
        model = a.ckpt
    summary = predict_many(
        model, [*a.inputs, *([a.images] if a.images is not None else [])], a.out, tile_size=a.tile_size, overlap=a.overlap,
        batch_size=a.batch_size, device=device,
        precision=a.precision, probabilities=probabilities, cog=a.cog, overwrite=a.overwrite, progress=True,
        num_workers=a.readers, reader=a.reader, ranks=ranks, match_bands=a.match_bands, normalize_on=a.normalize_on,
        vector=vector,
        tta=a.tta,
    )
    if ranks.rank != 0:  # every process has the same summary; rank 0 prints it
        return summary.exit_code
    for src, dst in summary.succeeded:
        console.print(redact(f"{src} -> {dst}"), highlight=False)  # a signed URL's signature is never printed
    for line in summary.lines():
        console.print(line, highlight=False, soft_wrap=True)
    if a.labels is not None:
        return max(summary.exit_code, score_outputs(a, summary.succeeded, None if a.model is None else model.hparams))
    return summary.exit_code


def given_label_options(a: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--label_*`` options as ``label_options``, or None when none of them was given."""
    if a.label_map is None and a.label_field is None and a.label_background is None and not a.all_touched:
        return None
    return {"label_map": a.label_map or {}, "label_field": a.label_field, "label_background": a.label_background,
            "all_touched": a.all_touched}


def scoring_options(a: argparse.Namespace, hparams: dict[str, Any]) -> tuple[Any, str]:
    """The :class:`~geobp.data.labels.LabelOptions` the labels are read with, and a line saying which and from where.

    Classes and ignore index come from the checkpoint; the label options from the command line
    when any ``--label_*`` option is given, else from the checkpoint's ``label_options`` (those of
    training), else the defaults.

    Raises:
        ConfigError: a label option is invalid for the checkpoint's classes.
    """
    from geobp.checkpoint import label_options_of
    from geobp.data.labels import LabelOptions

    chosen = given_label_options(a)
    if chosen is not None:
        where = "the command line"
    elif (trained := label_options_of(hparams)) is not None:
        chosen, where = trained, f"the {model_source(a)}"
    else:
        chosen = {}  # LabelOptions.from_config gives every missing option its one default
        where = f"the defaults (the {model_source(a)} holds none)"
    options = LabelOptions.from_config({
        "num_classes": hparams["num_classes"], "ignore_index": hparams.get("ignore_index"),
        "class_names": hparams.get("class_names"), **chosen})
    described = ", ".join(f"{name} {getattr(options, name)!r}" for name in LABEL_OPTION_NAMES)
    return options, f"label options from {where}: {described}"


def model_source(a: argparse.Namespace) -> str:
    """``checkpoint PATH`` or ``model PATH``: where the model came from, for messages."""
    return f"checkpoint {a.ckpt}" if a.model is None else f"model {a.model}"


def score_outputs(a: argparse.Namespace, pairs: list[tuple[Path, Path]], hparams: dict[str, Any] | None = None) -> int:
    """Score the class maps against ``a.labels``: tables, and ``OUT/metrics.json``; 1 when any raster
    could not be scored (each says why on its first line), or when there was nothing to score.
    ``hparams``: the model's (an exported model's metadata); by default read from ``a.ckpt``."""
    from rich.console import Console

    from geobp.inference.scoring import score_predictions
    from geobp.checkpoint import load_checkpoint_data

    if not pairs:
        console.print("NOT SCORED: no class map was written (every input failed)", highlight=False)
        return 1
    if hparams is None:
        hparams = dict(load_checkpoint_data(Path(a.ckpt)).get("hyper_parameters") or {})
    options, line = scoring_options(a, hparams)
    console.print(line, highlight=False, soft_wrap=True)
    summary = score_predictions(pairs, a.labels, options=options, out_dir=a.out)
    out = Console(width=max(Console().width, 100))
    for table in summary.tables():
        out.print(table)
    for src, message in summary.failed:
        first, *rest = str(message).strip().splitlines() or ["(no message)"]
        head = first if str(src) in first else f"{src}: {first}"
        console.print(f"NOT SCORED {head}", highlight=False, soft_wrap=True)
        for more in rest:
            console.print(f"  {more}", highlight=False, soft_wrap=True)
    console.print(f"metrics: {Path(a.out) / 'metrics.json'}", highlight=False)
    return 1 if summary.failed or not summary.rasters else 0


def infer_processes(device: str, devices: int, num_nodes: int, threads: int | None = None) -> tuple[Any, str]:
    """Start (or join) the inference processes with Lightning Fabric; this one's ranks and device.

    One process unless ``devices * num_nodes > 1``; then Fabric's DDP set-up applies: under
    ``srun`` or ``torchrun`` it joins the processes they started, otherwise it starts the others
    by running the same command again.

    Raises:
        ConfigError: non-positive counts, or a launcher that started another number of processes.
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


def torch_device(accelerator: str) -> str:
    """The torch device of an ``--accelerator`` value (Lightning's names, plus ``cuda:N``).

    Raises:
        ConfigError: an unknown accelerator.
    """
    import torch

    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        return "cuda"
    if accelerator == "cpu" or accelerator.startswith("cuda"):
        return accelerator
    raise ConfigError(format_error(None, f"unknown accelerator {accelerator!r}", "use auto, gpu, cuda, cuda:N or cpu"))
