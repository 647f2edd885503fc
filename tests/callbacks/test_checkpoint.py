"""The monitor's state goes into checkpoints: a resumed run continues the series it recorded.

Each case fits a small model in one go, and again in two parts: the first stops at an epoch end
with a checkpoint, the second is a fresh Trainer, model and monitor resumed from it
(``ckpt_path``). On the CPU with one thread and the same seed the two final ``gradflow.json``
are equal except for ``meta.updated`` and ``meta.resumed_at``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from geobp.callbacks import GradientFlowMonitor, GradientFlowWarning
from geobp.callbacks.series import thin
from tests.callbacks.test_zoo import nan_grad_mlp
from tests.callbacks.zoo import TileSet, ZooModule, deep_sigmoid_mlp, small_resnet


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order in every run: equal floats
    yield
    torch.set_num_threads(threads)


def fit(root: Path, net: Any, data: TileSet, max_steps: int, every: int, ckpt_path: Path | None = None,
        save_every_epoch: bool = False, **kwargs: Any) -> tuple[GradientFlowMonitor, list[str]]:
    """Fit on CPU (2 batches an epoch); return the monitor and the GradientFlowWarnings issued."""
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=every, **kwargs)
    callbacks: list[L.Callback] = [monitor]
    if save_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
                        enable_checkpointing=save_every_epoch, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, gradient_clip_val=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", GradientFlowWarning)
        trainer.fit(ZooModule(net(), lr=0.2, optimizer="adam"), DataLoader(data, batch_size=8),
                    ckpt_path=str(ckpt_path) if ckpt_path else None)
    return monitor, [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]


def report(root: Path) -> dict[str, Any]:
    data = json.loads((root / "gradflow" / "gradflow.json").read_text())
    data["meta"].pop("updated")
    return data


@pytest.mark.parametrize(("net", "data", "step_check", "stop", "every"), [
    (small_resnet, TileSet(n=8), "sync", 6, 4),  # the checkpoint falls between recordings (ring drained)
    (small_resnet, TileSet(n=8), "deferred", 6, 4),
    # NaN from step 2 on, seen by the checkpoint's read of the ring: one event, not a second one after it
    (lambda: nan_grad_mlp(at=2), TileSet(n=8, size=0, bands=16), "deferred", 3, 3),
], ids=["resnet-sync", "resnet-deferred", "nan-event"])
@pytest.mark.slow
def test_resumed_run_reports_like_an_uninterrupted_one(tmp_path: Path, net: Any, data: TileSet, step_check: str,
                                                        stop: int, every: int) -> None:
    kwargs = {"step_check": step_check, "report_every_s": 1e9}
    fit(tmp_path / "whole", net, data, 12, every, **kwargs)
    first, _ = fit(tmp_path / "first", net, data, stop, every, save_every_epoch=True, **kwargs)
    ckpt = tmp_path / "first" / "ckpt" / f"epoch={stop - 1}-step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["GradientFlowMonitor"]  # plain data only
    assert state["counters"]["steps_seen"] == stop
    resumed, _ = fit(tmp_path / "resumed", net, data, 12, every, ckpt_path=ckpt, **kwargs)

    whole, after = report(tmp_path / "whole"), report(tmp_path / "resumed")
    assert after["meta"].pop("resumed_at") == [stop]
    assert after["steps"] == whole["steps"] == list(range(0, 12, every)) and after["totals"]["steps_seen"] == 12
    assert after == whole
    if stop == 3:
        assert [e["step"] for e in after["nonfinite"]] == [2] and after["totals"]["nonfinite_steps"] == 10


def test_each_finding_is_warned_once_over_the_resumed_run(tmp_path: Path) -> None:
    data = TileSet(n=8, size=0, bands=16)
    _, whole = fit(tmp_path / "whole", deep_sigmoid_mlp, data, 16, 2, write_report=False)
    _, first = fit(tmp_path / "first", deep_sigmoid_mlp, data, 8, 2, save_every_epoch=True, write_report=False)
    assert len(first) == 1 and first[0].startswith("GradientFlowMonitor: vanishing at net.0 (step 0)")
    monitor, then = fit(tmp_path / "resumed", deep_sigmoid_mlp, data, 16, 2, write_report=False,
                        ckpt_path=tmp_path / "first" / "ckpt" / "epoch=7-step=8.ckpt")
    assert not any("vanishing" in m for m in then)  # warned before the checkpoint
    assert first + then == whole  # a later finding (clipping on most steps) is warned after the resume
    assert [f.kind for f in monitor.findings][-1] == "vanishing"
    assert monitor.data["steps"] == list(range(0, 16, 2))


def test_a_series_of_another_model_is_not_continued(tmp_path: Path) -> None:
    saved, _ = fit(tmp_path / "first", small_resnet, TileSet(n=16), 4, 2, write_report=False)
    state = saved.state_dict()

    class Resume(L.Callback):
        """Hands the monitor another model's state where Lightning would (after setup, before step 0)."""

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            monitor.load_state_dict(state)

    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=2, write_report=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, Resume()])
    with pytest.warns(GradientFlowWarning, match=r"the checkpoint's gradient-flow series is not continued: its layers "
                                                 r"differ from the model's \(\('net.0', 216\) != \('net.0', 108\)\); "
                                                 r"a new series starts here"):
        trainer.fit(ZooModule(small_resnet(width=4)), DataLoader(TileSet(n=16), batch_size=8))
    assert monitor.data["steps"] == [0, 2] and "resumed_at" not in monitor.data["meta"]
    assert monitor.data["totals"]["steps_seen"] == 4


def test_one_monitor_per_trainer() -> None:
    with pytest.raises(RuntimeError, match="Found more than one stateful callback of type `GradientFlowMonitor`"):
        L.Trainer(callbacks=[GradientFlowMonitor(), GradientFlowMonitor(every_n_steps=5)], logger=False)


def test_checkpoint_state_is_bounded_by_thinning(tmp_path: Path) -> None:
    monitor, _ = fit(tmp_path, small_resnet, TileSet(n=16), 40, 1, write_report=False, max_recordings=10)
    data = monitor.data
    # 40 recordings, halved to 6 whenever there were 11: the first and latest are kept.
    assert data["meta"]["thinned"] == 6  # at recordings 11, 16, 21, ... 36
    assert data["steps"][0] == 0 and data["steps"][-1] == 39 and len(data["steps"]) <= 10
    assert all(len(data[k]) == len(data["steps"]) for k in ("layer_norm", "total_norm", "steps_seen", "loss"))
    assert all(len(s["ratio"]) == len(data["steps"]) for s in data["skips"])
    assert data["steps_seen"][-1] == 39 + 1
    buf = io.BytesIO()
    torch.save(monitor.state_dict(), buf)
    assert buf.tell() < 40_000  # about 1.3 kB a recording for this model, 10 recordings at most


def test_thin_keeps_first_and_latest() -> None:
    doc = {"steps": list(range(7)), "bands": None, "skips": [], "metrics": {"m": [[i, i] for i in range(9)]},
           "meta": {}, **{k: list(range(7)) for k in ("layer_norm", "layer_max_abs", "update_ratio", "total_norm",
                                                         "clipped", "steps_seen", "clipped_steps", "nonfinite_steps",
                                                         "loss_scale", "loss")}}
    assert not thin(doc, 7)
    doc["steps"].append(7)
    for k in ("layer_norm", "layer_max_abs", "update_ratio", "total_norm", "clipped", "steps_seen", "clipped_steps",
              "nonfinite_steps", "loss_scale", "loss"):
        doc[k].append(7)
    assert thin(doc, 7)
    assert doc["steps"] == doc["loss"] == doc["update_ratio"] == [0, 2, 4, 6, 7]
    assert doc["metrics"]["m"] == [[0, 0], [2, 2], [4, 4], [6, 6], [8, 8]] and doc["meta"]["thinned"] == 1
