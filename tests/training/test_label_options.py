"""``label_options``: saved with the hyper-parameters, read back from a checkpoint as data, absent in old ones."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from geobp.checkpoint import label_options_of, load_checkpoint_data, read_task_checkpoint
from geobp.errors import ConfigError
from geobp.task import SegmentationTask

PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [0.0] * 3, "std": [1.0] * 3, "low": [], "high": []}


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.randint(0, 3, (2, 32, 32), generator=g)}
            for _ in range(n)]


def test_label_options_round_trip_through_a_saved_checkpoint(tmp_path):
    options = {"label_map": {7: 1, "forest": 2, 0: 255}, "label_field": "class", "label_background": 0,
               "all_touched": True}
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, preprocessing=PRE, label_options=options,
                            scheduler="none")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(task, DataLoader(_batches(), batch_size=None))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    data = load_checkpoint_data(path)  # plain data, no code run
    assert data["hyper_parameters"]["label_options"] == options
    assert label_options_of(read_task_checkpoint(path)["hyper_parameters"]) == options
    assert SegmentationTask.from_checkpoint(path).hparams["label_options"] == options


def test_checkpoint_without_label_options_still_loads(tmp_path):
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, preprocessing=PRE)
    hp = dict(task.hparams)
    assert hp.pop("label_options") is None
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hp}, tmp_path / "old.ckpt")
    loaded = SegmentationTask.from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams["label_options"] is None
    assert label_options_of(read_task_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]) is None


def test_unknown_label_option_is_refused():
    with pytest.raises(ConfigError, match=r"model\.label_options has unknown keys \(expected some of \['label_map', "
                                          r"'label_field', 'label_background', 'all_touched'\], found \['labelmap'\]\)\. "
                                          r"Fix: remove labelmap"):
        SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, label_options={"labelmap": {1: 0}})
