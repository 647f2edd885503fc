"""``model.nonfinite: skip`` decided on the device, without a host synchronisation per step.

Where it applies (one process on a CUDA device, a fused AdamW, no loss scaler), the finiteness of
each step's loss stays a device tensor: the fused AdamW reads it as its ``found_inf`` flag and
leaves every parameter, moment and step count as they were on a non-finite step (the mechanism
``torch.amp.GradScaler`` uses), the step's loss and pixels count nowhere in the metrics, and the
skipped steps are counted on the device, read once per epoch (a warning the first time). What a
device decision cannot do is name the step's tiles; ``nonfinite: stop`` (checked on the host)
does. Elsewhere (DDP, ``16-mixed``, the unfused AdamW, CPUs) the task's host check runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geobp.optim import unscales_in_step

#: Device types on which the device decision is used (on CPUs the host check costs no wait).
#: Tests add ``"cpu"`` to run this path where no GPU is.
DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def applies(nonfinite: str, world_size: int, device: torch.device, optimizer: Any, scaler: Any) -> bool:
    """Whether a run decides non-finite steps on the device (see the module docstring)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper, or the optimizer
    return (nonfinite == "skip" and world_size == 1 and device.type in DEVICE_TYPES and scaler is None
            and unscales_in_step(inner))


class DeviceSkip:
    """The flag a fused AdamW reads as ``found_inf``, and the count of skipped steps, on the device.

    Attributes:
        flag: 1.0 once a loss of the current optimizer step is not finite, else 0.0.
        count: optimizer steps skipped so far (a device tensor).
        reported: the count last read on the host.
    """

    def __init__(self, optimizer: Any, device: torch.device) -> None:
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.reported = 0
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = self.flag  # read by the fused AdamW's step, after the closure set it

    def decide(self, loss: Tensor) -> Tensor:
        """Record whether ``loss`` is not finite (no host read); the boolean device tensor. The flag
        stays set until :meth:`after_step`, so one bad batch of an accumulation window skips its step."""
        bad = ~torch.isfinite(loss.detach())
        torch.maximum(self.flag, bad.float(), out=self.flag)
        return bad

    def after_step(self) -> None:
        """After the optimizer step: count it if it was skipped, and clear the flag (on the device)."""
        self.count += self.flag.long()
        self.flag.zero_()

    def read(self) -> tuple[int, int]:
        """(count so far, new since the last read): one host read."""
        total = int(self.count)
        new, self.reported = total - self.reported, total
        return total, new

    @staticmethod
    def detach(optimizer: Any) -> None:
        """Take the flag off ``optimizer`` (the end of training)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if hasattr(inner, "found_inf"):
            del inner.found_inf
