"""Overhead of GradientFlowMonitor on a geobp U-Net (ResNet-18), to choose ``every_n_steps``.

Not a test (pytest does not collect it). Run::

    python tests/callbacks/bench_gradflow_overhead.py --device cpu --batch 3 --size 128
    python tests/callbacks/bench_gradflow_overhead.py --device cuda --batch 16 --size 256 --precision 16-mixed

It trains the same model twice, alternately, and times with the host clock and a device sync
at each mark:

- ``base``: no monitor;
- ``monitored``: ``every_n_steps=2``, so recording (even) and tracked-only (odd) steps alternate
  under the same machine load.

Measured per step: forward+backward (batch start to ``on_before_optimizer_step``), the
monitor's ``on_before_optimizer_step`` itself, and the whole step. From them:

- per-step cost: the monitor hook on tracked-only steps (fused total norm, device counters);
- per-recording cost: the hook on recording steps minus the per-step cost, plus the extra
  forward+backward time of recording steps (the skip taps' hooks);
- overhead at ``every_n_steps = N``: ``(per-step + per-recording / N) / base step``.

``--mode wall`` instead times whole asynchronous steps (a device sync only at both ends of the
timed window) without a monitor, with tracking only, and with each ``--every`` value: the
overhead as training sees it, where the host launches the monitor's kernels while the device
still runs the backward pass.

Only ``geobp.models`` and ``geobp.callbacks`` are imported (no raster I/O stack needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from geobp.callbacks import GradientFlowMonitor
from geobp.models import create_model


class Tiles(Dataset):
    """``n`` samples drawn from a pool of 8 made once, so that loading costs next to nothing."""

    def __init__(self, n: int, bands: int, size: int, classes: int) -> None:
        self.n = n
        g = torch.Generator().manual_seed(0)
        masks = torch.randint(0, classes, (8, size, size), generator=g)
        images = torch.randn(8, bands, size, size, generator=g) + masks[:, None].float() / classes
        self.pool = [{"image": images[i], "mask": masks[i], "scene": f"s{i % 3}",
                      "window": torch.tensor([0, 0, size, size])} for i in range(8)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.pool[i % 8]


class Segmenter(L.LightningModule):
    def __init__(self, bands: int, classes: int) -> None:
        super().__init__()
        self.model = create_model("unet", encoder="resnet18", in_channels=bands, num_classes=classes)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.model(batch["image"]).float(), batch["mask"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Per step: forward+backward time, optimizer-hook time of the monitor, whole step time."""

    def __init__(self) -> None:
        self.fwd_bwd: dict[int, float] = {}
        self.hook: dict[int, float] = {}
        self.step: dict[int, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.fwd_bwd[trainer.global_step] = time.perf_counter() - self._t0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.step[trainer.global_step - 1] = time.perf_counter() - self._t0


class TimedMonitor(GradientFlowMonitor):
    def __init__(self, timer: StepTimer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timer = timer

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.timer.on_before_optimizer_step(trainer)
        t0 = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        _sync()
        self.timer.hook[trainer.global_step] = time.perf_counter() - t0


class WindowTimer(L.Callback):
    """Wall time of the steps after the warm-up, with a device sync only at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync()
            self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.seconds = time.perf_counter() - self._t0


def run_wall(every: int | None, args: argparse.Namespace) -> float:
    """Mean step time (s) over ``args.steps`` steps, asynchronous as in real training."""
    torch.manual_seed(0)
    timer = WindowTimer(args.warmup)
    callbacks: list[L.Callback] = [timer]
    if every is not None:
        callbacks.append(GradientFlowMonitor(every_n_steps=every, write_report=False, log_to_logger=False,
                                             warn=False))
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        gradient_clip_val=1.0, default_root_dir="/tmp/gradflow-bench")
    data = Tiles(args.batch * (args.warmup + args.steps), args.bands, args.size, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Segmenter(args.bands, 5), DataLoader(data, batch_size=args.batch, num_workers=0))
    return timer.seconds / args.steps


def main_wall(args: argparse.Namespace) -> None:
    configs: dict[str, int | None] = {"base": None, "track only": 10**9, **{f"every {n}": n for n in args.every}}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits every configuration
        for name, every in configs.items():
            times[name].append(run_wall(every, args))
    print(f"wall mode: device={args.device} precision={args.precision} "
          f"batch={args.batch}x{args.bands}x{args.size}x{args.size} steps={args.steps} torch={torch.__version__}")
    base = statistics.median(times["base"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:>10}: {1e3 * med:8.2f} ms/step  ({100 * (med / base - 1):+.2f}%)  runs: "
              + ", ".join(f"{1e3 * t:.2f}" for t in ts))


def run(monitored: bool, args: argparse.Namespace) -> StepTimer:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if monitored:
        callbacks.append(TimedMonitor(timer, every_n_steps=2, write_report=False, log_to_logger=False, warn=False))
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        gradient_clip_val=1.0, default_root_dir="/tmp/gradflow-bench")
    data = Tiles(args.batch * (args.warmup + args.steps), args.bands, args.size, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Segmenter(args.bands, 5), DataLoader(data, batch_size=args.batch, num_workers=0))
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--bands", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each configuration")
    parser.add_argument("--mode", choices=["components", "wall"], default="components",
                        help="components: synchronized timings of each part; wall: asynchronous steps end to end")
    parser.add_argument("--every", type=int, nargs="*", default=[25, 50], help="wall mode: every_n_steps to run")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    if args.mode == "wall":
        main_wall(args)
        return
    base: list[float] = []
    rec: dict[str, list[float]] = {"fwd_bwd": [], "hook": []}
    trk: dict[str, list[float]] = {"fwd_bwd": [], "hook": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both runs
        base += [t for s, t in run(False, args).step.items() if s >= args.warmup]
        timer = run(True, args)
        for s in range(args.warmup, args.warmup + args.steps):
            into = rec if s % 2 == 0 else trk
            into["fwd_bwd"].append(timer.fwd_bwd[s])
            into["hook"].append(timer.hook[s])
    med = statistics.median
    step = med(base)
    per_step = med(trk["hook"])
    taps = med(rec["fwd_bwd"]) - med(trk["fwd_bwd"])
    per_record = med(rec["hook"]) - per_step + taps
    print(f"device={args.device} precision={args.precision} batch={args.batch}x{args.bands}x{args.size}x{args.size} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"  base step (no monitor):         {1e3 * step:8.2f} ms  (n={len(base)})")
    print(f"  monitor hook, tracked step:     {1e3 * per_step:8.2f} ms")
    print(f"  monitor hook, recording step:   {1e3 * med(rec['hook']):8.2f} ms")
    print(f"  forward+backward, tracked step: {1e3 * med(trk['fwd_bwd']):8.2f} ms; recording step "
          f"{1e3 * med(rec['fwd_bwd']):.2f} ms (skip taps {1e3 * taps:+.2f} ms)")
    print(f"  per-step cost {1e3 * per_step:.2f} ms = {100 * per_step / step:.2f}% of a step; "
          f"one recording {1e3 * per_record:.2f} ms = {100 * per_record / step:.1f}% of a step")
    for n in (1, 5, 10, 25, 50, 100):
        print(f"  every_n_steps={n:>3}: overhead {100 * (per_step + per_record / n) / step:.2f}%")

if __name__ == "__main__":
    main()
