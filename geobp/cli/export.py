"""``geobp export``: a checkpoint as one ONNX or TorchScript file that runs without geobp.

The parser is built without torch (the choices come from :mod:`geobp.choices`); the work imports
:mod:`geobp.inference.export` when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import get_args

from geobp.choices import ExportFormat
from geobp.cli.common import console


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp export`` (built without torch)."""
    p = argparse.ArgumentParser(
        prog="geobp export",
        description="Export a checkpoint from `geobp fit` as one file that ONNX Runtime or torch.jit runs without geobp: "
        "raw pixels in the training files' data type [B, bands, H, W] in, class probabilities [B, classes, H, W] out, "
        "the training normalisation and nodata handling inside. Band and class names, colours, tile size, "
        "normalisation, nodata, input dtype and training CRS are written in its metadata. "
        "`geobp infer --model FILE` runs it over whole rasters.",
    )
    p.add_argument("ckpt", help="checkpoint written by `geobp fit` (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("--format", choices=list(get_args(ExportFormat)), default="onnx",
                   help="onnx (default; ONNX Runtime, opset 17) or torchscript (torch.jit.load)")
    p.add_argument("--out", required=True, help="the file to write: .onnx for ONNX, .pt or .ts for TorchScript")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp export``: write the model file; 0."""
    a = build_parser().parse_args(argv)
    from geobp.inference.export import export_model

    out = export_model(a.ckpt, a.out, a.format, overwrite=a.overwrite)
    console.print(f"{a.ckpt} -> {out} ({a.format})", highlight=False, soft_wrap=True)
    return 0
