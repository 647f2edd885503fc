"""GPU benchmark: U-Net ResNet-34 at 512 x 512, bf16, channels-last (``configs/gpu.yaml``).

Measures on one CUDA device, in this order, writing the result file after each part (a run cut
short keeps what it measured; parts that would not fit in ``--budget-s`` are listed as skipped):

1. the device's bf16 matmul throughput (8192^3 matmuls), the measured limit, and the model's FLOPs
   per image (``torch.utils.flop_counter.FlopCounterMode``), forward and training step;
2. a hand-written training step (forward, cross-entropy, backward, clipping at 1.0, AdamW under
   ``torch.autocast(dtype=torch.bfloat16)``): ``bare_train_images_per_s``; and the forward pass
   under ``torch.inference_mode()``: ``infer_images_per_s``;
3. (the compiled variants last, after part 4, as their compilation takes longest)
   ``Trainer.fit(SegmentationTask)`` with the gradient-flow monitor at its default interval,
   ``bf16-mixed``, clipping 1.0: the variants ``eager`` (``model.fused: false``, so the
   non-finite check reads a flag on the host every step), ``fused`` (the fused AdamW, with which
   ``nonfinite: skip`` is decided on the device), ``compile`` (``model.compile``) and
   ``compile+fused`` (:mod:`benchmarks.gpu_train`);
   ``train_images_per_s`` is the fastest, ``train_config`` names it, ``train_share`` is its
   model TFLOP/s over the matmul TFLOP/s. A ``torch.profiler`` summary of a few steps of each
   variant (top kernels, GPU busy share, host gaps) goes to ``<out stem>_profile.txt``, and the
   host synchronisations of a step are counted (``torch.cuda.set_sync_debug_mode``);
4. ``geobp infer`` over a DEFLATE GeoTIFF of ``--raster`` px (16384 x 16384, 6 bands uint16,
   written here): ``pipeline_images_per_s``, ``pipeline_over_forward``, and the decode limit of
   that file, ``decode_limit_images_per_s`` (:mod:`benchmarks.gpu_pipeline`).

Parts 1 and 2 need only torch, torchvision and ``geobp.models``; parts 3 and 4 need Lightning,
rasterio and what geobp imports, and are listed as skipped when those are missing::

    python benchmarks/gpu.py --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.json      # tiny sizes on the CPU: checks it runs

``scripts/gpu_bench.sh`` runs it on a lent GPU machine; ``python -m benchmarks render`` puts the
result into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: make geobp importable
    sys.path.insert(0, str(REPO))

from geobp.atomic import atomic_write_text  # noqa: E402  (standard library only)
from benchmarks.gpu_train import CLASSES, IN_CHANNELS, VARIANTS, Variant, profile_summary, train_variant  # noqa: E402
from geobp.models import create_model  # noqa: E402  (torch and torchvision only)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` timings of ``steps`` calls each, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - start) / steps)
    return out


def matmul_tflops(device: torch.device, n: int, steps: int, warmup: int, repeats: int) -> float:
    """Median bf16 TFLOP/s of an ``n`` x ``n`` x ``n`` matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: torch.mm(a, b), device, steps, warmup, repeats)
    return 2 * n**3 / statistics.median(seconds) / 1e12


def count_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(forward FLOPs, training-step FLOPs: forward + backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.autocast(device.type, dtype=torch.bfloat16):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x)
        with FlopCounterMode(display=False) as train:
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops() / len(x), train.get_total_flops() / len(x)


def measure_bare(device: torch.device, batch: int, size: int, encoder: str, matmul: int, steps: int, warmup: int,
                 repeats: int) -> dict[str, object]:
    """Parts 1 and 2: matmul TFLOP/s, FLOPs per image, the hand-written training step and the forward pass."""
    tflops = matmul_tflops(device, matmul, max(steps, 10), warmup, repeats)
    model = create_model("unet", encoder=encoder, in_channels=IN_CHANNELS, num_classes=CLASSES)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, IN_CHANNELS, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch, size, size), device=device)
    fwd_flops, train_flops = count_flops(model, x[:2], y[:2], device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)  # SegmentationTask's defaults

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    bare_s = timed(train_step, device, steps, warmup, repeats)

    def infer_step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    model.eval()
    infer_s = timed(infer_step, device, steps, warmup, repeats)
    bare_ips = batch / statistics.median(bare_s)
    infer_ips = batch / statistics.median(infer_s)
    return {
        "matmul_tflops": tflops, "matmul_n": matmul,
        "forward_gflop_per_image": fwd_flops / 1e9, "train_gflop_per_image": train_flops / 1e9,
        "bare_train_images_per_s": bare_ips, "bare_train_share": bare_ips * train_flops / 1e12 / tflops,
        "infer_images_per_s": infer_ips, "infer_tflops": infer_ips * fwd_flops / 1e12,
        "infer_share": infer_ips * fwd_flops / 1e12 / tflops,
        "bare_train_step_s": bare_s, "infer_step_s": infer_s,
    }


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or os.environ.get("GEOBP_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GEOBP_COMMIT", "unknown")


def _device_info(device: torch.device) -> dict[str, object]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "capability": f"{props.major}.{props.minor}", "torch": torch.__version__}
    return {"name": "CPU (dry run)", "memory_gib": None, "cuda": None, "torch": torch.__version__}


class Budget:
    """Seconds left of ``--budget-s``: a part starts only when its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def fits(self, need_s: float) -> bool:
        return time.monotonic() + need_s <= self.end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file (benchmarks/results/gpu.json)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="tile size in pixels")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (hand-written loop, forward)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul", type=int, default=8192, help="matmul size n (n x n x n)")
    p.add_argument("--train-steps", type=int, default=75, help="timed Lightning steps per variant (3 monitor intervals)")
    p.add_argument("--train-warmup", type=int, default=25, help="Lightning steps before timing (compilation included)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="Lightning variants to measure")
    p.add_argument("--raster", type=int, default=16384, help="side of the pipeline's GeoTIFF in pixels")
    p.add_argument("--decode-s", type=float, default=5.0, help="seconds of the one-core decode loop")
    p.add_argument("--budget-s", type=float, default=420.0, help="parts that would not fit are skipped")
    p.add_argument("--work", type=Path, default=None, help="folder for the raster and outputs (a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU allowed: checks that the script runs")
    a = p.parse_args(argv)
    # rough seconds each part needs on an H100/H200 (compilation dominates the compiled variants)
    need = {"variant": 40.0, "compiled": 150.0, "pipeline": 120.0}
    every_n: int | None = None  # the monitor's default interval
    if a.dry_run:
        a.batch, a.size, a.steps, a.warmup, a.repeats, a.matmul, a.encoder = 2, 32, 2, 1, 1, 256, "resnet18"
        a.train_steps, a.train_warmup, a.profile_steps, a.raster, a.decode_s = 3, 2, 2, 256, 0.2
        need = {k: 0.0 for k in need}
        every_n = 2  # a recording inside the few timed steps
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif a.dry_run:
        device = torch.device("cpu")
    else:
        print("no CUDA device: this benchmark needs a GPU (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    budget = Budget(a.budget_s)
    torch.backends.cudnn.benchmark = True  # as configs/gpu.yaml (fixed tile size)
    torch.manual_seed(0)
    info = _device_info(device)
    result: dict = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": _commit(), "device": info,
        "model": f"U-Net {a.encoder}, {IN_CHANNELS} bands, {CLASSES} classes, {a.size} x {a.size}, bf16, "
                 "channels_last, AdamW, clipping 1.0",
        "batch": a.batch, "steps": a.steps, "repeats": a.repeats, "dry_run": a.dry_run,
        "results": {}, "skipped": {},
    }
    r = result["results"]

    def save() -> None:
        atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")

    # 1-2: limits, FLOPs, hand-written step, forward
    r.update(measure_bare(device, a.batch, a.size, a.encoder, a.matmul, a.steps, a.warmup, a.repeats))
    tflops, train_flops, infer_ips = r["matmul_tflops"], r["train_gflop_per_image"] * 1e9, r["infer_images_per_s"]
    bare_ips = r["bare_train_images_per_s"]
    save()

    # 3-4: Lightning with the monitor (the uncompiled variants), the pipeline, then the compiled variants,
    # whose compilation takes longest: a short budget still gets the pipeline
    profile_text: list[str] = []
    variants: dict = {}

    def run_variant(v: Variant) -> None:
        if not budget.fits(need["compiled" if v.compile else "variant"]):
            result["skipped"][f"train:{v.name}"] = "time budget"
            return
        try:
            if v.compile and a.dry_run:
                import geobp.compiled

                geobp.compiled.BACKEND = "aot_eager"  # the same capture, no code generation: fast on CPUs
            m = train_variant(v, device, a.batch, a.size, a.encoder, a.train_warmup, a.train_steps, every_n,
                              a.profile_steps, a.profile_steps if v.name == "fused" else 0)
        except ImportError as err:
            result["skipped"][f"train:{v.name}"] = f"not importable here: {err}"
            return
        except Exception:  # one variant failing (e.g. compilation) must not lose the others
            result["skipped"][f"train:{v.name}"] = traceback.format_exc(limit=3)[-2000:]
            return
        prof = m.pop("profile", None)
        if prof is not None:
            m["profile"], text = profile_summary(prof, device)
            profile_text.extend([f"===== {v.name}: {a.profile_steps} training steps after the timed ones =====", text, ""])
        variants[v.name] = m
        r["train_variants"] = variants
        best = max(variants, key=lambda k: variants[k]["images_per_s"])
        ips = variants[best]["images_per_s"]
        r.update(train_images_per_s=ips, train_config=best, train_tflops=ips * train_flops / 1e12,
                 train_share=ips * train_flops / 1e12 / tflops)
        if "host_syncs_per_step" in m:
            r["host_syncs_per_step"] = m["host_syncs_per_step"]
        save()
        if profile_text:
            atomic_write_text(a.out.with_name(a.out.stem + "_profile.txt"), "\n".join(profile_text))

    wanted = [v for v in VARIANTS if v.name in a.variants.split(",")]
    for v in wanted:
        if not v.compile:
            run_variant(v)
    if budget.fits(need["pipeline"]):
        try:
            from benchmarks.gpu_pipeline import measure_pipeline

            with tempfile.TemporaryDirectory(dir=a.work) as work:
                pipe = measure_pipeline(Path(work), a.raster, a.size, a.batch, a.encoder, device, a.decode_s)
            r.update(pipe, pipeline_over_forward=pipe["pipeline_images_per_s"] / infer_ips,
                     pipeline_over_decode_limit=pipe["pipeline_images_per_s"] / pipe["decode_limit_images_per_s"])
        except ImportError as err:
            result["skipped"]["pipeline"] = f"not importable here: {err}"
    else:
        result["skipped"]["pipeline"] = "time budget"
    save()
    for v in wanted:
        if v.compile:
            run_variant(v)
    save()

    line = (f"{info['name']}: matmul {r['matmul_tflops']:.1f} TFLOP/s; hand-written training {bare_ips:.1f} img/s; "
            f"forward {infer_ips:.1f} img/s")
    if "train_images_per_s" in r:
        line += (f"; Lightning + monitor {r['train_images_per_s']:.1f} img/s ({r['train_config']}, "
                 f"{100 * r['train_share']:.0f}% of matmul)")
    if "pipeline_images_per_s" in r:
        line += (f"; geobp infer {r['pipeline_images_per_s']:.1f} img/s ({r['pipeline_over_forward']:.2f} of forward, "
                 f"decode limit {r['decode_limit_images_per_s']:.1f})")
    if result["skipped"]:
        line += f"; skipped: {', '.join(result['skipped'])}"
    print(line + f" -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
