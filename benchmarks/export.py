"""Section "export": ``geobp infer`` with an exported model (ONNX Runtime, TorchScript) against the checkpoint.

The same raster (uint16, 6 bands, nodata 0) and options, U-Net ResNet-18, on the CPU with the same
compute threads: the checkpoint path (torch), the ONNX file run by ONNX Runtime's CPU provider and
the TorchScript file run by ``torch.jit``, through :func:`geobp.inference.predict_many`, alternating,
timed from call to return. Issue 22's target: ONNX Runtime at least 0.9 of the checkpoint's tiles/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config, SectionResult, fmt, machine_info, median, spread, table, target

#: What ONNX Runtime's tiles/s must reach, as a share of the checkpoint's (issue 22).
TARGET_RATIO = 0.9


def run(cfg: Config) -> dict[str, Any]:
    import rasterio
    import torch
    from rasterio.transform import from_origin

    from geobp.inference import predict_many
    from geobp.inference.export import ONNX_OPSET, export_model
    from geobp.task import SegmentationTask
    from geobp.tiling import TileGrid

    threads = cfg.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    size, tile, overlap, batch = cfg.infer_size // 2, cfg.infer_tile, cfg.infer_overlap, cfg.infer_batch
    repeats = max(cfg.repeats, 1)
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        pre = {"bands": list(range(1, cfg.bands + 1)), "nodata": 0, "method": "meanstd", "mean": [300.0] * cfg.bands,
               "std": [100.0] * cfg.bands, "low": [], "high": [], "dtype": "uint16"}
        torch.manual_seed(0)
        task = SegmentationTask(encoder="resnet18", in_channels=cfg.bands, num_classes=cfg.classes, preprocessing=pre,
                                tile_size=tile)
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, tmp / "m.ckpt")
        export_s = {}
        for fmt_name, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
            start = time.perf_counter()
            export_model(tmp / "m.ckpt", tmp / name, fmt_name)
            export_s[fmt_name] = time.perf_counter() - start
        img = np.random.default_rng(0).integers(1, 700, (cfg.bands, size, size)).astype("uint16")
        img[:, : size // 8, : size // 8] = 0
        profile = dict(driver="GTiff", width=size, height=size, count=cfg.bands, dtype="uint16", nodata=0, crs="EPSG:32633",
                       transform=from_origin(500000.0, 5000000.0, 10.0, 10.0), tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate")
        with rasterio.open(tmp / "scene.tif", "w", **profile) as dst:
            dst.write(img)
        tiles = sum(map(len, TileGrid.build(size, size, tile, overlap).batches(batch)))
        models = {"checkpoint (torch)": tmp / "m.ckpt", "ONNX Runtime (CPU provider)": tmp / "m.onnx",
                  "TorchScript (torch.jit)": tmp / "m.pt"}
        seconds: dict[str, list[float]] = {label: [] for label in models}
        for rep in range(repeats + 1):  # the first round warms the caches and is not counted
            for n, (label, model) in enumerate(models.items()):
                start = time.perf_counter()
                summary = predict_many(model, [tmp / "scene.tif"], tmp / f"out{n}", tile_size=tile, overlap=overlap,
                                       batch_size=batch, progress=False, overwrite=True)
                elapsed = time.perf_counter() - start
                if not summary.ok:
                    raise RuntimeError(f"{label}: {summary.lines()}")
                if rep:
                    seconds[label].append(elapsed)
                print(f"export: {label}: {elapsed:.2f} s", flush=True)
        maps = []
        for n in range(len(models)):
            with rasterio.open(tmp / f"out{n}" / "scene_classes.tif") as ds:
                maps.append(ds.read(1))
        differing = [int((m != maps[0]).sum()) for m in maps[1:]]
    base = median(seconds["checkpoint (torch)"])
    rows = [[label, tiles / median(s), median(s), spread(s), base / median(s)] for label, s in seconds.items()]
    ratio = base / median(seconds["ONNX Runtime (CPU provider)"])
    machine = machine_info()
    result = SectionResult(
        section="export",
        title="Exported models",
        setup=[f"`predict_many` over one {size} x {size} uint16 raster of {cfg.bands} bands (nodata corner), {tiles} tiles "
               f"of {tile} px with overlap {overlap}, batch {batch}, U-Net ResNet-18 with {cfg.classes} classes, on the CPU "
               f"with {threads} compute threads (ONNX Runtime's intra-op threads set to the same); {repeats} timed rounds "
               "after one warm-up round, the three models alternating.",
               f"ONNX opset {ONNX_OPSET}; export took {fmt(export_s['onnx'])} s (ONNX) and {fmt(export_s['torchscript'])} s "
               "(TorchScript).",
               f"On {machine['cpu']} ({machine['usable_cores']} usable cores)."],
        tables=[table("Whole-raster inference", ["model", "tiles/s", "seconds (median)", "min-max", "x checkpoint"], rows)],
        targets=[target("export: ONNX Runtime / checkpoint, tiles/s", ratio, ">=", TARGET_RATIO, f"{fmt(ratio)}x")],
        notes=[f"Class-map pixels that differ from the checkpoint's: ONNX {differing[0]}, TorchScript {differing[1]} "
               f"(of {size * size})."],
        metrics={"seconds": seconds, "tiles": tiles, "ratio_onnx": ratio, "export_s": export_s, "differing_pixels": differing},
    )
    return result.to_dict()
