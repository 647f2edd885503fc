from pathlib import Path

import pytest
import torch

from geobp.errors import CheckpointError, ConfigError, DataNotFoundError
from geobp.losses import SegmentationLoss, dice_loss
from geobp.task import SegmentationTask


def batch(b=2, c=3, k=3, size=32):
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, k, (b, size, size), generator=g)
    mask[:, :4] = 255
    return {"image": torch.randn(b, c, size, size, generator=g), "mask": mask}


@pytest.mark.parametrize("loss", ["ce", "dice", "focal", "ce+dice"])
def test_losses_ignore_index_and_backprop(loss):
    fn = SegmentationLoss(loss, 255, class_weights=[1.0, 2.0, 0.5])
    b = batch()
    logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    value = fn(logits, b["mask"])
    value.backward()
    assert torch.isfinite(value)
    # ignored pixels get no gradient
    assert logits.grad[:, :, :4].abs().max() == 0
    assert logits.grad[:, :, 4:].abs().max() > 0


def test_dice_is_zero_for_perfect_prediction():
    target = torch.randint(0, 3, (1, 8, 8))
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(logits, target, 255).item() == pytest.approx(0.0, abs=1e-3)


def test_shared_step_logs_metrics_and_per_class_iou():
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=["w", "f", "c"])
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, value)
    task.log_dict = lambda d, **kw: logged.update(d)
    task.validation_step(batch(), 0)
    task.on_validation_epoch_end()
    assert {"val/loss", "val/mIoU", "val/F1", "val/acc", "val/IoU_w", "val/IoU_f", "val/IoU_c"} <= set(logged)
    assert 0 <= float(logged["val/mIoU"]) <= 1


def test_train_metrics_equal_torchmetrics_on_argmax_predictions():
    """The cheaper per-step path (max indices, no label validation) logs the same numbers."""
    from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=["w", "f", "c"])
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, value)
    task.log_dict = lambda d, **kw: logged.update(d)
    b = batch(b=2, size=32)
    with torch.no_grad():
        task.training_step(b, 0)
        pred = task(b["image"]).argmax(dim=1)
    task.on_train_epoch_end()
    iou = MulticlassJaccardIndex(3, average="none", ignore_index=255)(pred, b["mask"])
    f1 = MulticlassF1Score(3, average="macro", ignore_index=255)(pred, b["mask"])
    torch.testing.assert_close(torch.stack([logged[f"train/IoU_{n}"] for n in "wfc"]), iou)
    torch.testing.assert_close(logged["train/mIoU"], iou.mean())
    torch.testing.assert_close(logged["train/F1"], f1)
    # label checks are skipped only where the labels were checked already (training)
    assert not task.metrics["train_metrics"]["mIoU"].validate_args and task.metrics["val_metrics"]["mIoU"].validate_args


def test_raw_batch_is_refused_with_the_fix():
    """A compact loader batch that bypassed the data module's hook is not silently skipped."""
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3)
    raw = {"raw": torch.zeros(2, 3, 32, 32, dtype=torch.uint16), "mask": torch.zeros(2, 32, 32, dtype=torch.uint8)}
    with pytest.raises(ConfigError, match=r"raw pixels .*Fix: give the trainer the data module"):
        task.training_step(raw, 0)


def test_checkpoint_roundtrip_rebuilds_model_and_preprocessing(tmp_path):
    pre = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0], "low": [], "high": []}
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, preprocessing=pre)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = SegmentationTask.from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.preprocessing.mean == [1.0, 2.0, 3.0]
    x = torch.randn(1, 3, 32, 32)
    task.eval()
    torch.testing.assert_close(loaded(x), task(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.ckpt: checkpoint not found"):
        SegmentationTask.from_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt: cannot read the checkpoint"):
        SegmentationTask.from_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="other.ckpt: not a geobp checkpoint"):
        SegmentationTask.from_checkpoint(tmp_path / "other.ckpt")


def test_channels_last_forward_matches():
    torch.manual_seed(0)
    a = SegmentationTask(encoder="resnet18", in_channels=4, num_classes=3).eval()
    b = SegmentationTask(encoder="resnet18", in_channels=4, num_classes=3, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 64, 64)
    torch.testing.assert_close(a(x), b(x), atol=1e-4, rtol=1e-4)


class _RunsCode:
    """Unpickling this object calls ``Path.touch`` on ``marker``: code execution on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    from geobp.errors import CheckpointError

    marker = tmp_path / "pwned"
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=2, preprocessing=None)
    bad = tmp_path / "shared.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {"in_channels": 3, "payload": _RunsCode(marker)}}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"shared.ckpt: refused: the checkpoint holds Python objects that loading would have to run \(\w+\).*Fix: use a checkpoint written by `geobp fit`"):
        SegmentationTask.from_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_cross_entropy_is_torchs_mean_and_zero_without_labelled_pixels(weights):
    from geobp.losses import cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = 255
    w = torch.tensor(weights) if weights else None
    want = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, target, 255, w), want, rtol=1e-6)
    none = cross_entropy(logits, torch.full((2, 8, 8), 255), 255, w)  # torch's mean gives NaN here
    assert none.item() == 0.0
    none.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
