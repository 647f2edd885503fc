"""GPU benchmark, training through Lightning: ``SegmentationTask`` with the gradient-flow monitor on,
with and without ``model.compile`` and the fused AdamW, a profile of a few steps, and the host
synchronisations of a step.

Batches are one synthetic batch already on the device, handed out again and again: the numbers
are the training step's (model, loss, metrics, monitor, clipping, optimizer, Lightning), not the
loader's. Needs torch, lightning, torchmetrics and what ``geobp.task`` imports (rasterio too).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

IN_CHANNELS = 6
CLASSES = 5


@dataclass(frozen=True)
class Variant:
    """One training configuration: ``model.compile`` and ``model.fused``."""

    name: str
    compile: bool
    fused: bool


VARIANTS = (Variant("eager", False, False), Variant("fused", False, True),
            Variant("compile", True, False), Variant("compile+fused", True, True))


class _Repeat(Dataset):
    """The same batch ``n`` times."""

    def __init__(self, batch: dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _callbacks(device: torch.device, warmup: int, steps: int, profile_steps: int, sync_steps: int) -> list[Any]:
    """Lightning callbacks timing steps ``[warmup, warmup + steps)``, then profiling
    ``profile_steps`` steps, then counting the host syncs of ``sync_steps`` steps (CUDA only)."""
    import lightning as L

    class Measure(L.Callback):
        def __init__(self) -> None:
            self.seconds: float | None = None
            self.profiler: Any = None
            self._profiled = False
            self.syncs: Counter[str] = Counter()
            self._t0 = 0.0
            self._catch: Any = None
            self._caught: list[Any] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup:
                _sync(device)
                self._t0 = time.perf_counter()
            elif batch_idx == warmup + steps:
                _sync(device)
                self.seconds = time.perf_counter() - self._t0
                if profile_steps:
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if device.type == "cuda":
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    self.profiler = torch.profiler.profile(activities=acts)
                    self.profiler.__enter__()
            if batch_idx == warmup + steps + profile_steps:
                self._stop_profiler()
                if sync_steps and device.type == "cuda":
                    self._catch = warnings.catch_warnings(record=True)
                    self._caught = self._catch.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

        def _stop_profiler(self) -> None:
            if self.profiler is not None and not self._profiled:
                _sync(device)
                self.profiler.__exit__(None, None, None)
                self._profiled = True

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._stop_profiler()  # when the profiled steps were the last ones
            if self._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._catch.__exit__(None, None, None)
                self.syncs = Counter(f"{w.filename}:{w.lineno}" for w in self._caught
                                     if "synchroniz" in str(w.message))

    return [Measure()]


def train_variant(variant: Variant, device: torch.device, batch: int, size: int, encoder: str, warmup: int,
                  steps: int, every_n_steps: int | None, profile_steps: int = 0, sync_steps: int = 0) -> dict[str, Any]:
    """Images/s of ``Trainer.fit(SegmentationTask)`` in ``variant``, bf16-mixed, clipping 1.0,
    channels-last, the gradient-flow monitor at ``every_n_steps`` (its default when None)."""
    import lightning as L

    from geobp.callbacks.gradflow import GradientFlowMonitor
    from geobp.task import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(model="unet", encoder=encoder, in_channels=IN_CHANNELS, num_classes=CLASSES,
                            channels_last=True, scheduler="none", compile=variant.compile, fused=variant.fused)
    monitor = GradientFlowMonitor(write_report=False, warn=False,
                                  **({} if every_n_steps is None else {"every_n_steps": every_n_steps}))
    measure = _callbacks(device, warmup, steps, profile_steps, sync_steps)[0]
    data = {"image": torch.randn(batch, IN_CHANNELS, size, size, device=device),
            "mask": torch.randint(0, CLASSES, (batch, size, size), device=device)}
    total = warmup + steps + profile_steps + sync_steps
    trainer = L.Trainer(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        gradient_clip_val=1.0, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, benchmark=device.type == "cuda",
                        callbacks=[monitor, measure])
    trainer.fit(task, train_dataloaders=DataLoader(_Repeat(data, total), batch_size=None))
    assert measure.seconds is not None, "the timed window did not end"
    compiled = task._compiled
    out: dict[str, Any] = {
        "images_per_s": batch * steps / measure.seconds, "seconds": measure.seconds, "steps": steps,
        "monitor_every_n_steps": monitor.every_n_steps, "recordings": len(monitor.data["steps"]) if monitor.data else 0,
        "fused_adamw": bool(getattr(trainer.optimizers[0], "_step_supports_amp_scaling", False)),
        "compiled_calls": compiled.compiled_calls if compiled else 0,
        "eager_calls": compiled.eager_calls if compiled else None,
    }
    if measure.profiler is not None:
        out["profile"] = measure.profiler
    if sync_steps and device.type == "cuda":
        out["host_syncs_per_step"] = sum(measure.syncs.values()) / sync_steps
        out["host_sync_sites"] = dict(measure.syncs.most_common(10))
    del task, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_summary(prof: Any, device: torch.device, top: int = 15) -> tuple[dict[str, Any], str]:
    """(JSON summary, text table) of a ``torch.profiler`` run: the top kernels by device time and,
    on CUDA, the share of the profiled window the GPU was busy and its largest idle gaps."""
    cuda = device.type == "cuda"
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = averages.table(sort_by=sort, row_limit=top)
    summary: dict[str, Any] = {"sorted_by": sort}
    if not cuda:
        rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        summary["top_ops_ms"] = {e.key: e.self_cpu_time_total / 1e3 for e in rows}
        return summary, text
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: e.self_device_time_total,
                  reverse=True)[:top]
    summary["top_kernels_ms"] = {e.key[:120]: e.self_device_time_total / 1e3 for e in rows}
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    if spans:
        busy, gaps, end = 0.0, [], spans[0][0]
        for s, e in spans:
            if s > end:
                gaps.append(s - end)
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
        window = end - spans[0][0]
        summary.update(gpu_busy_share=busy / window if window else None, window_ms=window / 1e3,
                       idle_ms=(window - busy) / 1e3, largest_gaps_us=sorted(gaps, reverse=True)[:10],
                       kernels=len(kernels))
        text += (f"\nGPU busy {100 * busy / window:.1f}% of the {window / 1e3:.1f} ms window "
                 f"({len(kernels)} kernels); largest idle gaps (us): {[round(g) for g in sorted(gaps, reverse=True)[:10]]}\n")
    return summary, text
