"""Fixture that trains a model of the zoo (``tests/callbacks/zoo.py``) with a monitor on CPU."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from torch.utils.data import DataLoader, Dataset

from geobp.callbacks import GradientFlowMonitor, GradientFlowWarning

FitFn = Callable[..., L.Trainer]


@pytest.fixture
def fit(tmp_path: Path) -> FitFn:
    """Train ``module`` on ``data`` with ``monitor`` for ``max_steps`` on CPU; return the trainer.

    ``data`` is a dataset (loaded in batches of ``batch_size``) or a data module. Warnings
    other than the monitor's are silenced; ``default_root_dir`` is
    ``tmp_path``, so without a logger the report lands in ``tmp_path/gradflow``.
    """

    def _fit(module: L.LightningModule, data: Dataset | L.LightningDataModule, monitor: GradientFlowMonitor | None,
             max_steps: int = 30,
             batch_size: int = 8, callbacks: list[L.Callback] | None = None, **trainer_kwargs: Any) -> L.Trainer:
        trainer_kwargs.setdefault("logger", False)
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=tmp_path,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[c for c in [monitor, *(callbacks or [])] if c is not None], **trainer_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
            warnings.simplefilter("always", GradientFlowWarning)
            if isinstance(data, L.LightningDataModule):
                trainer.fit(module, datamodule=data)
            else:
                trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=False))
        return trainer

    return _fit
