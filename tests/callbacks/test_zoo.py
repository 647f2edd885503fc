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
    OverflowingBackward,
    TileSet,
    ZooData,
    ZooModule,
    badly_scaled_mlp,
    deep_sigmoid_mlp,
    small_resnet,
)


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
    assert finding.where == "band_3 (net.0)"
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


# ----- second generation: band scale, stalled and unstable updates, loss scale, located tiles ----------------

def test_mis_scaled_band_is_named_with_its_factor(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    data = ZooData(TileSet(bands=4, scaled_band=(3, 1000.0)), band_names=["B02", "B03", "B04", "B08"])
    fit(ZooModule(small_resnet(bands=4), lr=1e-4), data, monitor, max_steps=15)
    (finding,) = [f for f in monitor.findings if f.kind == "band_scale"]
    assert finding.where == "B08 (net.0)"
    assert finding.value > 100 and f"gets {finding.value:.3g}x the median gradient" in finding.message
    assert monitor.data["bands"]["names"] == ["B02", "B03", "B04", "B08"]


def test_parameters_left_out_of_the_optimizer_are_stalled(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(small_resnet(), exclude=("net.0.", "net.1.")), TileSet(), monitor, max_steps=15)
    (finding,) = [f for f in monitor.findings if f.kind == "stalled"]
    assert finding.where == "net.0" and "2 of 17 layer(s)" in finding.message and "in net.0, net.1" in finding.message
    assert finding.value == 0.0
    ratios = monitor.data["update_ratio"]
    assert len(ratios) == len(monitor.data["steps"]) == 5
    assert all(row[0] == 0.0 and row[1] == 0.0 and 1e-5 < row[2] < 1 for row in ratios)
    assert kinds(monitor) == {"stalled"}


def test_an_encoder_frozen_on_purpose_raises_no_alarm(fit) -> None:
    torch.manual_seed(0)
    net = small_resnet()
    net[:4].requires_grad_(False)
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(net), TileSet(), monitor, max_steps=15)
    assert kinds(monitor) == set()
    frozen = [x["name"] for x in monitor.data["frozen"]]
    assert frozen == ["net.0", "net.1", "net.3.conv1", "net.3.bn1", "net.3.conv2", "net.3.bn2"]
    assert not set(frozen) & {x["name"] for x in monitor.data["layers"]}
    assert monitor.data["bands"] is None or monitor.data["bands"]["layer"] != "net.0"


def test_too_large_a_learning_rate_gives_unstable_updates_before_exploding(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=1)
    fit(ZooModule(badly_scaled_mlp(gain=1.0, depth=3), lr=3.0), TileSet(size=0, bands=16), monitor, max_steps=25)
    unstable = next(f for f in monitor.findings if f.kind == "unstable_updates")
    exploding = next(f for f in monitor.findings if f.kind == "exploding")
    assert unstable.value > 0.1 and unstable.step < exploding.step
    calm = GradientFlowMonitor(every_n_steps=2)
    fit(ZooModule(small_resnet(), lr=1e-3, optimizer="adam"), TileSet(), calm, max_steps=12)
    assert kinds(calm) == set()


def test_loss_scale_driven_down_with_every_step_skipped(fit) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), OverflowingBackward(), nn.ReLU(), nn.Linear(32, 4))
    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    monitor = GradientFlowMonitor(every_n_steps=2)
    fit(ZooModule(net), TileSet(size=0, bands=16), monitor, max_steps=16, plugins=[precision])
    (finding,) = [f for f in monitor.findings if f.kind == "loss_scale"]
    assert finding.value < 1.0 and "100% of the steps since step" in finding.message
    assert monitor.data["loss_scale"][0] == 2.0**4 and monitor.data["loss_scale"][-1] == 2.0 ** (4 - 14)
    # skipped steps do not count as stalled: their update ratios are not measured
    assert all(row is None for row in monitor.data["update_ratio"])


@pytest.mark.parametrize(("step_check", "every"), [("sync", 5), ("deferred", 3)])  # deferred: found at step 6
def test_nonfinite_tiles_are_located_on_the_ground_with_their_bad_bands(fit, step_check: str, every: int) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=every, step_check=step_check)
    # sample 42 (step 5, the third tile of its batch) has a NaN pixel in its "nir" band
    data = ZooData(TileSet(bands=3, nan_pixel=(42, 1)), band_names=["red", "nir", "swir"])
    fit(ZooModule(small_resnet()), data, monitor, max_steps=7)
    (finding,) = [f for f in monitor.findings if f.kind == "nonfinite"]
    assert (finding.where, finding.step) == ("loss", 5)
    (event,) = monitor.data["nonfinite"]
    # tile 40: scene_0, window (row 640, col 8, 16 x 16) on a 10 m grid at x0 = 400000, y0 = 5500000
    assert event["bounds"][0] == [400080.0, 5500000.0 - 6560.0, 400240.0, 5500000.0 - 6400.0]
    assert event["crs"][0] == "EPSG:32633" and event["bounds"][1][0] == 410160.0
    assert event["band_max_abs"][2][1] == "nan" and all(v != "nan" for v in event["band_max_abs"][0])
    assert "scene_0 (640, 8, 16, 16) at (400080, 5.49344e+06, 400240, 5.4936e+06) in EPSG:32633" in finding.message
    assert "scene_2 (672, 0, 16, 16) at (420000, 5.49312e+06, 420160, 5.49328e+06) in EPSG:32633 " \
           "[non-finite input: nir]" in finding.message


# ----- healthy runs that must raise no alarm ------------------------------------------------------------------

def test_bf16_autocast_on_cpu_raises_no_alarm(fit) -> None:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(ZooModule(small_resnet()), TileSet(), monitor, max_steps=15, precision="bf16-mixed")
    assert monitor.data["meta"]["precision"] == "bf16-mixed"
    assert kinds(monitor) == set()
    assert all(r is not None and all(v is not None and v > 0 for v in r) for r in monitor.data["update_ratio"])


@pytest.mark.slow  # a full ResNet-18 DeepLabV3
def test_healthy_deeplabv3_raises_no_alarm(fit) -> None:
    from geobp.models import create_model

    torch.manual_seed(0)
    net = nn.Sequential(create_model("deeplabv3", encoder="resnet18", in_channels=4, num_classes=4),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    monitor = GradientFlowMonitor(every_n_steps=1, write_report=False)  # a recording per step: 4 steps suffice
    fit(ZooModule(net, lr=1e-3, optimizer="adam"), TileSet(n=16, bands=4, size=32), monitor, max_steps=4, batch_size=4)
    assert len(monitor.data["steps"]) == 4
    assert kinds(monitor) == set()
    assert len(monitor.data["skips"]) == 8 and monitor.data["bands"]["names"] == [f"band_{b}" for b in (1, 2, 3, 4)]
