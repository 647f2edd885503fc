"""Fine-tuning: the encoder frozen for the first epochs, then trained with its own learning rate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from geobp.cli import main
from geobp.data import GeoTiffDataModule
from geobp.data.synth import write_scenes
from geobp.errors import ConfigError
from geobp.task import SegmentationTask
from tests.cli.test_cli import tiny_config

TINY = dict(encoder="resnet18", model_kwargs={"decoder_channels": [16, 16, 8, 8, 8]}, scheduler="none")


class Snapshots(L.Callback):
    """Encoder and decoder tensors (parameters and BatchNorm buffers) at the start and each epoch end."""

    def __init__(self):
        self.encoder, self.decoder = [], []

    def _take(self, task):
        self.encoder.append({k: v.detach().clone() for k, v in task.model.encoder.state_dict().items()})
        self.decoder.append({k: v.detach().clone() for k, v in task.model.decoder.state_dict().items()})

    def on_train_start(self, trainer, task):
        self._take(task)

    def on_train_epoch_end(self, trainer, task):
        self._take(task)


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))


def test_encoder_frozen_on_schedule_then_trained(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i)
    dm = GeoTiffDataModule(str(tmp_path / "data"), num_classes=3, tile_size=32, tiles_per_epoch=8, batch_size=4,
                           val_fraction=0.34)
    task = SegmentationTask(**TINY, in_channels=3, num_classes=3, preprocessing=dm.preprocessing.to_dict(),
                            freeze_encoder_epochs=2)
    snaps = Snapshots()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[snaps])
    trainer.fit(task, datamodule=dm)
    start, epoch0, epoch1, epoch2 = snaps.encoder
    # frozen: parameters and the loaded BatchNorm statistics unchanged for two epochs
    assert same(start, epoch0) and same(epoch0, epoch1)
    assert not same(snaps.decoder[0], snaps.decoder[1])  # while the decoder trains
    # then the encoder trains: weights and statistics change
    assert not torch.equal(epoch1["conv1.weight"], epoch2["conv1.weight"])
    assert not torch.equal(epoch1["bn1.running_mean"], epoch2["bn1.running_mean"])
    assert not task.encoder_frozen


def test_encoder_learning_rate_multiplier_groups():
    task = SegmentationTask(**TINY, in_channels=3, num_classes=2, lr=1e-3, encoder_lr_mult=0.1)
    opt = task.configure_optimizers()
    encoder, rest = opt.param_groups
    assert encoder["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in task.model.encoder.parameters()}
    assert len(encoder["params"]) + len(rest["params"]) == len(list(task.parameters()))
    # without a multiplier, one group as before the option, so checkpoints of earlier runs resume
    single = SegmentationTask(**TINY, in_channels=3, num_classes=2, lr=1e-3).configure_optimizers()
    assert len(single.param_groups) == 1 and len(single.param_groups[0]["params"]) == len(list(task.parameters()))
    with pytest.raises(ConfigError, match=r"freeze_encoder_epochs and encoder_lr_mult must be >= 0 \(found -1, 1.0\)"):
        SegmentationTask(**TINY, freeze_encoder_epochs=-1)


@pytest.mark.slow
def test_gradient_flow_monitor_does_not_alarm_on_a_frozen_encoder(tmp_path):
    root = tmp_path / "scenes"
    write_scenes(root, scenes=3, size=64, bands=4, classes=3, block_size=32)
    cfg = tiny_config(tmp_path, root, tiles_per_epoch=8)
    args = ["--model.freeze_encoder_epochs", "1", "--model.encoder_lr_mult", "0.1", "--trainer.max_epochs", "2",
            "--gradflow.every_n_steps", "1", "--gradflow.thresholds.min_recordings", "2"]
    assert main(["fit", "--config", str(cfg), *args]) == 0
    report = json.loads(next(tmp_path.rglob("gradflow.json")).read_text())
    assert report["diagnoses"] == []
    names = [layer["name"] for layer in report["layers"]]
    conv1, head = names.index("model.encoder.conv1"), len(names) - 1
    frozen = [row[conv1] for row in report["layer_norm"][:2]]  # 2 steps per epoch
    trained = [row[conv1] for row in report["layer_norm"][2:]]
    assert frozen == [None] * 2 and len(trained) == 2 and all(isinstance(v, float) and v > 0 for v in trained)  # null: not measured
    assert all(row[head] > 0 for row in report["layer_norm"])
    encoder = [n for n in names if n.startswith("model.encoder.")]
    assert report["frozen_spans"] == [{"layers": encoder, "first_step": 0, "last_step": 1}]  # why those nulls
    html = next(tmp_path.rglob("report.html")).read_text()
    assert f"{len(encoder)} layers frozen at steps 0-1 (model.encoder.conv1" in html


@pytest.mark.slow
def test_frozen_encoder_under_ddp_needs_unused_parameter_detection(tmp_path):
    """Two CPU processes (gloo): plain DDP is refused in one line; the named strategy trains."""
    root = tmp_path / "scenes"
    write_scenes(root, scenes=3, size=64, bands=3, classes=3, block_size=32)
    cfg = tiny_config(tmp_path, root, tiles_per_epoch=16)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "geobp", "fit", "--config", str(cfg), "--model.freeze_encoder_epochs", "1",
            "--trainer.max_epochs", "2", "--trainer.devices", "2", "--trainer.limit_val_batches", "1"]
    plain = subprocess.run([*base, "--trainer.strategy", "ddp"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert "model.freeze_encoder_epochs under DDP" in plain.stderr
    assert "Fix: set trainer.strategy: ddp_find_unused_parameters_true." in " ".join(plain.stderr.split())
    assert "Traceback" not in plain.stderr
    fixed = subprocess.run([*base, "--trainer.strategy", "ddp_find_unused_parameters_true"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
