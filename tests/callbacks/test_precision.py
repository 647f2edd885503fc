"""Under fp16 with a loss scaler the monitor reports true (unscaled) gradients: the proof."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor
from torch.utils.data import DataLoader

from geobp.callbacks import GradientFlowMonitor
from geobp.callbacks.measure import find_layers
from geobp.callbacks.skips import SkipTaps, find_skips
from tests.callbacks.zoo import TileSet, ZooModule, small_resnet

SCALE = 2.0**10


class WithFp32Reference(ZooModule):
    """Before each optimizer step, recompute the step's gradients in fp32, unscaled, on a copy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: dict[int, dict[str, Any]] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._batch = batch
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Runs after the callbacks' hook, on the same weights, outside autocast.
        ref = copy.deepcopy(self.net).float()
        ref.zero_grad(set_to_none=True)
        taps = SkipTaps(ref, find_skips(ref))
        taps.arm()
        with torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(ref(self._batch["image"].float()), self._batch["target"])
            loss.backward()
        taps.disarm()
        layers, params = find_layers(ref)
        layer_norms = [math.sqrt(sum(float(params[i].grad.double().square().sum()) for i in x.params)) for x in layers]
        self.reference[self.global_step] = {
            "total": math.sqrt(sum(n * n for n in layer_norms)),
            "layers": layer_norms,
            "skips": taps.collect().tolist(),
            "loss": float(loss),
        }


def test_fp16_norms_are_unscaled(fit) -> None:
    torch.manual_seed(0)
    module = WithFp32Reference(small_resnet(), lr=0.01)
    monitor = GradientFlowMonitor(every_n_steps=2)
    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))
    fit(module, TileSet(), monitor, max_steps=6, plugins=[precision])
    data = monitor.data
    assert data["meta"]["loss_scaler"] and data["loss_scale"] == [SCALE] * 3
    assert data["nonfinite_steps"][-1] == 0
    for i, step in enumerate(data["steps"]):
        ref = module.reference[step]
        # Equal to the fp32 gradient within fp16 rounding, and nowhere near SCALE times it.
        assert data["total_norm"][i] == pytest.approx(ref["total"], rel=2e-2)
        assert abs(math.log2(data["total_norm"][i] / ref["total"])) < 0.05
        assert data["layer_norm"][i] == pytest.approx(ref["layers"], rel=5e-2)
        assert data["loss"][i] == pytest.approx(ref["loss"], rel=1e-2)
        # Skip norms come from activation gradients, which the scaler never unscales.
        skips = [v for s in data["skips"] for v in s["norms"][i]]
        assert skips == pytest.approx([v for pair in ref["skips"] for v in pair], rel=5e-2)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_cuda_norms_match_fp32_reference(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    module = WithFp32Reference(small_resnet(), lr=0.01)
    monitor = GradientFlowMonitor(every_n_steps=2)
    trainer = L.Trainer(max_steps=6, accelerator="cuda", devices=1, precision=precision, logger=False,
                        default_root_dir=tmp_path, callbacks=[monitor], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TileSet(), batch_size=8))
    data = monitor.data
    # 16-mixed has a scaler that syncs every step anyway, so "auto" checks every step.
    assert data["meta"]["step_check"] == ("sync" if precision == "16-mixed" else "deferred")
    assert data["meta"]["loss_scaler"] == (precision == "16-mixed")
    rel = 2e-2 if precision == "16-mixed" else (1e-1 if precision == "bf16-mixed" else 1e-4)
    for i, step in enumerate(data["steps"]):
        ref = module.reference[step]
        assert data["total_norm"][i] == pytest.approx(ref["total"], rel=rel)
        assert data["loss"][i] == pytest.approx(ref["loss"], rel=rel)
        skips = [v for s in data["skips"] for v in s["norms"][i]]
        assert skips == pytest.approx([v for pair in ref["skips"] for v in pair], rel=max(rel, 5e-2))


@pytest.mark.gpu
@requires_cuda
def test_cuda_deferred_nonfinite_is_reported_at_the_next_recording(tmp_path: Path) -> None:
    from tests.callbacks.test_zoo import nan_grad_mlp

    monitor = GradientFlowMonitor(every_n_steps=5, step_check="deferred")
    trainer = L.Trainer(max_steps=12, accelerator="cuda", devices=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(ZooModule(nan_grad_mlp(at=7)), DataLoader(TileSet(size=0, bands=16), batch_size=8))
    event = monitor.data["nonfinite"][0]
    assert (event["step"], event["layer"]) == (7, "net.2")
    assert event["windows"][0] == [16 * 56, 8 * (56 % 3), 16, 16]
    assert monitor.data["totals"]["nonfinite_steps"] == 5


@pytest.mark.gpu
@requires_cuda
def test_cuda_fp16_loss_scale_collapse_is_found(tmp_path: Path) -> None:
    """Lightning's own 16-mixed on a GPU (its GradScaler, init scale 2**16): overflowing backward
    passes on every step drive the scale below 1 and every step is skipped."""
    from torch import nn

    from tests.callbacks.zoo import OverflowingBackward

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), OverflowingBackward(), nn.ReLU(), nn.Linear(32, 4))
    monitor = GradientFlowMonitor(every_n_steps=2)
    trainer = L.Trainer(max_steps=40, accelerator="cuda", devices=1, precision="16-mixed", logger=False,
                        default_root_dir=tmp_path, callbacks=[monitor], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ZooModule(net), DataLoader(TileSet(size=0, bands=16), batch_size=8))
    (finding,) = [f for f in monitor.findings if f.kind == "loss_scale"]
    assert finding.value < 1.0 and monitor.data["loss_scale"][0] == 2.0**16
    assert monitor.data["totals"]["nonfinite_steps"] == 40  # the scale stays below 1 from step 17 on
