"""Diagnosis rules on hand-written series."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from geobp.callbacks.diagnosis import Finding, Thresholds, diagnose, encode_float, persistent_start

T = Thresholds()


def doc(steps: int = 10, layers: int = 10, norm: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A healthy series: every layer has the same RMS gradient, total norm 1."""
    data: dict[str, Any] = {
        "meta": {"loss_scaler": False, "gradient_clip_val": None},
        "layers": [{"name": f"l{j}", "type": "Linear", "numel": 100} for j in range(layers)],
        "steps": list(range(0, 10 * steps, 10)),
        "layer_norm": [[norm] * layers for _ in range(steps)],
        "total_norm": [norm * layers ** 0.5] * steps,
        "steps_seen": [10 * i + 1 for i in range(steps)],
        "clipped_steps": [None] * steps,
        "nonfinite_steps": [0] * steps,
        "loss_scale": [None] * steps,
        "bands": None, "skips": [], "nonfinite": [],
    }
    data.update(extra)
    return data


def test_healthy_series_has_no_finding() -> None:
    assert diagnose(doc()) == []


def test_persistence_needs_a_lasting_condition() -> None:
    t = Thresholds(persist=0.8, min_recordings=3)
    assert persistent_start(np.array([1, 1, 1, 1], bool), t) == 0
    assert persistent_start(np.array([0, 1, 0, 0, 1, 1, 1], bool), t) == 4
    assert persistent_start(np.array([1, 1, 0, 0, 0], bool), t) is None  # a passing phase
    assert persistent_start(np.array([0, 1, 1], bool), t) is None  # too few recordings
    assert persistent_start(np.array([], bool), t) is None


def test_vanishing_compares_early_layers_with_the_head() -> None:
    data = doc()
    for row in data["layer_norm"][3:]:
        row[0] = 1e-7
    (f,) = diagnose(data)
    assert (f.kind, f.where, f.step) == ("vanishing", "l0", 30)
    assert f.value == pytest.approx(1e-7)
    assert "gradients vanish" in f.message and "normalization" in f.fix
    # A zero early gradient with a live head is vanishing too.
    for row in data["layer_norm"]:
        row[0] = 0.0
    assert [g.kind for g in diagnose(data)] == ["vanishing"]


def test_vanishing_ignores_recordings_without_a_usable_ratio() -> None:
    data = doc()
    for row in data["layer_norm"]:
        row[0] = 1e-7
    data["layer_norm"][1] = [None] * 10
    data["layer_norm"][2][0] = "nan"
    (f,) = diagnose(data)
    assert f.kind == "vanishing" and f.step == 0


def test_exploding_by_bound_by_growth_and_by_clipping() -> None:
    big = doc(total_norm=[2e4] * 10)
    big["layer_norm"][0][4] = 100.0
    (f,) = diagnose(big)
    assert (f.kind, f.where, f.step) == ("exploding", "l4", 0) and f.value == 2e4

    growing = doc(total_norm=[1.0, 1.0, 1.0, 10.0, 1e2, 2e3, 3e3, 5e3, "inf", "nan"])
    (f,) = diagnose(growing)
    assert (f.kind, f.step) == ("exploding", 50)
    assert "grew" in f.message and f.value == pytest.approx(3e3)

    clipped = doc(meta={"loss_scaler": False, "gradient_clip_val": 0.5}, clipped=[True] * 10,
                  clipped_steps=[None] * 9 + [80], totals={"steps_seen": 100, "clipped_steps": 80})
    (f,) = diagnose(clipped)
    assert (f.kind, f.where) == ("exploding", "gradient clipping")
    assert f.value == pytest.approx(0.8) and "80% of steps" in f.message and "0.5" in f.message
    assert diagnose(doc(totals={"steps_seen": 100, "clipped_steps": 40})) == []


def test_nonfinite_without_scaler_reports_the_first_event() -> None:
    events = [{"step": 42, "layer": "l3", "all_layers": False, "scenes": ["a", "b"],
               "windows": [[0, 0, 8, 8], [8, 0, 8, 8]]},
              {"step": 50, "layer": "l9", "all_layers": True, "scenes": None, "windows": None}]
    (f,) = diagnose(doc(nonfinite=events, nonfinite_steps=[0] * 9 + [7]))
    assert (f.kind, f.where, f.step, f.value) == ("nonfinite", "l3", 42, 7.0)
    assert "a (0, 0, 8, 8), b (8, 0, 8, 8)" in f.message


def test_nonfinite_count_is_never_below_the_events_seen() -> None:
    # the event is stored on its step; the series' count is taken at the recording before it
    events = [{"step": 7, "layer": "l2", "all_layers": False, "scenes": None, "windows": None}]
    (f,) = diagnose(doc(nonfinite=events))
    assert f.value == 1.0 and "1 non-finite step(s) in all" in f.message
    (f,) = diagnose(doc(nonfinite=events, totals={"steps_seen": 99, "nonfinite_steps": 3, "clipped_steps": 0}))
    assert f.value == 3.0


def test_nonfinite_under_a_scaler_only_when_the_scale_collapses_or_the_loss_is_nan() -> None:
    overflow = [{"step": s, "layer": "l2", "all_layers": False} for s in (0, 1, 2)]
    meta = {"loss_scaler": True, "gradient_clip_val": None}
    calibrating = doc(meta=meta, nonfinite=overflow, loss_scale=[2.0**13] * 10)
    assert diagnose(calibrating) == []
    collapsed = doc(meta=meta, nonfinite=overflow, loss_scale=[2.0**13] * 9 + [0.25])
    (f,) = diagnose(collapsed)
    assert (f.kind, f.where, f.step) == ("nonfinite", "l2", 2) and "loss scale 0.25" in f.message
    bad_loss = doc(meta=meta, nonfinite=[*overflow, {"step": 7, "layer": "l9", "all_layers": True}],
                   loss_scale=[2.0**13] * 10)
    (f,) = diagnose(bad_loss)
    assert (f.where, f.step) == ("loss", 7) and "forward pass" in f.message


def test_dead_branch_and_dead_band() -> None:
    skips = [
        {"name": "b1", "kind": "residual", "paths": ["branch", "shortcut"], "norms": [[1e-6, 1.0]] * 10},
        {"name": "b2", "kind": "residual", "paths": ["branch", "shortcut"], "norms": [[1.0, 1e-6]] * 10},
        {"name": "s1", "kind": "unet", "paths": ["skip", "deeper"], "norms": [[1.0, 0.0]] * 5 + [[1.0, 1e-9]] * 5},
        {"name": "s2", "kind": "unet", "paths": ["skip", "deeper"], "norms": [[None, None]] * 10},
    ]
    bands = {"layer": "conv", "norm": [[1.0, 2.0, 1e-5, 1.5]] * 10}
    found = {(f.kind, f.where): f for f in diagnose(doc(skips=skips, bands=bands))}
    # A residual shortcut is never "dead"; a U-Net deeper path can be.
    assert set(found) == {("dead_branch", "b1 branch"), ("dead_branch", "s1 deeper"),
                          ("dead_band", "band 2 (conv)")}
    assert found[("dead_branch", "b1 branch")].value == pytest.approx(1e-6)
    assert found[("dead_branch", "s1 deeper")].step == 0
    assert found[("dead_band", "band 2 (conv)")].value == pytest.approx(1e-5 / 1.25)


def test_findings_are_sorted_and_serialisable() -> None:
    data = doc(total_norm=[2e4] * 10, bands={"layer": "c", "norm": [[1.0, 0.0]] * 10})
    assert [f.kind for f in diagnose(data)] == ["exploding", "dead_band"]
    f = Finding("nonfinite", "x", 3, float("nan"), "m", "f")
    assert f.to_dict() == {"kind": "nonfinite", "where": "x", "step": 3, "value": "nan", "message": "m", "fix": "f"}
    assert [encode_float(v) for v in (1.5, float("inf"), float("-inf"), None)] == [1.5, "inf", "-inf", None]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"vanishing_ratio": 0}, r"Thresholds.vanishing_ratio must be > 0 \(found 0\)"),
    ({"persist": 1.5}, r"clip_fraction and persist must be in \(0, 1\]"),
    ({"min_recordings": 0}, r"min_recordings must be >= 1"),
])
def test_thresholds_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Thresholds(**kwargs)


def test_clipping_during_warm_up_alone_is_not_exploding() -> None:
    # a healthy run: large norms (clipped) over its first recording window, not yet 3 recordings
    meta = {"loss_scaler": False, "gradient_clip_val": 1.0}
    early = doc(steps=1, meta=meta, clipped=[True], clipped_steps=[23], totals={"steps_seen": 25, "clipped_steps": 23})
    assert diagnose(early) == []
    # the same fraction lasting over min_recordings recordings is a finding
    lasting = doc(steps=3, meta=meta, clipped=[True] * 3, clipped_steps=[23, 46, 69],
                  totals={"steps_seen": 75, "clipped_steps": 69})
    (f,) = diagnose(lasting)
    assert (f.kind, f.where) == ("exploding", "gradient clipping")
