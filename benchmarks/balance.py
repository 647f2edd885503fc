"""Rare classes: uniform against class-balanced tile sampling, on the CPU.

Synthetic scenes (:func:`geobp.data.synth.make_scene`, three classes: water, forest, cropland)
get a fourth class, ``wetland``, painted as one square patch per scene with its own spectral signature
(dark, a small near-infrared bump: close to water and forest) on about 1% of the pixels of every
scene. The same tiny U-Net is trained with the same seed, tiles and steps under each setting; the
table gives the rare class's share of the training pixels, its expected share of the pixels the
sampler shows, and the validation IoU of the rare class and the mean IoU (best checkpoint).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import yaml
from rasterio.transform import from_origin

from benchmarks.common import Config, SectionResult, machine_info, table
from geobp.data.synth import make_scene, spectral_signatures

RARE_NAME = "wetland"
CLASS_NAMES = ["water", "forest", "cropland", RARE_NAME]
RARE_SIGNATURE = 6  # index of wetland among geobp.data.synth's signatures
EPOCHS, TILES, TILE = 8, 128, 32  # per fit (full mode): a few minutes per fit on 2 quiet cores
#: (label, data.sampling, model.class_weights)
VARIANTS: tuple[tuple[str, str, str | None], ...] = (
    ("uniform", "uniform", None),
    ("balanced (power 0.5)", "balanced", None),
)


def write_rare_scenes(out: Path, scenes: int, size: int, bands: int, seed: int, rare_fraction: float = 0.01) -> None:
    """Scenes of three common classes plus a rare fourth on about ``rare_fraction`` of each scene."""
    sig = spectral_signatures(bands, len(CLASS_NAMES) + 3)[RARE_SIGNATURE]  # [bands] reflectance of wetland
    for i in range(scenes):
        image, mask = make_scene(size, bands, 3, seed=seed + i)
        rng = np.random.default_rng(seed + 1000 + i)
        # one patch per scene: rare classes are clustered (a marsh, a quarry), not spread evenly
        side = max(4, round(size * rare_fraction**0.5))
        r, c = rng.integers(0, size - side, size=2)
        mask[r : r + side, c : c + side] = 3
        patch = sig[:, None, None] * (1 + 0.06 * rng.standard_normal((bands, side, side)))
        image[:, r : r + side, c : c + side] = np.clip(np.rint(patch * 10000), 1, 10000).astype(image.dtype)
        for folder, data in (("images", image), ("masks", mask[None])):
            path = out / folder / f"scene_{i:03d}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            profile = dict(driver="GTiff", width=size, height=size, count=data.shape[0], dtype=str(data.dtype),
                           crs="EPSG:32633", transform=from_origin(400000.0 + i * size * 10, 5500000.0, 10.0, 10.0),
                           tiled=True, blockxsize=32, blockysize=32, compress="deflate")
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(data)


def fit_once(root: Path, work: Path, sampling: str, class_weights: str | None, cfg: Config) -> dict[str, Any]:
    """Train one variant; validation metrics of its best checkpoint, and the data module's class summary."""
    from geobp.cli import build_cli

    conf = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 2 if cfg.quick else EPOCHS, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 10,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(work), "name": f"{sampling}-{class_weights}"}}},
        "model": {"encoder": "resnet18", "lr": 3e-3, "class_weights": class_weights,
                  "model_kwargs": {"decoder_channels": [64, 32, 16, 16, 8]}},
        "data": {"root": str(root), "num_classes": 4, "class_names": CLASS_NAMES, "tile_size": TILE,
                 "tiles_per_epoch": 32 if cfg.quick else TILES, "batch_size": 8, "val_fraction": 0.25, "seed": 0,
                 "sampling": sampling},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{sampling}-{class_weights}.yaml"
    path.write_text(yaml.safe_dump(conf))
    cli = build_cli(["--config", str(path)], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    ckpt = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt or None, verbose=False)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "summary": cli.datamodule.class_summary(),
            "fit_s": seconds, "weights": cli.model.hparams["class_weights"]}


def run(cfg: Config) -> dict[str, Any]:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    scenes, size = (4, 128) if cfg.quick else (8, 192)
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "scenes", Path(tmp) / "runs"
        write_rare_scenes(root, scenes, size, bands=4, seed=0)
        results = {}
        for label, sampling, weights in VARIANTS:
            results[label] = fit_once(root, work, sampling, weights, cfg)
            m = results[label]["metrics"]
            print(f"balance: {label}: val IoU {RARE_NAME} {m.get(f'val/IoU_{RARE_NAME}', float('nan')):.3f}, "
                  f"mIoU {m.get('val/mIoU', float('nan')):.3f} ({results[label]['fit_s']:.0f} s)", flush=True)
    k = CLASS_NAMES.index(RARE_NAME)
    rows = []
    for label, _, _ in VARIANTS:
        r = results[label]
        s, m = r["summary"], r["metrics"]
        rows.append([label, f"{100 * s['share'][k]:.2f}%", f"{100 * s['sampled'][k]:.2f}%",
                     m.get(f"val/IoU_{RARE_NAME}", float("nan")),
                     m.get("val/mIoU", float("nan")), round(r["fit_s"])])
    machine = machine_info()
    epochs = 2 if cfg.quick else EPOCHS
    tiles = 32 if cfg.quick else TILES
    result = SectionResult(
        section="balance",
        title="Rare classes: uniform and balanced sampling",
        setup=[f"{scenes} synthetic scenes of {size}x{size} px, 4 bands, 32 px blocks: water, forest, cropland "
               f"(geobp.data.synth) and a rare `{RARE_NAME}` painted as one square patch on ~1% of each scene; "
               f"split by scene (25% validation)",
               f"U-Net ResNet-18 (decoder 64-32-16-16-8), {TILE} px tiles, batch 8, {tiles} tiles x {epochs} epochs, "
               "AdamW lr 3e-3, seed 0, the same for every row; IoU of the best checkpoint (val/mIoU)",
               f"on {machine['cpu']} ({machine['usable_cores']} usable cores), {torch.get_num_threads()} torch thread(s); "
               "the fit times are the machine's under the load stated above"],
        tables=[table(f"Rare class `{RARE_NAME}`: training share, share shown by the sampler, validation IoU",
                      ["run", "share of training pixels", "expected share in training tiles",
                       f"val IoU {RARE_NAME}", "val mIoU", "fit (s)"], rows)],
        notes=["One run per row, seed 0; the spread from seed to seed is not measured here, so a difference of a few "
               "hundredths in IoU is not significant on its own."],
        metrics={label: {"metrics": r["metrics"], "summary": r["summary"], "fit_s": r["fit_s"]} for label, r in results.items()},
    )
    return result.to_dict()
