"""Faults during training: corrupt blocks, non-finite losses, interrupts."""

import dataclasses
import os
import signal

import lightning as L
import pytest
import rasterio
import rasterio.shutil
import torch

from geobp.callbacks.interrupt import CheckpointOnInterrupt
from geobp.data import GeoTiffDataModule
from geobp.data.dataset import TileSpec, collate_tiles
from geobp.errors import NonFiniteError, RasterReadError
from geobp.nonfinite_protocol import first_nonfinite_module
from geobp.task import SegmentationTask

SMALL = {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    args.update(kw)
    return L.Trainer(**args)


@pytest.fixture
def dm(make_scene, tmp_path):
    for i in range(3):
        make_scene(f"s{i}", seed=i, size=(64, 64))
    return GeoTiffDataModule(str(tmp_path / "data"), num_classes=3, tile_size=32, tiles_per_epoch=12, batch_size=4, val_fraction=0.34)


def corrupt(path, tmp_path):
    """Make a truncated COG at ``path``: it opens, but its later blocks fail to decode."""
    cog = tmp_path / "cog.tif"
    rasterio.shutil.copy(path, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=16)
    raw = cog.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


def test_corrupt_block_stop_names_scene_and_window(dm, tmp_path):
    ds = dm._dataset(False)
    corrupt(tmp_path / "data" / "images" / "s0.tif", tmp_path)
    ds.close()
    with pytest.raises(RasterReadError, match=r"s0.tif: failed to read window \(row 32, col 32"):
        ds[TileSpec(0, 32, 32, 32, 32)]


def test_corrupt_block_skip_warns_and_counts(dm, tmp_path):
    dm.loader_options = dataclasses.replace(dm.loader_options, on_read_error="skip")
    ds = dm._dataset(False)
    corrupt(tmp_path / "data" / "images" / "s0.tif", tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipping tile of scene s0: .*s0.tif: failed to read window"):
        bad = ds[TileSpec(0, 32, 32, 32, 32)]
    good = ds[TileSpec(1, 0, 0, 32, 32)]
    batch = collate_tiles([bad, good, good])
    assert batch["skipped"].item() == 1 and batch["raw"].shape[0] == 2
    assert collate_tiles([None, None]) == {"skipped": torch.tensor(2)}


class NaNAfter(torch.nn.Module):
    """Wraps a model; from call ``after`` on, the output of ``inner`` becomes NaN."""

    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        self.calls += 1
        y = self.inner(x)
        return y * float("nan") if self.calls > self.after else y


def test_nonfinite_loss_skip_counts_and_keeps_weights_finite(dm, tmp_path):
    task = SegmentationTask(**SMALL, in_channels=3, num_classes=3, nonfinite="skip", scheduler="none")
    task.model.head = NaNAfter(task.model.head, after=1)
    with pytest.warns(UserWarning, match=r"loss is nan; step skipped \(s\d \(row"):
        trainer(tmp_path).fit(task, datamodule=dm)
    assert task.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_nonfinite_loss_stop_names_tiles_and_first_layer(dm, tmp_path):
    task = SegmentationTask(**SMALL, in_channels=3, num_classes=3, nonfinite="stop")
    task.model.head = NaNAfter(task.model.head, after=0)
    with pytest.raises(NonFiniteError, match=r"step 0: training loss is nan on tiles s\d \(row \d+, col \d+\).*first non-finite output: head.*Fix: "):
        trainer(tmp_path).fit(task, datamodule=dm)


def test_first_nonfinite_module_finds_the_layer():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.fill_(float("inf"))
    assert first_nonfinite_module(net, torch.ones(1, 2)) == "1"
    assert first_nonfinite_module(net, torch.full((1, 2), float("nan"))) == "the input image"


class SigtermAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_leaves_usable_last_checkpoint(dm, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = SegmentationTask(**SMALL, in_channels=3, num_classes=3)
    ckpt_dir = tmp_path / "ckpts"
    t = trainer(tmp_path, max_steps=20, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True), CheckpointOnInterrupt(), SigtermAt(2)])
    with pytest.raises(SystemExit):
        t.fit(task, datamodule=dm)
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    t2 = trainer(tmp_path, max_steps=4)
    t2.fit(SegmentationTask(**SMALL, in_channels=3, num_classes=3), datamodule=dm, ckpt_path=ckpt_dir / "last.ckpt")
    assert t2.global_step == 4


class Snapshots(L.Callback):
    """Weights and AdamW state before and after every training batch."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _state(trainer, module):
        opt = trainer.optimizers[0].state_dict()["state"]
        return ([p.detach().clone() for p in module.parameters()],
                {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.items()})

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self._state(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self._state(trainer, module))


def test_skipped_step_leaves_weights_and_optimizer_state_untouched(dm, tmp_path):
    task = SegmentationTask(**SMALL, in_channels=3, num_classes=3, nonfinite="skip", scheduler="none", weight_decay=0.1)
    task.model.head = NaNAfter(task.model.head, after=1)  # step 0 trains, steps 1 and 2 are NaN
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=r"step 1: loss is nan; step skipped .*not warned again"):
        trainer(tmp_path, callbacks=[snaps]).fit(task, datamodule=dm)
    (w0, _), (w1, _) = snaps.before[0], snaps.after[0]
    assert any(not torch.equal(a, b) for a, b in zip(w0, w1))  # the good step trained
    for i in (1, 2):
        (wb, ob), (wa, oa) = snaps.before[i], snaps.after[i]
        assert all(torch.equal(a, b) for a, b in zip(wb, wa))  # weight decay did not run either
        assert ob.keys() == oa.keys() and all(
            torch.equal(ob[k][n], oa[k][n]) for k in ob for n in ob[k])  # nor did the moments or step counts
    assert task.nonfinite_steps == 2
