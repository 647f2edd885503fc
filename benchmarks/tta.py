"""Section "tta": the cost of test-time augmentation, and its effect on accuracy on synthetic stand-in data.

- Cost: seconds of ``predict_raster`` (what ``geobp infer`` runs) over one 6-band raster with a
  U-Net ResNet-18, without augmentation, with ``tta="flips"`` (4 forward passes per tile) and
  with ``tta="d4"`` (8), in alternating order; issue 22's target for ``flips`` is at most 4.5x
  the plain run (the forward is 4x; reads, blending and writing are shared).
- Accuracy: a U-Net ResNet-18 trained briefly (``configs/demo.yaml`` with fewer epochs) on the
  demo's synthetic scenes (:func:`geobp.data.synth.write_scenes`), then scenes it never saw (another
  seed) predicted with each mode and scored against their masks (pixel accuracy and mean IoU over
  the classes, nodata pixels left out). Synthetic scenes are a stand-in: no real dataset can be
  fetched where this runs, so the measurement on a real dataset is still to do.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Config, SectionResult, fmt, median, spread, table, target
from benchmarks.inference import BANDS, CLASSES, ENCODER, preprocessing
from benchmarks.scenes import ensure_plain_raster

MODES = ("none", "flips", "d4")
#: forward passes per tile of each mode
PASSES = {"none": 1, "flips": 4, "d4": 8}


def predict_seconds(model: torch.nn.Module, src: Path, dst: Path, cfg: Config, mode: str) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process's threads, readers included) of one ``predict_raster``
    call with ``tta=mode`` (class map only, overwritten). CPU seconds hardly change when other work
    shares the cores; wall-clock seconds do."""
    from geobp.inference import PredictOptions, predict_raster

    options = PredictOptions(tile_size=cfg.infer_tile, overlap=cfg.infer_overlap, batch_size=cfg.infer_batch, device="cpu",
                             progress=False, overwrite=True, tta=mode)  # type: ignore[arg-type]
    start, cpu = time.perf_counter(), time.process_time()
    predict_raster(model, src, dst, preprocessing(BANDS), options)
    return time.perf_counter() - start, time.process_time() - cpu


def train_briefly(root: Path, logs: Path, cfg: Config) -> Any:
    """A U-Net trained on the scenes under ``root`` with the demo config, for a short while; the task."""
    from geobp.cli.demo import DEMO_CONFIG
    from geobp.cli.train import build_cli

    overrides = ["--data.root", str(root), "--trainer.logger.init_args.save_dir", str(logs),
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(logs)]
    if cfg.quick:
        overrides += ["--trainer.max_epochs", "1", "--data.tile_size", "64", "--data.tiles_per_epoch", "16",
                      "--data.batch_size", "4"]
    else:
        overrides += ["--trainer.max_epochs", "2"]
    cli = build_cli(["--config", str(DEMO_CONFIG), *overrides], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.eval()


def confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] pixel counts (truth rows, prediction columns) where the truth is a class."""
    keep = truth < classes
    return np.bincount(truth[keep].astype(np.int64) * classes + pred[keep], minlength=classes**2).reshape(classes, classes)


def scores(matrix: np.ndarray) -> tuple[float, float]:
    """Pixel accuracy and mean IoU (over the classes present in the truth or the prediction)."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    return float(tp.sum() / matrix.sum()), float((tp[present] / union[present]).mean())


def accuracy(cfg: Config, work: Path) -> dict[str, Any]:
    """Train briefly on the demo's synthetic scenes, then score unseen scenes with each mode."""
    import rasterio

    from geobp.cli.demo import DEMO_SCENES
    from geobp.data.synth import write_scenes
    from geobp.inference import predict_many

    scene = dict(DEMO_SCENES)
    if cfg.quick:
        scene.update(scenes=3, size=128, block_size=64)
    write_scenes(work / "train", **scene)  # type: ignore[arg-type]
    held = dict(scene, scenes=2 if cfg.quick else 4, seed=1)
    images = write_scenes(work / "heldout", **held)  # type: ignore[arg-type]
    start = time.perf_counter()
    task = train_briefly(work / "train", work / "runs", cfg)
    train_s = time.perf_counter() - start
    maps: dict[str, list[np.ndarray]] = {}
    for mode in MODES:
        out = work / f"pred_{mode}"
        summary = predict_many(task, images, out, device="cpu", progress=False, tta=mode)
        if summary.failed:
            raise RuntimeError(f"tta {mode}: {summary.failed[0][1]}")
        maps[mode] = [rasterio.open(dst).read(1) for _, dst in summary.succeeded]
    truths = [rasterio.open(Path(str(p).replace("/images/", "/masks/"))).read(1) for p in images]
    classes = int(scene["classes"])
    result: dict[str, Any] = {"train_seconds": train_s, "epochs": 1 if cfg.quick else 2, "scenes": held["scenes"],
                              "size": scene["size"], "modes": {}}
    for mode in MODES:
        matrix = sum(confusion(p, t, classes) for p, t in zip(maps[mode], truths))
        acc, miou = scores(matrix)
        changed = sum(int(((p != q) & (t < classes)).sum()) for p, q, t in zip(maps[mode], maps["none"], truths))
        total = sum(int((t < classes).sum()) for t in truths)
        result["modes"][mode] = {"pixel_accuracy": acc, "mean_iou": miou, "changed_share": changed / total}
    return result


def run(cfg: Config) -> dict[str, Any]:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    from geobp.models import create_model

    res = SectionResult(section="tta", title="Test-time augmentation")
    size = min(cfg.infer_size, 1024)  # 8 forward passes per tile: a quarter of the inference section's side
    cache = Path(cfg.cache_dir) / "inference"
    block = min(512, size // 2 // 16 * 16)
    src = ensure_plain_raster(cache, size, bands=BANDS, block=block)
    torch.manual_seed(0)
    unet = create_model("unet", encoder=ENCODER, in_channels=BANDS, num_classes=CLASSES).eval()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out_classes.tif"
        predict_seconds(unet, src, dst, cfg, "none")  # warm-up: file cache, GDAL, threads
        for rep in range(cfg.repeats):
            for mode in MODES if rep % 2 == 0 else reversed(MODES):
                wall, used = predict_seconds(unet, src, dst, cfg, mode)
                times[mode].append(wall)
                cpu[mode].append(used)
                print(f"tta: repeat {rep} {mode}: {wall:.2f} s, {used:.2f} CPU s", flush=True)
    med = {m: median(v) for m, v in times.items()}
    med_cpu = {m: median(v) for m, v in cpu.items()}
    ratio = {m: med[m] / med["none"] for m in MODES}
    ratio_cpu = {m: med_cpu[m] / med_cpu["none"] for m in MODES}
    res.tables.append(table(
        f"Cost, {size} x {size} px, U-Net ResNet-18 (`predict_raster`, class map only)",
        ["tta", "forward passes per tile", "seconds (median)", "min-max", "vs none", "CPU seconds (median)", "vs none", "n"],
        [[m, PASSES[m], med[m], spread(times[m]), f"{fmt(ratio[m])}x", med_cpu[m], f"{fmt(ratio_cpu[m])}x", len(times[m])]
         for m in MODES]))
    res.targets.append(target("tta: flips / none, predict_raster seconds", ratio["flips"], "<=", 4.5, f"{fmt(ratio['flips'])}x"))

    with tempfile.TemporaryDirectory() as tmp:
        acc = accuracy(cfg, Path(tmp))
    rows = [[m, a["pixel_accuracy"], a["mean_iou"], f"{100 * a['changed_share']:.2f}%"] for m, a in acc["modes"].items()]
    res.tables.append(table(
        f"Accuracy on synthetic stand-in scenes ({acc['scenes']} unseen demo scenes of {acc['size']} x {acc['size']} px; "
        f"a U-Net ResNet-18 trained {acc['epochs']} epoch(s))",
        ["tta", "pixel accuracy", "mean IoU", "pixels whose class changed vs none"], rows))
    res.setup = [
        f"Cost: a {size} x {size} px, {BANDS}-band uint16 raster (DEFLATE, predictor 2, {block} px blocks), the "
        f"inference section's kind; `predict_raster(unet, src, dst, preprocessing, PredictOptions(tile_size="
        f"{cfg.infer_tile}, overlap={cfg.infer_overlap}, batch_size={cfg.infer_batch}, device='cpu', tta=...))` "
        f"with an untrained U-Net ResNet-18 (the cost does not depend on the weights); {cfg.repeats} timed repeats "
        f"of each mode in alternating order after one warm-up run; {torch.get_num_threads()} torch threads. CPU seconds "
        "are this process's (`time.process_time`, the reader threads included): they show the work done when "
        "other work shares the cores and stretches the wall-clock times.",
        f"Accuracy: `configs/demo.yaml` (U-Net ResNet-18, the demo's synthetic scenes of "
        f"`geobp.data.synth.write_scenes`) trained for {acc['epochs']} epoch(s) ({acc['train_seconds']:.0f} s), then "
        f"{acc['scenes']} scenes of another seed that training never saw predicted with `predict_many(task, ..., tta=...)` "
        "(the training tile size, an eighth of it as overlap) and scored against their masks; nodata pixels "
        "are left out.",
    ]
    res.notes = [
        "**The accuracy rows are a synthetic stand-in, not the measurement issue 22 asks for**: the scenes are "
        "geobp's generated demo data (smooth class regions with a per-class spectrum and noise), and no real "
        "dataset could be fetched on the machine that ran this. Measuring TTA's effect on a real land-cover "
        "dataset is still to do.",
    ]
    res.metrics = {"seconds": times, "cpu_seconds": cpu, "ratio": ratio, "cpu_ratio": ratio_cpu, "accuracy": acc}
    return res.to_dict()
