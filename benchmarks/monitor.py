"""Cost of ``GradientFlowMonitor`` by component, from which its default interval is chosen.

One Lightning fit of the U-Net ResNet-18 with ``GradientFlowMonitor(every_n_steps=2)``, so
recording (even) and tracked-only (odd) steps alternate under the same machine load. Each step
is timed with the host clock (and a device sync at each mark on CUDA):

- per-step cost: the monitor's hooks on tracked-only steps: ``on_train_batch_start`` (each
  tile's largest input value per band, kept on the device), ``on_before_optimizer_step`` (the
  fused norm of every gradient into the device ring, and on CPU or under fp16 one finiteness
  read) and ``on_train_batch_end``;
- per-recording cost: those hooks on recording steps minus the per-step cost (the recording,
  the weight copy before the optimizer step and the update ratios after it), plus the extra
  forward+backward time of recording steps (the skip taps' hooks);
- expected overhead at ``every_n_steps = N``: ``(per-step + per-recording / N) / step``, with
  the step time of the same run's tracked-only steps less the per-step cost;
- the interval: the smallest of :data:`INTERVALS` whose recordings take at most :data:`BUDGET`
  of a step (``per-recording / (N x step)``).

Each component is the lower quartile of its timed steps: other load on the machine only adds
time, and the taps' cost is a difference of two forward+backward times, which medians of a
busy machine blur. The training section runs
this on the CPU; ``python -m benchmarks monitor-cost --device cuda --batch 16 --size 256
--precision 16-mixed`` runs it on a GPU (only ``geobp.models`` and ``geobp.callbacks`` are
imported: no raster I/O stack needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import make_batches
from geobp.callbacks import GradientFlowMonitor
from geobp.models import create_model

#: Largest share of a step the recordings may take (per-recording cost / (interval x step)) for
#: an interval to be chosen: half the 3% target, leaving the rest for the per-step cost (which no
#: interval changes) and for noise.
BUDGET = 0.015
INTERVALS = (1, 5, 10, 25, 50, 100)


class Segmenter(L.LightningModule):
    """U-Net ResNet-18, cross-entropy, AdamW: the training step of ``geobp fit`` without geobp.task."""

    def __init__(self, bands: int, classes: int) -> None:
        super().__init__()
        self.model = create_model("unet", encoder="resnet18", in_channels=bands, num_classes=classes)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.model(batch["image"]).float(), batch["mask"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-4)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timer(L.Callback):
    """Per step: forward+backward (batch start to the optimizer hook), the whole step, the monitor's hooks."""

    def __init__(self) -> None:
        self.fwd_bwd: dict[int, float] = {}
        self.hook: dict[int, float] = {}
        self.start: dict[int, float] = {}  # the monitor's on_train_batch_start
        self.end: dict[int, float] = {}  # the monitor's on_train_batch_end (after the timer's step mark)
        self.step: dict[int, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self._t0 = time.perf_counter()

    def mark_fwd_bwd(self, step: int) -> None:
        _sync()
        self.fwd_bwd[step] = time.perf_counter() - self._t0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.step[trainer.global_step - 1] = time.perf_counter() - self._t0


class _TimedMonitor(GradientFlowMonitor):
    def __init__(self, timer: _Timer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timer = timer

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_start(trainer, *args)
        _sync()
        self.timer.start[trainer.global_step] = time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        self.timer.mark_fwd_bwd(step)
        t0 = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        _sync()
        self.timer.hook[step] = time.perf_counter() - t0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        _sync()
        self.timer.end[trainer.global_step - 1] = time.perf_counter() - t0


def measure(batches: Sequence[dict[str, Any]], warmup: int, device: str = "cpu", precision: str = "32-true",
            clip: float = 1.0) -> dict[str, Any]:
    """Time the monitor's parts in one fit over ``batches`` (the first ``warmup`` steps not timed).

    Args:
        batches: batches in the batch contract (``image`` [B, C, H, W], ``mask`` [B, H, W]).
        warmup: steps left out at the start.
        device: Lightning accelerator (``cpu``, ``cuda``).
        precision: Lightning precision (e.g. ``16-mixed``).
        clip: ``gradient_clip_val``.

    Returns:
        Milliseconds: ``step`` (a step without the monitor), ``per_step`` (the monitor's hooks on a
        tracked step), ``hook_recording`` (its hooks on a recording step), ``update_ratio`` (of
        those, the batch-end hook's extra time on a recording step: the update ratios), ``taps``,
        ``per_recording``; ``overhead`` (fraction of a step) per interval in
        :data:`INTERVALS`; ``interval``, the smallest of them whose recordings take at most
        ``budget`` (:data:`BUDGET`) of a step; the sample counts.
    """
    torch.manual_seed(0)
    timer = _Timer()
    monitor = _TimedMonitor(timer, every_n_steps=2, write_report=False, log_to_logger=False, warn=False)
    bands, classes = batches[0]["image"].shape[1], int(max(int(b["mask"].max()) for b in batches)) + 1
    trainer = L.Trainer(max_steps=len(batches), accelerator=device, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer, monitor], gradient_clip_val=clip, default_root_dir="/tmp/geobp-monitor-cost")
    loader = torch.utils.data.DataLoader(list(batches), batch_size=None, shuffle=False, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Segmenter(bands, classes), loader)
    timed = [s for s in range(warmup, len(batches))
             if s in timer.hook and s in timer.step and s in timer.start and s in timer.end]
    rec, trk = [s for s in timed if s % 2 == 0], [s for s in timed if s % 2 == 1]

    def low(values: Any) -> float:  # the lower quartile (see the module doc)
        values = list(values)
        return statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]

    def hooks(s: int) -> float:
        return timer.start[s] + timer.hook[s] + timer.end[s]

    per_step = low(hooks(s) for s in trk)
    hook_recording = low(hooks(s) for s in rec)
    update_ratio = low(timer.end[s] for s in rec) - low(timer.end[s] for s in trk)
    taps = low(timer.fwd_bwd[s] - timer.start[s] for s in rec) - low(timer.fwd_bwd[s] - timer.start[s] for s in trk)
    per_recording = hook_recording - per_step + taps
    # the timer's step ends before the monitor's batch-end hook: take out the other two
    step = low(timer.step[s] - timer.start[s] - timer.hook[s] for s in trk)
    overhead = {n: (per_step + per_recording / n) / step for n in INTERVALS}
    interval = next((n for n in INTERVALS if per_recording / (n * step) <= BUDGET), INTERVALS[-1])
    ms = {k: 1e3 * v for k, v in (("step", step), ("per_step", per_step), ("hook_recording", hook_recording),
                                  ("update_ratio", update_ratio), ("taps", taps), ("per_recording", per_recording))}
    return {**ms, "overhead": overhead, "interval": interval, "budget": BUDGET, "recording_steps": len(rec),
            "tracked_steps": len(trk), "device": device, "precision": precision}


def describe(r: dict[str, Any]) -> str:
    """The result as text."""
    lines = [
        f"  step without the monitor:       {r['step']:8.2f} ms",
        f"  per-step cost (tracked step):   {r['per_step']:8.2f} ms = {100 * r['per_step'] / r['step']:.2f}% of a step",
        f"  hooks on a recording step:      {r['hook_recording']:8.2f} ms (update ratios after the optimizer "
        f"step {r['update_ratio']:+.2f} ms); skip taps in forward+backward {r['taps']:+.2f} ms",
        f"  per-recording cost:             {r['per_recording']:8.2f} ms = {100 * r['per_recording'] / r['step']:.1f}% "
        "of a step",
    ]
    lines += [f"  every_n_steps={n:>3}: expected overhead {100 * v:.2f}%" for n, v in r["overhead"].items()]
    lines.append(f"  smallest interval whose recordings take <= {100 * BUDGET:.1f}% of a step: {r['interval']} "
                 f"({r['recording_steps']} recording and {r['tracked_steps']} tracked steps timed)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks monitor-cost``: measure on any device and print the components."""
    p = argparse.ArgumentParser(prog="python -m benchmarks monitor-cost", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps (half of them recordings)")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    batches = make_batches(args.warmup + args.steps, args.batch, args.size)
    result = measure(batches, args.warmup, args.device, args.precision)
    print(f"device={args.device} precision={args.precision} batch={args.batch}x6x{args.size}x{args.size} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(describe(result))
    return 0
