"""``CheckpointOnInterrupt``: Ctrl-C or SIGTERM leaves a usable ``last.ckpt``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class CheckpointOnInterrupt(L.Callback):
    """Save ``last.ckpt`` in the checkpoint folder when training is interrupted.

    Lightning turns SIGTERM (sent by schedulers before they kill a job) into an exception at the
    next batch boundary, and Ctrl-C into a KeyboardInterrupt; both reach ``on_exception``, where
    the current state is saved so that the same command resumes from it. Other exceptions are
    left alone: their state may be the cause of the failure.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if not dirpath or trainer.global_step == 0:
            return
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"interrupted at step {trainer.global_step}: saved {path}; run the same command to resume")
