"""GPU benchmark: U-Net ResNet-34 at 512 x 512, bf16 autocast, channels-last (``configs/gpu.yaml``).

Measures on one CUDA device:

- training images/s: forward, cross-entropy, backward, gradient clipping at 1.0, AdamW step,
  under ``torch.autocast(dtype=torch.bfloat16)`` with the model and input in channels-last;
- inference images/s: forward under ``torch.inference_mode()`` and the same autocast;
- the device's bf16 matmul throughput (8192^3 matmuls), the measured limit;
- FLOPs per image of the model (``torch.utils.flop_counter.FlopCounterMode``), forward and a
  whole training step, and so the achieved TFLOP/s as a share of the measured matmul TFLOP/s.

Needs only torch, torchvision and ``geobp.models`` (no rasterio, no Lightning)::

    python benchmarks/gpu.py --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.json      # tiny sizes on the CPU: checks it runs

Then ``python -m benchmarks render`` puts the result into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: make geobp importable
    sys.path.insert(0, str(REPO))

from geobp.atomic import atomic_write_text  # noqa: E402  (standard library only)
from geobp.models import create_model  # noqa: E402  (torch and torchvision only)

IN_CHANNELS = 6
CLASSES = 5


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file (benchmarks/results/gpu.json)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="tile size in pixels")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul", type=int, default=8192, help="matmul size n (n x n x n)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU allowed: checks that the script runs")
    a = p.parse_args(argv)
    if a.dry_run:
        a.batch, a.size, a.steps, a.warmup, a.repeats, a.matmul = 2, 64, 2, 1, 1, 256
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif a.dry_run:
        device = torch.device("cpu")
    else:
        print("no CUDA device: this benchmark needs a GPU (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as configs/gpu.yaml (fixed tile size)
    torch.manual_seed(0)

    tflops = matmul_tflops(device, a.matmul, max(a.steps, 10), a.warmup, a.repeats)

    model = create_model("unet", encoder=a.encoder, in_channels=IN_CHANNELS, num_classes=CLASSES)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, IN_CHANNELS, a.size, a.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (a.batch, a.size, a.size), device=device)
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
    train_s = timed(train_step, device, a.steps, a.warmup, a.repeats)

    def infer_step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    model.eval()
    infer_s = timed(infer_step, device, a.steps, a.warmup, a.repeats)

    train_ips = a.batch / statistics.median(train_s)
    infer_ips = a.batch / statistics.median(infer_s)
    train_tflops = train_ips * train_flops / 1e12
    infer_tflops = infer_ips * fwd_flops / 1e12
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "capability": f"{props.major}.{props.minor}", "torch": torch.__version__}
    else:
        info = {"name": "CPU (dry run)", "memory_gib": None, "cuda": None, "torch": torch.__version__}
    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": info,
        "model": f"U-Net {a.encoder}, {IN_CHANNELS} bands, {CLASSES} classes, {a.size} x {a.size}, bf16 autocast, "
                 "channels_last, AdamW, clipping 1.0",
        "batch": a.batch, "steps": a.steps, "repeats": a.repeats, "dry_run": a.dry_run,
        "results": {
            "matmul_tflops": tflops, "matmul_n": a.matmul,
            "train_images_per_s": train_ips, "infer_images_per_s": infer_ips,
            "forward_gflop_per_image": fwd_flops / 1e9, "train_gflop_per_image": train_flops / 1e9,
            "train_tflops": train_tflops, "infer_tflops": infer_tflops,
            "train_share": train_tflops / tflops, "infer_share": infer_tflops / tflops,
            "train_step_s": train_s, "infer_step_s": infer_s,
        },
    }
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    r = result["results"]
    print(f"{info['name']}: matmul {r['matmul_tflops']:.1f} TFLOP/s; training {train_ips:.1f} img/s "
          f"({train_tflops:.1f} TFLOP/s, {100 * r['train_share']:.0f}%); inference {infer_ips:.1f} img/s "
          f"({infer_tflops:.1f} TFLOP/s, {100 * r['infer_share']:.0f}%) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
