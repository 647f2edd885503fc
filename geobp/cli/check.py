"""``geobp check``: check a dataset before training, scene by scene.

The data options (``--data.images``, ``--data.label_map`` ...) are the data module's own, read
through jsonargparse from :class:`~geobp.data.datamodule.GeoTiffDataModule`'s signature, so they
are typed and checked as in ``geobp fit``; ``--config`` reads the ``data:`` section of a
``geobp fit`` config (its other sections are ignored). ``geobp check --help`` is built without
the data module (and so without torch).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from geobp.cli.common import console, known_options, suggest, wants_help
from geobp.errors import ConfigError, format_error

DESCRIPTION = ("Check every scene of a dataset folder: readable end to end, georeferenced and north-up, "
               "image and mask on one grid, consistent bands, labels within the classes, nodata declared.")
EPILOG = ("Labels in other forms: `geobp check --config CFG` (its data: section) or the data options of `geobp fit` "
          "(--data.images, --data.labels, --data.num_classes, --data.label_map '{-1: 255}', --data.label_field ...; "
          "`geobp fit --help` lists them all); per scene it reports the label sources covering it, their CRS and "
          "resolution, coverage, classes and unmapped values.")


def add_check_options(p: argparse.ArgumentParser) -> None:
    """The options of ``geobp check`` other than the data module's (``--data.*``)."""
    p.add_argument("root", nargs="?", default=None, help="dataset folder with images/ and masks/ (or --config / --data.* options)")
    p.add_argument("--config", default=None, help="a `geobp fit` config: its data section is checked (data.images, data.labels ...)")
    p.add_argument("--num-classes", type=int, default=None, help="mask values must be below this (or the ignore index)")
    p.add_argument("--ignore-index", type=int, default=None, help="the masks' ignore index (default: data.ignore_index, 255)")
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: the files' tags)")
    p.add_argument("--quick", action="store_true", help="headers only: do not read the pixels")
    p.add_argument("--workers", type=int, default=1, help="processes reading the files in parallel (default 1)")
    p.add_argument("--classes", action="store_true", help="also count the pixels of each class (needs the number of classes)")


def build_parser() -> argparse.ArgumentParser:
    """The help page of ``geobp check`` (built without the data module, so without torch)."""
    p = argparse.ArgumentParser(prog="geobp check", description=DESCRIPTION, epilog=EPILOG)
    add_check_options(p)
    p.add_argument("--data.KEY", metavar="VALUE", dest="data_options",
                   help="any data option of `geobp fit` (see `geobp fit --help`), e.g. --data.labels wc.tif")
    return p


def data_parser() -> Any:
    """The parser that reads ``geobp check``'s arguments: its own options and the data module's (``--data.*``)."""
    from jsonargparse import ArgumentParser

    from geobp.data.datamodule import GeoTiffDataModule

    p = ArgumentParser(prog="geobp check", description=DESCRIPTION, exit_on_error=False)
    add_check_options(p)
    p.add_class_arguments(GeoTiffDataModule, "data")
    return p


def config_data_section(config: str) -> dict[str, Any]:
    """The ``data:`` section of a ``geobp fit`` config (empty when it has none).

    Raises:
        ConfigError: the file cannot be read, or it is not a YAML mapping.
    """
    import yaml

    try:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(format_error(config, f"cannot read the config ({err})", "pass a YAML file with a data: section")) from err
    if not isinstance(data, dict):
        raise ConfigError(format_error(config, f"the data: section is not a mapping (found {type(data).__name__})",
                                       "write the data options under data: as key: value lines"))
    return data


def parse_check_args(argv: Sequence[str]) -> argparse.Namespace:
    """``geobp check``'s arguments: its options, and ``data`` (every data option: the config's ``data:``
    section, then the ``--data.*`` options, over the data module's defaults).

    Raises:
        ConfigError: an unknown option, a value of the wrong type, or an unreadable config (one line).
    """
    import yaml
    from jsonargparse import ArgumentError

    parser = data_parser()
    argv = list(argv)
    try:
        first = parser.parse_args(argv)
        if first.config is None:
            return first
        section = config_data_section(first.config)
        # the config's data section first, the command line's --data.* options over it
        # sort_keys=False: the order of data.images' sources matters (the first is the reference grid)
        return parser.parse_args(["--data", yaml.safe_dump(section, sort_keys=False), *argv]) if section else first
    except ArgumentError as err:
        raise ConfigError(check_error(str(err), known_options(parser))) from None


def check_error(message: str, options: list[str]) -> str:
    """jsonargparse's (often multi-line) error as one line, with the closest option names for an unknown one."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    hint = ""
    if "nrecognized arguments: --" in text:
        name = text.split("arguments: --", 1)[1].split()[0]
        hint = suggest(name, options)
    elif "does not accept option '" in text:
        name = "data." + text.split("does not accept option '", 1)[1].split("'")[0]
        hint = suggest(name, options)
    return format_error(None, text + ("." + hint if hint else ""),
                        "see `geobp check --help`; the data options are those of `geobp fit --help`")


def run(argv: Sequence[str]) -> int:
    """``geobp check DATA_DIR``: validate a dataset folder; 1 when any scene is unusable, 2 for bad options."""
    if wants_help(list(argv)):
        build_parser().parse_args(["--help"])
    a = parse_check_args(argv)
    data = dict(vars(a.data))
    if data.get("images") is not None or data.get("labels") is not None:
        return check_labels(data, a)
    a.root = a.root or data.get("root")
    if a.root is None:
        build_parser().error("give the dataset folder ROOT, or --config / --data.root / --data.images and --data.labels")
    a.num_classes = a.num_classes or data.get("num_classes")
    a.ignore_index = a.ignore_index if a.ignore_index is not None else data["ignore_index"]
    a.nodata = a.nodata if a.nodata is not None else data.get("nodata")
    if a.classes and a.num_classes is None:
        raise ConfigError(format_error(None, "--classes needs the number of classes", "pass --num-classes N or --data.num_classes N"))
    from geobp.data.scenes import check_dataset
    from geobp.sources.urls import redact

    reports = check_dataset(a.root, a.num_classes, a.ignore_index, a.nodata, full=not a.quick, progress=True,
                            workers=a.workers)
    table = Table(title=f"geobp check {redact(str(a.root))}", show_lines=True)
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
        from geobp.callbacks.classreport import class_table
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


def check_labels(data: dict[str, Any], a: argparse.Namespace) -> int:
    """``geobp check`` on ``data.images`` + ``data.labels``: per scene, the label sources and what they give."""
    from geobp.data.alignment import check_labelled_dataset
    from geobp.data.labels import LabelOptions
    from geobp.sources.locations import file_name, join, location
    from geobp.sources.stackpath import is_stack_path
    from geobp.sources.urls import is_remote

    options = LabelOptions.from_config({
        **data, "num_classes": a.num_classes or data.get("num_classes"),
        "ignore_index": a.ignore_index if a.ignore_index is not None else data.get("ignore_index")})
    names = list(options.class_names or ())
    root = data.get("root")
    images = data.get("images") or (str(join(location(root), "images")) if root else None)
    labels = data.get("labels") or (str(join(location(root), "masks")) if root else None)
    if images is None or labels is None:
        raise ConfigError(format_error(None, "data.images and data.labels are both needed", "pass --data.images and --data.labels"))
    nodata = a.nodata if a.nodata is not None else data.get("nodata")
    from geobp.sources.imagery import resolve_images
    from geobp.sources.stack import warp_block_for

    # a STAC document or several sources: one stacked scene each, with its sources reported below
    images = resolve_images(images, data.get("bands"),
                            warp_block=warp_block_for(data.get("tile_size") or 256)) or images
    local_root = root if root and not is_remote(root) else None  # a remote dataset's cache is local
    reports = check_labelled_dataset(images, labels, options, data.get("cache_dir") or local_root, nodata,
                                     full=not a.quick, progress=True)
    table = Table(title="geobp check (labels aligned onto each image)", show_lines=True)
    stacked = any(r.image is not None and is_stack_path(r.image.path) for r in reports)
    for col in ("scene", "image", *(("sources",) if stacked else ()), "label sources", "labels", "coverage",
                "classes (pixels)", "unmapped", "status", "problems"):
        table.add_column(col, overflow="fold")
    for r in reports:
        img, rep = r.image, r.label_report
        status = "[red]FATAL[/red]" if r.fatal else ("[yellow]warn[/yellow]" if r.problems else "[green]ok[/green]")
        table.add_row(
            r.name,
            f"{img.height}x{img.width} {img.count} x {img.dtype}\n{img.crs} {img.transform[0]:g} x {-img.transform[4]:g}" if img else "-",
            *((source_lines(img.path) if img is not None and is_stack_path(img.path) else "-",) if stacked else ()),
            "\n".join(file_name(s) for s in rep.sources) if rep else "-",
            "\n".join(f"{c} {res[0]:g} x {res[1]:g}" if res else str(c) for c, res in zip(rep.source_crs, rep.source_res)) if rep else "-",
            f"{rep.coverage:.1%}" if rep else "-",
            ", ".join(f"{n}: {c}" for n, c in zip(names, rep.histogram)) if rep and rep.histogram else "-",
            ", ".join(rep.unmapped) if rep else "-",
            status,
            "\n".join(p.message for p in r.problems),
        )
    Console(width=max(Console().width, 180)).print(table)
    print_check_summary(reports, nodata)
    return 1 if any(r.fatal for r in reports) else 0


def source_lines(path: str) -> str:
    """Per source of a stacked scene: its name, CRS and resolution, bands, files and coverage of the scene."""
    from geobp.sources.stackreader import read_stack_path

    _, stack, _ = read_stack_path(path)
    lines = []
    for s in stack.describe():
        res = ", ".join(f"{x:g} x {y:g}" for x, y in s.res)
        name = s.source or "bands"
        lines.append(f"{name}: {', '.join(s.crs)} {res}; {len(s.files)} file{'s' if len(s.files) != 1 else ''}; "
                     f"covers {s.coverage:.0%}; {', '.join(s.bands)}")
    return "\n".join(lines)
