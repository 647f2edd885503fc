"""Section "training": Lightning step time against a hand-written loop, and gradient-flow monitor cost.

Both fit the same U-Net ResNet-18 (same initial weights) on the same batches, pre-generated in
memory in the batch contract and served by a DataLoader over a list, with AdamW, fp32 and
gradient clipping at norm 1.0:

- hand-written: forward, cross-entropy, ``zero_grad``, backward, ``clip_grad_norm_``, step;
- Lightning: ``Trainer(accelerator="cpu", gradient_clip_val=1.0, logger=False, ...)`` fitting
  ``SegmentationTask`` with its defaults (cosine schedule per step, train metrics per step).

A step is the time between the ends of consecutive optimizer steps, so it includes fetching
the batch and every hook. Warm-up steps are left out.

The gradient-flow monitor is timed twice: end to end (Lightning with and without it, compared on
a burst-robust mean) and by component (:mod:`benchmarks.monitor`: per-step and per-recording
cost, and the overhead they predict at each interval).
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
import warnings
from typing import Any

import torch

from benchmarks.common import Config, SectionResult, fmt, make_batches, median, spread, table, target

ENCODER = "resnet18"
IN_CHANNELS = 6
CLASSES = 5
IGNORE_INDEX = 255


def _loader(batches: list[dict[str, Any]]) -> torch.utils.data.DataLoader:
    # batch_size=None: each list item already is a batch
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def hand_loop(batches: list[dict[str, Any]], seed: int = 0) -> list[float]:
    """Step durations (s) of a plain PyTorch loop: same model, optimizer, clipping, precision."""
    import torch.nn.functional as F

    from geobp.models import create_model

    torch.manual_seed(seed)
    model = create_model("unet", encoder=ENCODER, in_channels=IN_CHANNELS, num_classes=CLASSES)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)  # SegmentationTask's defaults
    ends = [time.perf_counter()]
    for batch in _loader(batches):
        logits = model(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


def robust_mean(durations: list[float], period: int | None, warmup: int) -> float:
    """Mean step time with periodic work counted and bursts of outside load left out.

    Timed step ``i`` is optimizer step ``i + warmup``; a monitor recording every ``period`` steps
    records on steps that are multiples of ``period``. Returns ``(k-1)/k * median(other steps) +
    1/k * median(recording steps)``, or the median when there is no periodic work.
    """
    if not period or period == 1 or not durations:
        return median(durations)
    rec = [d for i, d in enumerate(durations) if (i + warmup) % period == 0]
    other = [d for i, d in enumerate(durations) if (i + warmup) % period != 0]
    if not rec or not other:
        return median(durations)
    return ((period - 1) * median(other) + median(rec)) / period


def monitor_cost(cfg: Config, warm: int) -> dict[str, Any]:
    """The monitor's cost by component (:func:`benchmarks.monitor.measure`) on this section's batches."""
    from benchmarks.monitor import measure

    batches = make_batches(warm + cfg.monitor_cost_steps, cfg.train_batch, cfg.train_size, IN_CHANNELS, CLASSES, seed=1)
    return measure(batches, warm)


def monitor_class() -> tuple[type | None, str]:
    """``GradientFlowMonitor`` if importable, else None and why."""
    try:
        from geobp.callbacks import GradientFlowMonitor
    except Exception as err:  # not written yet, or broken
        return None, f"geobp.callbacks.GradientFlowMonitor not available ({type(err).__name__}: {err})"
    return GradientFlowMonitor, ""


def default_interval(cls: type) -> int:
    return int(inspect.signature(cls.__init__).parameters["every_n_steps"].default)


def lightning_fit(batches: list[dict[str, Any]], seed: int = 0, callbacks: list[Any] | None = None) -> list[float]:
    """Step durations (s) of ``Trainer.fit(SegmentationTask)`` on the same batches."""
    import lightning as L

    from geobp.task import SegmentationTask

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.ends.append(time.perf_counter())

    torch.manual_seed(seed)
    task = SegmentationTask(encoder=ENCODER, in_channels=IN_CHANNELS, num_classes=CLASSES, ignore_index=IGNORE_INDEX)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer = L.Trainer(
            accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, gradient_clip_val=1.0, default_root_dir=tmp,
            callbacks=[*(callbacks or []), timer],
        )
        trainer.fit(task, train_dataloaders=_loader(batches))
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])]


def run(cfg: Config) -> dict[str, Any]:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    monitor, why_not = monitor_class()
    every = default_interval(monitor) if monitor else 1
    steps = cfg.train_steps
    if monitor and not cfg.quick:  # timed steps: a whole number of monitor intervals, at least monitor_steps
        steps = max(steps, math.ceil(cfg.monitor_steps / every) * every)
    warm = cfg.train_warmup
    batches = make_batches(warm + steps, cfg.train_batch, cfg.train_size, IN_CHANNELS, CLASSES)

    # name: (run, period of the monitor's recordings or None)
    variants: dict[str, tuple[Any, int | None]] = {
        "hand": (lambda: hand_loop(batches), None),
        "lightning": (lambda: lightning_fit(batches), None),
    }
    if monitor:
        variants["monitored"] = (lambda: lightning_fit(batches, callbacks=[monitor()]), every)
    # The ratios compared here are a few percent, less than this shared machine's speed drifts over
    # minutes (run medians of one loop have moved by 25% within one section): every round runs all
    # loops back to back, in an order rotating from round to round, and the targets take the median
    # over rounds of the ratios within a round.
    rounds = max(cfg.repeats, cfg.monitor_pairs if monitor else 0)
    stats: dict[str, dict[str, list[float]]] = {k: {"median": [], "mean": [], "robust": []} for k in variants}
    steps_ms: dict[str, list[list[float]]] = {k: [] for k in variants}  # every timed step, for inspection
    names = list(variants)
    for rnd in range(rounds):
        k = rnd % len(names)
        order = names[k:] + names[:k]
        if rnd % 2:
            order.reverse()
        for name in order:
            fn, period = variants[name]
            durations = fn()[warm:]
            st = stats[name]
            st["median"].append(median(durations))
            st["mean"].append(sum(durations) / len(durations))
            st["robust"].append(robust_mean(durations, period, warm))
            steps_ms[name].append([round(1e3 * d, 2) for d in durations])
            print(f"training: round {rnd} {name}: median {1e3 * st['median'][-1]:.1f} ms, mean "
                  f"{1e3 * st['mean'][-1]:.1f} ms, robust mean {1e3 * st['robust'][-1]:.1f} ms", flush=True)
    # robust mean step (s) of the fits without ("off") and with ("on") the monitor, round by round
    pairs: list[dict[str, float]] = (
        [{"off": a, "on": b} for a, b in zip(stats["lightning"]["robust"], stats["monitored"]["robust"])] if monitor else []
    )
    stats.pop("monitored", None)
    steps_ms.pop("monitored", None)

    ms = {k: median(v["median"]) * 1e3 for k, v in stats.items()}
    mean_ms = {k: median(v["mean"]) * 1e3 for k, v in stats.items()}
    robust_ms = {k: median(v["robust"]) * 1e3 for k, v in stats.items()}
    n = f"{steps} x {rounds}"
    round_ratios = [a / b for a, b in zip(stats["lightning"]["median"], stats["hand"]["median"])]
    ratio = median(round_ratios)

    def row(label: str, key: str) -> list[Any]:
        by_round = [a / b for a, b in zip(stats[key]["median"], stats["hand"]["median"])]
        return [label, ms[key], spread([v * 1e3 for v in stats[key]["median"]]), mean_ms[key], robust_ms[key], n,
                median(by_round), ", ".join(f"{v:.2f}" for v in by_round)]

    step_rows = [row("hand-written PyTorch loop", "hand"), row("Lightning `Trainer.fit(SegmentationTask)`", "lightning")]
    tables = [table("Step time", ["loop", "median step (ms)", "min-max of run medians", "mean step (ms)",
                                  "robust mean (ms)", "steps x n", "vs hand-written, median of rounds",
                                  "vs hand-written, each round"], step_rows)]
    targets = [target("training: Lightning step / hand-written step (median step, median of rounds)", ratio, "<=", 1.05, f"{fmt(ratio)}x")]
    notes = [
        "The Lightning side also runs what geobp's task does on every step and the loop does not: "
        "the cosine learning-rate schedule, `self.log` of the loss and the update of the train metrics "
        "(mIoU, per-class IoU, F1, accuracy).",
        "Robust mean: the mean step time with periodic work counted but bursts of other load on the machine left "
        "out: for a run with a monitor recording every k steps, (k-1)/k x the median of the other steps + 1/k x the "
        "median of the recording steps; for runs without periodic work, the median. On a quiet machine it equals "
        "the plain mean.",
    ]
    metrics: dict[str, Any] = {"step_ms": ms, "mean_step_ms": mean_ms, "robust_mean_step_ms": robust_ms,
                               "repeats_s": stats, "steps": steps, "steps_ms": steps_ms}
    skipped = None
    if monitor:
        over_pairs = [p["on"] / p["off"] - 1 for p in pairs]
        d = median(over_pairs)
        off_ms, on_ms = median([p["off"] for p in pairs]) * 1e3, median([p["on"] for p in pairs]) * 1e3
        tables.append(table(
            f"Gradient-flow monitoring: Lightning fits without and with `GradientFlowMonitor()` (every {every} steps), "
            f"the same {len(pairs)} rounds",
            ["run", "robust mean step (ms), median of rounds", "overhead, median of rounds", "overhead per round"],
            [["without the monitor", off_ms, "0", ""],
             [f"`GradientFlowMonitor()` (default, every {every} steps)", on_ms, f"{100 * d:+.1f}%",
              ", ".join(f"{100 * v:+.1f}%" for v in over_pairs)]]))
        targets.append(target(f"training: gradient-flow monitor overhead, every {every} steps", 100 * d, "<=", 3.0,
                              f"{100 * d:+.1f}%"))
        fit_ratio = ratio * (1 + d)
        targets.append(target("training: step with geobp fit's callbacks / hand-written step", fit_ratio,
                              "<=", 1.05, f"{fmt(fit_ratio)}x"))
        notes.append(f"Ratios (Lightning over hand-written, the monitor's overhead) are medians over the {len(pairs)} "
                     "rounds of the ratio within each round (robust mean steps for the monitor, over "
                     f"{steps} timed steps{'' if steps % every else ', a whole number of intervals'}): this machine's "
                     "speed drifts over minutes by more than the ratios measured, fits run back to back much less.")
        notes.append("`geobp fit` adds three callbacks: `GradientFlowMonitor` (on by default), `ModelCheckpoint` and "
                     "`CheckpointOnInterrupt`; only the monitor works during steps (the other two act at epoch end or "
                     "on an exception), so `geobp fit`'s step over the hand-written one is the Lightning ratio times "
                     "(1 + the monitor's overhead).")
        metrics["monitor_overhead"] = {"default": d, "pairs": pairs, "every_n_steps": every}
        cost = monitor_cost(cfg, warm)
        metrics["monitor_cost"] = cost
        tables.append(table(
            f"Gradient-flow monitor cost by component (one fit, every_n_steps=2, {cost['recording_steps']} recording "
            f"and {cost['tracked_steps']} tracked steps, lower quartiles)",
            ["component", "ms", "% of a step"],
            [["step without the monitor", cost["step"], "100"],
             ["per step: input maxima per band, fused norm of every gradient into the device ring", cost["per_step"],
              fmt(100 * cost["per_step"] / cost["step"])],
             ["per recording: norms, max, bands, skips, weight copy and update ratios, host copies, diagnosis",
              cost["hook_recording"] - cost["per_step"],
              fmt(100 * (cost["hook_recording"] - cost["per_step"]) / cost["step"])],
             ["per recording: skip taps in forward+backward", cost["taps"], fmt(100 * cost["taps"] / cost["step"])],
             *[[f"expected overhead, every {n} steps", "", f"{100 * v:.2f}%"] for n, v in cost["overhead"].items()]]))
        notes.append(f"Cost by component (`benchmarks/monitor.py`): in one fit, recording and tracked-only steps "
                     "alternate, and the monitor's hook and the forward+backward are timed on each (lower quartiles); "
                     "expected overhead at N = (per-step + per-recording / N) / step. The smallest interval whose "
                     f"recordings take at most {100 * cost['budget']:.1f}% of a step is {cost['interval']} (default "
                     f"{every}). It times the U-Net with cross-entropy and AdamW only, whose step is shorter than "
                     "`SegmentationTask`'s: the percentages are upper bounds.")
    else:
        skipped = f"gradient-flow monitoring: {why_not}."
    res = SectionResult(
        section="training",
        title="Training step",
        setup=[
            f"`geobp.models.create_model('unet', encoder='{ENCODER}', in_channels={IN_CHANNELS}, "
            f"num_classes={CLASSES})`, random init (same seed for every run), AdamW (lr 1e-3, weight decay 1e-4), "
            "fp32, gradient clipping at norm 1.0, on the CPU "
            f"({torch.get_num_threads()} torch threads).",
            f"Batches of {cfg.train_batch} x {IN_CHANNELS} x {cfg.train_size} x {cfg.train_size} (random images, "
            f"random labels), pre-generated in memory; {warm} warm-up steps, then {steps} timed steps per run; "
            f"{rounds} rounds; each round runs every loop once, back to back, in an order rotating from round to round.",
            "Lightning: `Trainer(accelerator='cpu', max_steps=N, logger=False, enable_checkpointing=False, "
            "enable_progress_bar=False, gradient_clip_val=1.0)`.",
        ],
        tables=tables,
        targets=targets,
        notes=notes,
        metrics=metrics,
        skipped=skipped,
    )
    return res.to_dict()
