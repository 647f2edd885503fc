"""``geobp synth``: write synthetic multi-band land-cover scenes with masks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import get_args

from geobp.choices import SynthDType
from geobp.cli.common import console


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp synth`` (built without torch)."""
    p = argparse.ArgumentParser(prog="geobp synth", description="Write synthetic multi-band land-cover scenes with masks.")
    p.add_argument("--out", required=True, help="output folder (gets images/ and masks/)")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="scene width and height in pixels")
    p.add_argument("--bands", type=int, default=6)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--dtype", default="uint16", choices=get_args(SynthDType))
    p.add_argument("--block-size", type=int, default=256, help="internal GeoTIFF tile size")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp synth``: write the scenes; 0 when written."""
    a = build_parser().parse_args(argv)
    from geobp.data.synth import write_scenes

    paths = write_scenes(
        a.out, scenes=a.scenes, size=a.size, bands=a.bands, classes=a.classes, dtype=a.dtype,
        block_size=a.block_size, seed=a.seed, progress=True,
    )
    console.print(f"wrote {len(paths)} scenes to {a.out}/images and {a.out}/masks")
    return 0
