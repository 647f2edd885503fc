"""`geobp fit` with balanced sampling and automatic class weights; `geobp check --classes` (issue 17)."""

from __future__ import annotations

import pytest
import rasterio
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from geobp.cli import main
from geobp.data import GeoTiffDataModule
from geobp.data.synth import write_scenes
from geobp.errors import ConfigError
from geobp.losses import class_weights_from_counts
from geobp.task import SegmentationTask
from tests.cli.test_cli import tiny_config


@pytest.fixture
def scenes(tmp_path):
    root = tmp_path / "scenes"
    write_scenes(root, scenes=3, size=64, bands=4, classes=3, block_size=32)
    return root


def test_fit_balanced_with_auto_class_weights(tmp_path, scenes, capsys):
    cfg = tiny_config(tmp_path, scenes, sampling="balanced", balance_power=1.0)
    assert main(["fit", "--config", str(cfg), "--model.class_weights", "auto"]) == 0
    err = capsys.readouterr().err
    assert "Training classes (sampling: balanced)" in err and "loss weight" in err
    dm = GeoTiffDataModule(root=str(scenes), num_classes=3, tile_size=32, val_fraction=0.34)
    expected = class_weights_from_counts(dm.class_pixels)
    # the weights used are in the checkpoint, and the task rebuilt from it uses them
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    hp = torch.load(last, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["class_weights"] == pytest.approx(expected)
    task = SegmentationTask.from_checkpoint(last)
    assert task.criterion.weight.tolist() == pytest.approx(expected)
    # and in the run's TensorBoard logs
    events = EventAccumulator(str(last.parent.parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"classes/loss_weight/class_{i}" for i in range(3)} <= tags
    assert {f"classes/pixel_share/class_{i}" for i in range(3)} <= tags
    share = events.Scalars("classes/pixel_share/class_0")[0].value
    assert share == pytest.approx(dm.class_pixels[0] / sum(dm.class_pixels), rel=1e-5)


def test_auto_class_weights_need_a_data_module():
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_weights="auto")
    with pytest.raises(ConfigError, match="class_weights: auto needs the training class frequencies"):
        task.setup("fit")


def test_check_prints_pixels_per_class(scenes, capsys):
    assert main(["check", str(scenes), "--num-classes", "3", "--classes"]) == 0
    out = capsys.readouterr().out
    assert "Pixels per class (all scenes)" in out
    masks = []
    for p in sorted((scenes / "masks").glob("*.tif")):
        with rasterio.open(p) as src:
            masks.append(src.read(1))
    by_hand = sum(int((m == 0).sum()) for m in masks)
    assert f"{by_hand:,}" in out


def test_check_classes_needs_num_classes(scenes, capsys):
    assert main(["check", str(scenes), "--classes"]) == 2
    assert "--classes needs the number of classes" in capsys.readouterr().err


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def test_class_report_reads_masks_only_when_needed_or_always(scenes, capsys):
    from types import SimpleNamespace

    from geobp.callbacks.classreport import ClassFrequencyReport

    dm = GeoTiffDataModule(root=str(scenes), num_classes=3, tile_size=32, val_fraction=0.34)
    logger = _Logger()
    trainer = SimpleNamespace(datamodule=dm, loggers=[logger], is_global_zero=True)
    module = SimpleNamespace(criterion=SimpleNamespace(weight=None))
    ClassFrequencyReport().on_fit_start(trainer, module)  # uniform sampling, no auto weights: nothing read
    assert not dm.cell_histograms_loaded and logger.logged == [] and "Training classes" not in capsys.readouterr().err
    ClassFrequencyReport(always=True).on_fit_start(trainer, module)
    assert dm.cell_histograms_loaded and "Training classes (sampling: uniform)" in capsys.readouterr().err
    (metrics, step), = logger.logged
    share = [metrics[f"classes/pixel_share/class_{i}"] for i in range(3)]
    assert step == 0 and sum(share) == pytest.approx(1.0) and "classes/loss_weight/class_0" not in metrics
    assert share[0] == pytest.approx(dm.class_pixels[0] / sum(dm.class_pixels))
