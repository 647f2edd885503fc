"""Test-only callbacks and plugins for the DDP and resume tests, given by class path on the CLI.

They are imported by ``python -m geobp fit`` subprocesses (``PYTHONPATH`` holds the repository
root), e.g. ``--trainer.callbacks+=tests.ddp_helpers.RecordTiles``. Each writes what it saw to
files under ``out``, one per global rank, so the test can read what every process did.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _rank() -> int:
    """Global rank of this process (0 without an initialized process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class RecordTiles(L.Callback):
    """Append every training tile (epoch, step, scene, window, process) to ``out/tiles_rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        path = self.out / f"tiles_rank{trainer.global_rank}.jsonl"
        for scene, window in zip(batch["scene"], batch["window"].tolist()):
            _append(path, {"epoch": trainer.current_epoch, "step": trainer.global_step, "batch_idx": batch_idx,
                           "scene": scene, "window": window, "world": trainer.world_size, "pid": os.getpid()})


class RecordValidation(L.Callback):
    """Append each validation's ``val/mIoU`` as seen by this rank to ``out/val_rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/mIoU")
        _append(self.out / f"val_rank{trainer.global_rank}.jsonl",
                {"epoch": trainer.current_epoch, "step": trainer.global_step,
                 "mIoU": None if value is None else float(value)})


class StallAt(L.Callback):
    """Stall a run at a step, so that the test can kill it there (SIGKILL or SIGTERM).

    Only when the environment variable ``GEOBP_TEST_STALL_AT`` holds a step number, so that the
    interrupted and the resumed run are started with the same command: once that many optimizer
    steps are done (and checkpointed; checked at the start of the next batch because
    ModelCheckpoint's ``on_train_batch_end`` runs after other callbacks'), write ``marker`` and
    wait. SIGKILL ends the process there; after SIGTERM the wait ends, the batch is trained and
    Lightning stops the run at the end of it.
    """

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = os.environ.get("GEOBP_TEST_STALL_AT")
        if step is None or trainer.global_step != int(step):
            return
        self.marker.write_text(str(trainer.global_step))
        while not trainer.received_sigterm:
            time.sleep(0.05)


class SaveAtEnd(L.Callback):
    """Save a full checkpoint to ``path`` when training ends (the final state, to compare runs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class RecordingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that also appends (rank, path) of every file it writes to ``out/saves.jsonl``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        _append(self.out / "saves.jsonl", {"rank": _rank(), "pid": os.getpid(), "path": str(path)})


class InjectFaults(L.Callback):
    """Spoil chosen batches on chosen ranks, after they reach the device.

    ``nan``: {step: [ranks]} whose images become NaN (a non-finite loss); ``unreadable``:
    {step: [ranks]} whose batches lose every tile (as when all tiles fail to read with
    ``data.on_read_error: skip``). Steps are optimizer steps (``global_step``); keys are strings
    (YAML/JSON).
    """

    def __init__(self, nan: dict[str, list[int]] | None = None, unreadable: dict[str, list[int]] | None = None) -> None:
        self.nan = {int(k): v for k, v in (nan or {}).items()}
        self.unreadable = {int(k): v for k, v in (unreadable or {}).items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        if rank in self.nan.get(step, []):
            batch["image"].fill_(float("nan"))
        if rank in self.unreadable.get(step, []):
            n = batch["image"].shape[0]
            for key in [k for k in batch if k != "skipped"]:
                del batch[key]
            batch["skipped"] = batch.get("skipped", 0) + n


class RecordParams(L.Callback):
    """Append, after every training batch, a checksum of the weights and the nonfinite count to
    ``out/params_rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        _append(self.out / f"params_rank{trainer.global_rank}.jsonl",
                {"step": trainer.global_step, "sum": total, "nonfinite": getattr(pl_module, "nonfinite_steps", None)})


class CompileCheck(L.Callback):
    """Compile with ``backend`` in this process (``aot_eager``: fast, no code generation), and at the end
    of training write this rank's compiled and eager forward counts and a checksum of its weights to
    ``out/compile_rank<r>.json``."""

    def __init__(self, out: str, backend: str = "aot_eager") -> None:
        import geobp.compiled

        geobp.compiled.BACKEND = backend
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compiled = getattr(pl_module, "_compiled", None)
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"compile_rank{trainer.global_rank}.json").write_text(json.dumps({
            "compiled_calls": getattr(compiled, "compiled_calls", 0), "eager_calls": getattr(compiled, "eager_calls", 0),
            "checksum": checksum}))
