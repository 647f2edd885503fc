"""``geobp demo``: generate demo scenes, train a small U-Net on the CPU, print validation IoU."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from geobp.cli.common import console

#: The demo run's config, shipped inside the package (``configs/demo.yaml`` in the repository links to it).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
#: The demo scenes (:func:`geobp.data.synth.write_scenes` arguments).
DEMO_SCENES = dict(scenes=8, size=384, bands=6, classes=5, block_size=128, seed=0)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp demo`` (built without torch); other options are LightningCLI overrides."""
    p = argparse.ArgumentParser(
        prog="geobp demo", allow_abbrev=False,
        description="Train a small model on synthetic scenes and report validation IoU. Other options are "
        "LightningCLI overrides of the demo config, e.g. --trainer.max_epochs 2.")
    p.add_argument("--data", default="data/demo", help="demo data folder (generated when missing)")
    p.add_argument("--scenes", type=int, default=DEMO_SCENES["scenes"], help="scenes to generate when the folder is missing")
    p.add_argument("--size", type=int, default=DEMO_SCENES["size"], help="their width and height in pixels")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="LightningCLI config of the demo run")
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp demo``: make the demo data if missing, train on the CPU, report validation IoU."""
    # every other argument is a LightningCLI override, e.g. --trainer.max_epochs 2, kept in order
    a, extra = build_parser().parse_known_args(argv)
    start = time.perf_counter()
    data = Path(a.data)
    if not (data / "images").is_dir():
        from geobp.data.synth import write_scenes

        console.print(f"[bold]Generating demo scenes in {data}[/bold]")
        write_scenes(data, progress=True, **{**DEMO_SCENES, "scenes": a.scenes, "size": a.size})  # type: ignore[arg-type]
    from geobp.cli.train import build_cli

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
