"""``geobp weights``: the torchgeo ResNet weights ``model.weights`` accepts, and which are cached."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from geobp.cli.common import console


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp weights`` (built without torch)."""
    p = argparse.ArgumentParser(
        prog="geobp weights",
        description="List torchgeo's pretrained ResNet weights that model.weights accepts: sensor, bands, "
        "normalisation, and whether the file is in torch's hub cache ($TORCH_HOME/hub/checkpoints).",
    )
    p.add_argument("--urls", action="store_true", help="also print each file's URL and cache path")
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp weights``: print the table of weights; 0."""
    a = build_parser().parse_args(argv)
    from geobp.pretrained import list_pretrained

    table = Table(title="model.weights (torchgeo)", show_lines=a.urls)
    table.add_column("name", no_wrap=True)
    for col in ("encoder", "sensor", "bands", "normalisation", "cached"):
        table.add_column(col, overflow="fold")
    entries = list_pretrained()
    for w in entries:
        norm = describe_normalisation(w.mean, w.std)
        name = f"{w.name}\n{w.url}\n-> {w.cache_path}" if a.urls else w.name
        table.add_row(name, w.encoder, w.sensor, " ".join(w.bands), norm,
                      "[green]yes[/green]" if w.cache_path.is_file() else "no")
    Console(width=max(Console().width, 160)).print(table)
    cached = sum(w.cache_path.is_file() for w in entries)
    console.print(f"{len(entries)} weights, {cached} in the cache; fetch a missing file from its URL (--urls) "
                  "into the cache path on a machine with internet", highlight=False)
    return 0


def describe_normalisation(mean: Sequence[float], std: Sequence[float]) -> str:
    """``(x - m) / s`` when every band shares it, else the per-band ranges."""
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return f"x / {std[0]:g}" if mean[0] == 0 else f"(x - {mean[0]:g}) / {std[0]:g}"
    return f"per band: mean {min(mean):g}..{max(mean):g}, std {min(std):g}..{max(std):g}"
