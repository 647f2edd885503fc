"""Reading geobp checkpoints as data: ``torch.load(weights_only=True)`` and the checks of a geobp file.

A checkpoint describes itself: its ``hyper_parameters`` hold the task's constructor arguments
(architecture, band and class counts, class names, the data's preprocessing and, from runs that
record them, the ``label_options``), so the model and its preprocessing are rebuilt from the file
alone (:meth:`geobp.task.SegmentationTask.from_checkpoint`). Nothing here runs code from the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from geobp.errors import CheckpointError, DataNotFoundError, format_error

#: Hyper-parameters of training only: left out when a task is rebuilt for inference (no start
#: weights file, no ``torch.compile``).
TRAINING_ONLY = ("weights", "compile")


def load_checkpoint_data(path: Path) -> Any:
    """Read a checkpoint as data: ``torch.load(weights_only=True)``, which unpickles tensors,
    containers and plain values only, so a file from someone else cannot run code on load.

    Raises:
        CheckpointError: the file is unreadable, or it holds Python objects that loading would
            have to construct (refused, and nothing of it runs).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle torch can read at all
            raise CheckpointError(format_error(path, "cannot read the checkpoint (not a PyTorch checkpoint file)",
                                               "pass a .ckpt written by `geobp fit`")) from None
        raise CheckpointError(format_error(
            path, f"refused: the checkpoint holds Python objects that loading would have to run ({found.group(1)})",
            "use a checkpoint written by `geobp fit` (plain tensors and values); never load files you do not trust "
            "with weights_only=False")) from None
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(format_error(path, f"cannot read the checkpoint ({err})", "pass a .ckpt written by `geobp fit`")) from err


def read_task_checkpoint(path: str | Path) -> dict[str, Any]:
    """A geobp checkpoint's data, checked: it has a ``state_dict`` and geobp hyper-parameters with
    the data's preprocessing.

    Returns:
        The checkpoint dict (``hyper_parameters``, ``state_dict`` and whatever else it holds).

    Raises:
        DataNotFoundError: the file does not exist.
        CheckpointError: the file is not a geobp checkpoint or lacks its preprocessing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(format_error(path, "checkpoint not found", "pass the .ckpt written by `geobp fit` (see its checkpoints/ folder)"))
    ckpt = load_checkpoint_data(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "state_dict" not in ckpt or "in_channels" not in hp:
        raise CheckpointError(format_error(path, "not a geobp checkpoint (no geobp hyperparameters)", "pass a .ckpt written by `geobp fit`"))
    if not hp.get("preprocessing"):
        raise CheckpointError(
            format_error(path, "checkpoint has no preprocessing (band statistics)", "train with `geobp fit`, which stores them")
        )
    return ckpt


def rebuild_kwargs(hyper_parameters: Mapping[str, Any], accepted: Iterable[str]) -> dict[str, Any]:
    """The constructor arguments that rebuild a task for inference from its hyper-parameters.

    LightningCLI adds private keys (``_class_path``, ``_instantiator``) and older or newer
    checkpoints may hold keys this version does not take: only ``accepted`` names are kept, less
    the training-only ones (:data:`TRAINING_ONLY`).
    """
    names = set(accepted)
    return {k: v for k, v in hyper_parameters.items() if k in names and k not in TRAINING_ONLY}


def label_options_of(hyper_parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``label_options`` a checkpoint was trained with, or None (not recorded: older checkpoints)."""
    options = hyper_parameters.get("label_options")
    return dict(options) if options else None
