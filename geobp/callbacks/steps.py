"""Per-step tracking between recordings: each step's gradient norms wait on the device.

Between two recordings the monitor writes, on every optimizer step, the per-parameter gradient
norms (one fused ``torch._foreach_norm``) into a row of a small device buffer, the *ring*. The
next recording reads a summary of all rows in its one host copy: how many steps were seen,
clipped and non-finite, and the first step of each run of non-finite steps with its
per-parameter norms (so that step is reported with its layer even though it was not recorded).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

TrackMode = Literal["sync", "deferred"]

#: Most steps whose per-parameter norms wait on the device for the next host read.
RING_ROWS = 256

#: Called with ``(step, per-parameter norms, loss scale)`` for the first step of each run of
#: non-finite steps found in the ring.
EventFn = Callable[[int, list[float], "float | None"], None]


class StepTracker:
    """The ring of per-step norms, and the step counters it feeds.

    Args:
        num_params: number of monitored parameters ``P`` (a ring row's width).
        rows: ring rows (steps between host reads); capped at :data:`RING_ROWS`.
        clip_norm: the norm-clipping threshold (steps above it count as clipped), or None.
        on_event: called for each new run of non-finite steps (see :data:`EventFn`).

    Attributes:
        steps_seen: optimizer steps counted so far.
        nonfinite_steps: of those, steps with a NaN/Inf gradient.
        clipped_steps: of those, steps whose total norm exceeded ``clip_norm``.
        mode: ``sync`` (one host read of the step's finiteness per step, so a non-finite step can
            be recorded at once) or ``deferred`` (no host read); set by :meth:`start`.
    """

    def __init__(self, num_params: int, rows: int, clip_norm: float | None, on_event: EventFn) -> None:
        self.num_params = num_params
        self.rows = max(1, min(rows, RING_ROWS))
        self.clip_norm = clip_norm
        self.on_event = on_event
        self.steps_seen = self.nonfinite_steps = self.clipped_steps = 0
        self.mode: TrackMode = "deferred"
        self._ring: Tensor | None = None
        self._steps: list[int] = []  # step of each filled row
        self._last_bad = False  # sync mode: whether the previous step was non-finite
        self._ended_bad = False  # whether the last step of the previous read was non-finite
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called (the ring exists)."""
        return self._ring is not None

    def start(self, device: torch.device, mode: TrackMode) -> None:
        """Allocate the ring on ``device`` (at the first gradient, when the device is known)."""
        self.mode = mode
        self._ring = torch.zeros(self.rows, self.num_params, device=device)

    def index(self, present: list[int], device: torch.device) -> Tensor:
        """Device index of the parameters that hold a gradient (cached: the set rarely changes)."""
        key = tuple(present)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 8:
                self._index_cache.clear()
            index = self._index_cache[key] = torch.tensor(present, device=device)
        return index

    def track(self, step: int, grads: list[Tensor], present: list[int], scale: Callable[[], float | None]) -> bool:
        """Write the step's per-parameter norms into the ring (two kernels).

        Args:
            step: the optimizer step.
            grads: the gradients of the parameters ``present`` (indices into the monitored list).
            present: which parameters hold a gradient.
            scale: gives the loss scale, for an event found when a full ring is read.

        Returns:
            In ``sync`` mode, whether this step starts a run of non-finite steps (to be recorded
            now); in ``deferred`` mode False.
        """
        assert self._ring is not None, "start() first"
        if len(self._steps) == len(self._ring):  # recordings far apart, or a planned one missed
            self.drain(scale())
        row = self._ring[len(self._steps)]
        norms = torch._foreach_norm(grads)
        if len(present) == self.num_params:
            torch.stack(norms, out=row)
        else:
            row.zero_().index_copy_(0, self.index(present, row.device), torch.stack(norms).to(row.dtype))
        self._steps.append(step)
        if self.mode != "sync":
            return False
        bad = not bool(torch.isfinite(torch.linalg.vector_norm(row)))  # the one host read per step
        starts = bad and not self._last_bad
        self._last_bad = bad
        return starts

    def latest(self) -> Tensor:
        """The latest step's per-parameter norms ``[P]`` (on the device)."""
        assert self._ring is not None and self._steps
        return self._ring[len(self._steps) - 1]

    def pieces(self) -> list[Tensor]:
        """Summaries of the filled rows, float64, to be read with the caller's host copy.

        Hand the values read, in order, to :meth:`consume`.
        """
        assert self._ring is not None
        rows = self._ring[: len(self._steps)]
        totals = torch.linalg.vector_norm(rows, dim=1)
        bad = ~torch.isfinite(totals)
        if self.clip_norm is not None:
            clipped = (totals > self.clip_norm).sum()
        else:
            clipped = torch.zeros((), device=rows.device)
        # A non-finite event is the first step of a run of non-finite steps (a NaN that reached the
        # weights makes every later step non-finite too: one event, not one per read).
        before = bad.roll(1, 0)
        before[0] = self._ended_bad
        starts = bad & ~before
        first = starts.to(torch.int32).argmax().reshape(1)  # index_select, not rows[first]: no host sync
        pieces = [totals[-1:], bad.sum().reshape(1), clipped.reshape(1), starts.any().reshape(1), first,
                  bad[-1:], rows.index_select(0, first).reshape(-1)]
        return [p.to(torch.float64) for p in pieces]

    def consume(self, values: Iterator[float], scale: float | None) -> float:
        """Update the counters from the values of :meth:`pieces`, report an event, empty the ring.

        Args:
            values: the host values; exactly those of :meth:`pieces` are taken from it.
            scale: the loss scale, given to ``on_event``.

        Returns:
            The total norm of the latest step.
        """
        total, n_bad, n_clip, any_start, first, ended_bad = itertools.islice(values, 6)
        snapshot = list(itertools.islice(values, self.num_params))
        self.steps_seen += len(self._steps)
        self.nonfinite_steps += int(n_bad)
        self.clipped_steps += int(n_clip)
        self._ended_bad = bool(ended_bad)
        event_step = self._steps[int(first)] if any_start else None
        self._steps = []
        if event_step is not None:
            self.on_event(event_step, snapshot, scale)
        return total

    def drain(self, scale: float | None) -> None:
        """Read the filled rows now (one host copy), if any."""
        if self._steps:
            self.consume(iter(torch.cat(self.pieces()).tolist()), scale)

    # ----- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | bool]:
        """The counters, for a checkpoint. Call :meth:`drain` first: rows on the device are not kept."""
        if self._steps:
            raise RuntimeError("StepTracker.state_dict: drain() the ring first")
        return {"steps_seen": self.steps_seen, "nonfinite_steps": self.nonfinite_steps,
                "clipped_steps": self.clipped_steps, "last_bad": self._last_bad, "ended_bad": self._ended_bad}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue the counters of :meth:`state_dict`."""
        self.steps_seen = int(state["steps_seen"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.clipped_steps = int(state["clipped_steps"])
        self._last_bad = bool(state["last_bad"])
        self._ended_bad = bool(state["ended_bad"])
