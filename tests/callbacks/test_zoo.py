"""The zoo: models with known gradient pathologies must be diagnosed as such, healthy ones not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from geobp.callbacks import GradientFlowMonitor, GradientFlowWarning
from tests.callbacks.zoo import (
    NaNForwardAt,
    NaNGradAt,
    TileSet,
    ZooModule,
    badly_scaled_mlp,
    deep_sigmoid_mlp,
    small_resnet,
)

PATHOLOGIES = {"vanishing", "exploding", "nonfinite", "dead_branch", "dead_band"}


def kinds(monitor: GradientFlowMonitor) -> set[str]:
    return {f.kind for f in monitor.findings}


def test_healthy_resnet_has_no_finding(fit, tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(small_resnet()), TileSet(), monitor, max_steps=20)
    assert kinds(monitor) == set()
    data = json.loads((tmp_path / "gradflow" / "gradflow.json").read_text())
    assert data["diagnoses"] == []
    assert data["steps"] == list(range(0, 20, 3))
    assert len(data["skips"]) == 3 and all(s["kind"] == "residual" for s in data["skips"])


def test_deep_sigmoid_network_is_vanishing(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    with pytest.warns(GradientFlowWarning, match="vanishing at net.0"):
        fit(ZooModule(deep_sigmoid_mlp()), TileSet(size=0, bands=16), monitor, max_steps=30)
    (finding,) = [f for f in monitor.findings if f.kind == "vanishing"]
    assert finding.where == "net.0"
    assert finding.step == 0
    assert finding.value < 1e-6
    assert "exploding" not in kinds(monitor)


def test_badly_scaled_network_is_exploding(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=2)
    fit(ZooModule(badly_scaled_mlp(gain=16.0), lr=1e-12), TileSet(size=0, bands=16), monitor, max_steps=20)
    (finding,) = [f for f in monitor.findings if f.kind == "exploding"]
    assert finding.value > 1e4
    assert finding.step == 0
    assert finding.where.startswith("net.")
    assert "vanishing" not in kinds(monitor)


def test_huge_learning_rate_explodes_then_goes_nonfinite(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=1)
    fit(ZooModule(badly_scaled_mlp(gain=1.0, depth=3), lr=3.0), TileSet(size=0, bands=16), monitor, max_steps=25)
    assert {"exploding", "nonfinite"} <= kinds(monitor)
    exploding = next(f for f in monitor.findings if f.kind == "exploding")
    nonfinite = next(f for f in monitor.findings if f.kind == "nonfinite")
    assert exploding.step < nonfinite.step


def nan_grad_mlp(at: int) -> nn.Sequential:
    """``suspect`` is where the gradient first goes NaN on the way back, at step ``at``."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), NaNGradAt(at), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize(("step_check", "every"), [("sync", 5), ("deferred", 5), ("deferred", 50), ("auto", 50)])
def test_nan_in_backward_names_the_layer_step_and_tiles(fit, step_check: str, every: int) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=every, step_check=step_check)
    with pytest.warns(GradientFlowWarning, match=r"nonfinite at net\.2 \(step 7\)"):
        fit(ZooModule(nan_grad_mlp(at=7)), TileSet(size=0, bands=16), monitor, max_steps=12)
    (finding,) = [f for f in monitor.findings if f.kind == "nonfinite"]
    assert (finding.where, finding.step) == ("net.2", 7)
    # One event for the run of non-finite steps that starts at step 7.
    (event,) = monitor.data["nonfinite"]
    assert event["step"] == 7 and event["layer"] == "net.2" and not event["all_layers"]
    # Step 7 is the 8th batch of 8 samples: samples 56..63.
    assert event["scenes"] == [f"scene_{i % 4}" for i in range(56, 64)]
    assert event["windows"][0] == [16 * 56, 8 * (56 % 3), 16, 16]
    assert "scene_0 (896, 16, 16, 16)" in finding.message
    # Without a loss scaler the NaN reaches the weights: every later step is non-finite too.
    assert monitor.data["totals"] == {"steps_seen": 12, "nonfinite_steps": 12 - 7, "clipped_steps": None}


def test_nan_in_forward_blames_the_loss_and_the_tiles(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=5)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), NaNForwardAt(3), nn.Linear(32, 4))
    fit(ZooModule(net), TileSet(size=0, bands=16), monitor, max_steps=6)
    (finding,) = [f for f in monitor.findings if f.kind == "nonfinite"]
    assert (finding.where, finding.step) == ("loss", 3)
    assert "forward pass" in finding.message and "scene_0 (384, 0, 16, 16)" in finding.message
    assert monitor.data["nonfinite"][0]["all_layers"]


def test_dead_band_is_found(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(small_resnet(bands=4)), TileSet(bands=4, dead_band=2), monitor, max_steps=15)
    (finding,) = [f for f in monitor.findings if f.kind == "dead_band"]
    assert finding.where == "band 2 (net.0)"
    assert finding.value == 0.0
    assert kinds(monitor) == {"dead_band"}


def test_dead_residual_branch_is_found(fit) -> None:
    torch.manual_seed(0)
    net = small_resnet()
    with torch.no_grad():
        net[5].conv1.weight.zero_()
        net[5].conv2.weight.zero_()
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(net), TileSet(), monitor, max_steps=15)
    (finding,) = [f for f in monitor.findings if f.kind == "dead_branch"]
    assert finding.where == "net.5 branch"
    assert finding.value == 0.0
