"""GradientFlowMonitor in a Trainer: arguments, logged keys, hook lifetime, reports, geobp's U-Net."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from geobp.callbacks import GradientFlowMonitor, GradientFlowWarning
from geobp.errors import ConfigError
from geobp.task import SegmentationTask
from tests.callbacks.zoo import CaptureLogger, TileSet, ZooModule, deep_sigmoid_mlp, small_resnet


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, r"every_n_steps must be an integer >= 1 \(found 0\)\. Fix: set GradientFlowMonitor"),
    ({"every_n_steps": 2.5}, r"every_n_steps must be an integer >= 1 \(found 2.5\)"),
    ({"step_check": "always"}, r"step_check must be one of \('auto', 'sync', 'deferred', 'off'\) \(found 'always'\)"),
    ({"skip_pattern": "skip("}, r"skip_pattern 'skip\(' is not a valid regular expression"),
    ({"report_every_s": -1}, r"report_every_s must be >= 0"),
])
def test_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GradientFlowMonitor(**kwargs)


def test_setup_checks_need_the_model(fit) -> None:
    with pytest.raises(ConfigError, match=r"band_layer: 'net.1' is not an ungrouped, trainable nn.Conv2d .*candidates: "
                                          r"net.0, net.3.conv1"):
        fit(ZooModule(small_resnet()), TileSet(), GradientFlowMonitor(band_layer="net.1"), max_steps=1)
    frozen = ZooModule(nn.Sequential(nn.Linear(16, 4)))
    frozen.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"ZooModule has no trainable parameters to monitor\. Fix: remove"):
        fit(frozen, TileSet(size=0, bands=16), GradientFlowMonitor(), max_steps=1)
    with pytest.warns(GradientFlowWarning, match=r"skip_pattern 'nothing_here' matches no module of ZooModule"):
        fit(ZooModule(small_resnet()), TileSet(), GradientFlowMonitor(skip_pattern="nothing_here"), max_steps=1)


class HookCounter(L.Callback):
    """Counts forward pre-hooks on the residual blocks at each training batch."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.counts[trainer.global_step] = sum(len(pl_module.net[i]._forward_pre_hooks) for i in (3, 4, 5))


def test_skip_hooks_exist_only_on_recording_steps(fit) -> None:
    counter = HookCounter()
    monitor = GradientFlowMonitor(every_n_steps=4, write_report=False)
    fit(ZooModule(small_resnet()), TileSet(), monitor, max_steps=10, callbacks=[counter])
    assert counter.counts == {s: (3 if s % 4 == 0 else 0) for s in range(10)}
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in monitor._recorder.taps._modules) == 0


def test_logged_keys_and_clipping(fit, tmp_path: Path) -> None:
    logger = CaptureLogger(tmp_path / "logs")
    monitor = GradientFlowMonitor(every_n_steps=2)
    trainer = fit(ZooModule(small_resnet(), lr=0.5), TileSet(), monitor, max_steps=10, logger=logger,
                  gradient_clip_val=0.5)
    logged = [(step, m) for step, m in logger.logged if any(k.startswith("gradflow/") for k in m)]
    assert [step for step, _ in logged] == [0, 2, 4, 6, 8]
    keys = set(logged[0][1])
    assert keys == {"gradflow/total_norm", "gradflow/early_head_ratio", "gradflow/nonfinite_steps",
                    "gradflow/clip_fraction", "gradflow/skip_ratio/net.3", "gradflow/skip_ratio/net.4",
                    "gradflow/skip_ratio/net.5", "gradflow/band_norm/0", "gradflow/band_norm/1",
                    "gradflow/band_norm/2"}
    data = monitor.data
    assert data["meta"]["gradient_clip_val"] == 0.5 and data["meta"]["gradient_clip_algorithm"] == "norm"
    assert data["clipped"] == [t > 0.5 for t in data["total_norm"]]
    assert logged[-1][1]["gradflow/clip_fraction"] == data["clipped_steps"][-1] / 9
    assert data["totals"]["steps_seen"] == 10
    # The report lands in the logger's folder.
    assert trainer.log_dir == str(tmp_path / "logs")
    assert (tmp_path / "logs" / "gradflow" / "report.html").is_file()


def test_findings_are_warned_while_training_runs(fit) -> None:
    seen_at: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if not seen_at and any(issubclass(w.category, GradientFlowWarning) for w in caught):
                seen_at.append(trainer.global_step)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ZooModule(deep_sigmoid_mlp()), TileSet(size=0, bands=16),
            GradientFlowMonitor(every_n_steps=2, write_report=False), max_steps=20, callbacks=[Probe()])
    # Three recordings (steps 0, 2, 4) make the vanishing condition persistent.
    assert seen_at == [5]
    messages = [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]
    assert len(messages) == 1 and messages[0].startswith("GradientFlowMonitor: vanishing at net.0 (step 0)")


def test_report_is_written_when_training_fails(fit, tmp_path: Path) -> None:
    class Failing(ZooModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
            if self.global_step == 6:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        fit(Failing(small_resnet()), TileSet(), GradientFlowMonitor(every_n_steps=2), max_steps=10)
    data = json.loads((tmp_path / "gradflow" / "gradflow.json").read_text())
    assert data["steps"] == [0, 2, 4] and data["totals"]["steps_seen"] == 6
    assert (tmp_path / "gradflow" / "report.html").stat().st_size > 10_000


def test_reports_are_refreshed_at_epoch_ends(fit, tmp_path: Path) -> None:
    writes: list[tuple[int, bool]] = []

    class Spy(GradientFlowMonitor):
        def write(self, background: bool = False) -> Any:
            writes.append((len(self.data["steps"]), background))
            return None

    fit(ZooModule(small_resnet()), TileSet(n=16), Spy(every_n_steps=1, report_every_s=0), max_steps=6)
    # Three epochs of two batches, rendered in the background; then the final write, waited for.
    assert writes == [(2, True), (4, True), (6, True), (6, False)]


def test_background_rendering_writes_the_page(fit, tmp_path: Path) -> None:
    monitor = GradientFlowMonitor(every_n_steps=2)
    fit(ZooModule(small_resnet()), TileSet(n=16), monitor, max_steps=2)
    monitor.write(background=True)
    monitor.wait_for_report()
    assert (tmp_path / "gradflow" / "report.html").stat().st_size > 10_000


def test_accumulation_and_steps_without_backward(fit) -> None:
    class SkipsOddBatches(ZooModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    monitor = GradientFlowMonitor(every_n_steps=2, write_report=False)
    fit(SkipsOddBatches(small_resnet()), TileSet(), monitor, max_steps=6, accumulate_grad_batches=2)
    data = monitor.data
    assert data["steps"] == [0, 2, 4]
    assert all(r is not None for s in data["skips"] for r in s["ratio"])
    assert sum(len(m._forward_pre_hooks) for m in monitor._recorder.taps._modules) == 0


class RandomTiles(Dataset):
    """Random 6-band tiles with masks, scene names and windows: geobp's batch contract."""

    def __init__(self, n: int, size: int = 64, classes: int = 5) -> None:
        self.n, self.size, self.classes = n, size, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, self.classes, (self.size, self.size), generator=g)
        image = torch.randn(6, self.size, self.size, generator=g) + mask.float() / self.classes
        return {"image": image, "mask": mask, "scene": f"scene_{i % 2}",
                "window": torch.tensor([self.size * (i // 4), self.size * (i % 4), self.size, self.size])}


@pytest.mark.parametrize(("steps", "size", "every", "validate"), [
    (4, 32, 1, False),  # the first steps of a ResNet on CPU are slow (kernel selection)
    pytest.param(30, 64, 5, True, marks=pytest.mark.slow),
])
def test_geobp_unet_resnet18_end_to_end(tmp_path: Path, steps: int, size: int, every: int, validate: bool) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=6, num_classes=5)
    monitor = GradientFlowMonitor(every_n_steps=every)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(tmp_path), callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1 if validate else 0, val_check_interval=steps // 2,
                        gradient_clip_val=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, DataLoader(RandomTiles(3 * steps, size), batch_size=3),
                    DataLoader(RandomTiles(3, size), batch_size=3))
    out = Path(trainer.log_dir) / "gradflow"
    data = json.loads((out / "gradflow.json").read_text())
    assert data["steps"] == list(range(0, steps, every))
    assert [s["name"] for s in data["skips"] if s["kind"] == "unet"] == [
        "model.skips.layer3", "model.skips.layer2", "model.skips.layer1", "model.skips.stem"]
    assert sum(s["kind"] == "residual" for s in data["skips"]) == 8
    assert all(r is not None for s in data["skips"] for r in s["ratio"])
    assert data["bands"]["layer"] == "model.encoder.conv1" and len(data["bands"]["norm"][0]) == 6
    assert "train/loss_step" in data["metrics"]
    assert validate == ({"val/loss", "val/mIoU"} <= set(data["metrics"]))
    # A healthy ResNet U-Net: no vanishing, exploding or non-finite gradients.
    assert not {d["kind"] for d in data["diagnoses"]} & {"vanishing", "exploding", "nonfinite"}
    # Every recorded step's update ratio is measured: the U-Net's layers all move.
    assert len(data["update_ratio"]) == len(data["steps"])
    assert all(v is not None and v > 0 for row in data["update_ratio"] for v in row)
    assert data["frozen"] == [] and data["bands"]["names"] == [f"band_{b}" for b in range(1, 7)]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7


def test_steps_are_counted_when_a_planned_recording_is_missed(fit) -> None:
    from tests.callbacks.test_zoo import nan_grad_mlp

    class StopPlanning(L.Callback):
        """After the first recording, no step is planned any more: the per-step ring fills up."""

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            monitor.every_n_steps = 10**6

    monitor = GradientFlowMonitor(every_n_steps=3, step_check="deferred", write_report=False)
    fit(ZooModule(nan_grad_mlp(at=7)), TileSet(size=0, bands=16), monitor, max_steps=12, callbacks=[StopPlanning()])
    assert monitor.data["steps"] == [0]
    assert monitor.data["totals"] == {"steps_seen": 12, "nonfinite_steps": 5, "clipped_steps": None}
    assert [(e["step"], e["layer"]) for e in monitor.data["nonfinite"]] == [(7, "net.2")]


def test_yaml_config_builds_the_monitor() -> None:
    """The shape LightningCLI gives ``trainer.callbacks`` (via jsonargparse), thresholds included."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    config = parser.parse_string(
        "callbacks:\n"
        "  - class_path: geobp.callbacks.GradientFlowMonitor\n"
        "    init_args:\n"
        "      every_n_steps: 10\n"
        "      step_check: deferred\n"
        "      thresholds: {vanishing_ratio: 1.0e-5, persist: 0.5}\n")
    (monitor,) = parser.instantiate_classes(config).callbacks
    assert isinstance(monitor, GradientFlowMonitor)
    assert (monitor.every_n_steps, monitor.step_check) == (10, "deferred")
    assert (monitor.thresholds.vanishing_ratio, monitor.thresholds.persist, monitor.thresholds.min_recordings) == (
        1e-5, 0.5, 3)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--gradflow.thresholds.vanishing_ratio", "0", "error: gradflow.thresholds.vanishing_ratio must be a finite number "
                                                   "> 0 (found 0.0). Fix: set gradflow.thresholds.vanishing_ratio to a "
                                                   "finite number > 0, e.g. its default 0.0001."),
    ("--gradflow.thresholds", "{persist: 2}", "error: gradflow.thresholds.persist must be a number in (0, 1] (found "
                                              "2.0). Fix: set gradflow.thresholds.persist to a number in (0, 1], e.g. "
                                              "its default 0.8."),
])
def test_a_bad_threshold_in_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                                value: str, message: str) -> None:
    from geobp.cli import main
    from geobp.data.synth import write_scenes
    from tests.cli.test_cli import tiny_config

    write_scenes(tmp_path / "scenes", scenes=2, size=64, bands=3, classes=3, block_size=32)
    assert main(["fit", "--config", str(tiny_config(tmp_path, tmp_path / "scenes", val_fraction=0.5)), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_scenes_of_geobp_data_module_give_map_bounds(tmp_path: Path) -> None:
    from geobp.callbacks.gradflow import scene_georeference
    from geobp.callbacks.series import window_bounds
    from geobp.data.datamodule import GeoTiffDataModule
    from geobp.data.synth import write_scenes
    from geobp.raster import RasterInfo

    write_scenes(tmp_path / "scenes", scenes=2, size=64, bands=3, classes=3, block_size=32)
    dm = GeoTiffDataModule(str(tmp_path / "scenes"), num_classes=3, val_fraction=0.5)
    georef = scene_georeference(dm)
    assert sorted(georef) == sorted(s.name for s in dm.scenes)
    scene: RasterInfo = dm.scenes[1].image
    crs, transform = georef[dm.scenes[1].name]
    assert crs == scene.crs and transform == tuple(scene.transform)
    a, _, c, _, e, f = transform
    assert window_bounds(transform, [8, 16, 4, 2]) == [c + 16 * a, f + 12 * e, c + 18 * a, f + 8 * e]
    assert scene_georeference(None) == {} and scene_georeference(object()) == {}
