"""Joint image/mask augmentation with albumentations, safe for any number of bands."""

from __future__ import annotations

import os

import albumentations as A
import numpy as np
import torch


class Augment:
    """Random flips and 90-degree rotations applied jointly to an image (H, W, C) and its mask (H, W).

    Only geometric transforms are used: they are exact for any band count and any value range,
    unlike colour transforms that assume RGB. Picklable, so it travels to DataLoader workers.

    Args:
        flips: horizontal and vertical flips, each with probability 0.5.
        rotate90: rotation by a random multiple of 90 degrees.
    """

    def __init__(self, flips: bool = True, rotate90: bool = True) -> None:
        ops: list[A.BasicTransform] = []
        if flips:
            ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if rotate90:
            ops.append(A.RandomRotate90(p=1.0))
        self.pipeline = A.Compose(ops)
        self._seeded_pid: int | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Augment one tile; ``seed >= 0`` makes its flips and rotation a function of the seed alone."""
        if seed >= 0:
            # per tile (the sampler draws the seeds): the same tile gets the same augmentation in any
            # worker and after a resume; also makes the per-process seeding below irrelevant
            self.pipeline.set_random_seed(seed)
            self._seeded_pid = os.getpid()
        elif self._seeded_pid != os.getpid():
            # Forked DataLoader workers would share the parent's generator state and repeat the same
            # augmentations; reseed from torch's per-worker seed (deterministic under seed_everything).
            self.pipeline.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_pid = os.getpid()
        out = self.pipeline(image=image, mask=mask)
        return out["image"], out["mask"]
