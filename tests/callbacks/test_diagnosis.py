"""Diagnosis rules on hand-written series."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from geobp.callbacks.diagnosis import Finding, Thresholds, diagnose, encode_float, persistent_start
from geobp.errors import ConfigError

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
    bands = {"layer": "conv", "names": ["B1", "B2", "B3", "B4"], "norm": [[1.0, 2.0, 1e-5, 1.5]] * 10}
    found = {(f.kind, f.where): f for f in diagnose(doc(skips=skips, bands=bands))}
    # A residual shortcut is never "dead"; a U-Net deeper path can be.
    assert set(found) == {("dead_branch", "b1 branch"), ("dead_branch", "s1 deeper"),
                          ("dead_band", "B3 (conv)")}
    assert found[("dead_branch", "b1 branch")].value == pytest.approx(1e-6)
    assert found[("dead_branch", "s1 deeper")].step == 0
    assert found[("dead_band", "B3 (conv)")].value == pytest.approx(1e-5 / 1.25)
    assert "input band B3 gets" in found[("dead_band", "B3 (conv)")].message
    # Without names (or with the wrong number of them) bands are band_1..band_C.
    unnamed = {f.where for f in diagnose(doc(bands={**bands, "names": ["x"]}))}
    assert unnamed == {"band_3 (conv)"}


def test_findings_are_sorted_and_serialisable() -> None:
    data = doc(total_norm=[2e4] * 10, bands={"layer": "c", "norm": [[1.0, 0.0]] * 10})
    assert [f.kind for f in diagnose(data)] == ["exploding", "dead_band"]
    f = Finding("nonfinite", "x", 3, float("nan"), "m", "f")
    assert f.to_dict() == {"kind": "nonfinite", "where": "x", "step": 3, "value": "nan", "message": "m", "fix": "f"}
    assert [encode_float(v) for v in (1.5, float("inf"), float("-inf"), None)] == [1.5, "inf", "-inf", None]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"vanishing_ratio": 0}, r"^gradflow\.thresholds\.vanishing_ratio must be a finite number > 0 \(found 0\)\. "
                             r"Fix: set gradflow\.thresholds\.vanishing_ratio to a finite number > 0, e\.g\. its "
                             r"default 0\.0001\.$"),
    ({"persist": 1.5}, r"gradflow\.thresholds\.persist must be a number in \(0, 1\] \(found 1\.5\)"),
    ({"skip_fraction": float("nan")}, r"gradflow\.thresholds\.skip_fraction must be a number in \(0, 1\] \(found nan\)"),
    ({"min_recordings": 0}, r"gradflow\.thresholds\.min_recordings must be an integer >= 1 \(found 0\)"),
    ({"min_recordings": 2.5}, r"gradflow\.thresholds\.min_recordings must be an integer >= 1 \(found 2\.5\)"),
    ({"band_scale_ratio": "big"}, r"gradflow\.thresholds\.band_scale_ratio must be a finite number > 0 \(found 'big'\)"),
    ({"stalled_ratio": float("inf")}, r"gradflow\.thresholds\.stalled_ratio must be a finite number > 0"),
])
def test_thresholds_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
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


def test_logged_early_head_ratio_is_the_vanishing_rules_ratio() -> None:
    # 20 layers: early/head are medians of two layers each, where an upper median and a mean of
    # the two middle values differ; None and NaN entries are left out by both.
    from geobp.callbacks.diagnosis import early_head_ratios
    from geobp.callbacks.series import latest_scalars

    rng = np.random.default_rng(0)
    data = doc(layers=20)
    data["layer_norm"] = [[float(v) for v in 10.0 ** rng.uniform(-9, 0, 20)] for _ in range(10)]
    data["layer_norm"][4][1] = None
    data["layer_norm"][6][19] = "nan"
    data.update(skips=[], bands=None, clipped_steps=[None] * 10)
    ratios = early_head_ratios(data["layers"], data["layer_norm"])
    for i in range(10):
        upto = {**data, **{k: data[k][: i + 1] for k in ("steps", "layer_norm", "total_norm", "steps_seen",
                                                         "nonfinite_steps")}}
        logged = latest_scalars(upto, clipping=False, loss_scaler=False)["gradflow/early_head_ratio"]
        assert logged == ratios[i]
    row = np.array(data["layer_norm"][0]) / 10.0
    assert ratios[0] == pytest.approx(np.mean(row[:2]) / np.mean(row[-2:]))
    # The rule fires on exactly those values.
    t = Thresholds(vanishing_ratio=float(np.sort(ratios)[3]) * 1.0001, persist=0.1, min_recordings=1)
    (f,) = [f for f in diagnose(data, t) if f.kind == "vanishing"]
    assert f.step == data["steps"][int(np.flatnonzero(ratios < t.vanishing_ratio)[0])]


def test_band_scale_names_the_band_and_the_factor() -> None:
    bands = {"layer": "net.0", "names": ["B02", "B03", "B04", "B08"],
             "norm": [[1.0, 1.2, 0.9, 800.0]] * 2 + [[1.0, 1.1, 1.0, 1500.0]] * 8}
    (f,) = diagnose(doc(bands=bands))
    assert (f.kind, f.where, f.step) == ("band_scale", "B08 (net.0)", 0)
    assert f.value == pytest.approx(1500.0 / 1.0)
    assert "input band B08 gets 1.5e+03x the median gradient of the other bands in net.0" in f.message
    assert "normalization statistics" in f.fix
    # Two bands: compared with each other; a 10x spread is healthy.
    assert diagnose(doc(bands={"layer": "c", "norm": [[1.0, 10.0]] * 10})) == []
    (f,) = diagnose(doc(bands={"layer": "c", "norm": [[1.0, 1e3]] * 10}))
    assert (f.kind, f.where) == ("band_scale", "band_2 (c)")


def updates(rows: list[list[Any]], **extra: Any) -> dict[str, Any]:
    """A healthy series of len(rows) recordings whose layers moved by ``rows`` (update ratios)."""
    return doc(steps=len(rows), layers=len(rows[-1]), update_ratio=rows, **extra)


def test_stalled_layers_are_named_and_frozen_ones_are_not() -> None:
    healthy = [[1e-3, 2e-3, 5e-4, 1e-3]] * 10
    assert diagnose(updates(healthy)) == []
    stalled = [[1e-3, 0.0, 0.0, 1e-3]] * 2 + [[1e-3, 0.0, 1e-9, 1e-3]] * 8
    (f,) = diagnose(updates(stalled, frozen=[{"name": "enc", "type": "Conv2d", "numel": 9}]))
    assert (f.kind, f.where, f.step) == ("stalled", "l1", 0)
    assert "2 of 4 layer(s) get gradients but do not change" in f.message and "in l1, l2" in f.message
    assert "1 frozen layer(s) (requires_grad=False) are not checked" in f.message
    assert "optimizer" in f.fix
    # A layer without gradient is not "stalled": nothing asked it to move.
    no_grad = updates(stalled)
    for row in no_grad["layer_norm"]:
        row[1] = row[2] = 0.0
    assert diagnose(no_grad) == []
    # Unmeasured rows (None, a skipped step) are left out.
    gaps = updates([None, *stalled[1:]])
    assert [g.kind for g in diagnose(gaps)] == ["stalled"]


def test_an_annealed_learning_rate_at_the_end_is_not_stalled() -> None:
    # lr to 0 over the last 3 of 40 recordings (a cosine schedule's end): not a tenth of the run
    rows = [[1e-3] * 4] * 37 + [[1e-8] * 4] * 3
    assert diagnose(updates(rows)) == []
    rows = [[1e-3] * 4] * 30 + [[1e-8] * 4] * 10  # a schedule that stopped a quarter of the run early
    (f,) = diagnose(updates(rows))
    assert (f.kind, f.step) == ("stalled", 300) and "4 of 4 layer(s)" in f.message


def test_unstable_updates_on_most_recordings() -> None:
    rows = [[0.3, 0.5, 2.0, 0.4]] * 10
    rows[4] = [1e-3] * 4  # one calm recording does not end it
    (f,) = diagnose(updates(rows))
    assert (f.kind, f.where, f.step) == ("unstable_updates", "l2", 0)
    assert f.value == pytest.approx(0.45)
    assert "the median layer changes by 0.45 of its weight norm per step" in f.message
    assert "learning rate" in f.fix
    # A passing phase (warm-up) is not a finding, nor is a single layer with large updates
    # (a bias starting from near zero).
    assert diagnose(updates([[0.5] * 4] * 2 + [[1e-3] * 4] * 8)) == []
    assert diagnose(updates([[1e-3, 1e-3, 1e-3, 5.0]] * 10)) == []


def test_loss_scale_collapse_with_most_steps_skipped() -> None:
    meta = {"loss_scaler": True, "gradient_clip_val": None}
    seen = [10 * i + 1 for i in range(10)]
    # calibrating: a few skipped steps at a large scale
    calibrating = doc(meta=meta, loss_scale=[2.0**16, 2.0**15] + [2.0**14] * 8,
                      nonfinite_steps=[1, 2] + [2] * 8, steps_seen=seen)
    assert diagnose(calibrating) == []
    # driven down: from step 30 on, 9 of every 10 steps skipped and the scale halves each time
    skipped = [0, 0, 0] + [9 * k for k in range(1, 8)]
    scales = [2.0**14] * 3 + [2.0 ** (14 - 9 * k) for k in range(1, 8)]
    (f, *rest) = diagnose(doc(meta=meta, loss_scale=scales, nonfinite_steps=skipped, steps_seen=seen))
    assert (f.kind, f.where, f.step) == ("loss_scale", "loss scale", 40)
    assert f.value == pytest.approx(2.0**-49)
    assert "90% of the steps since step 40 were skipped" in f.message and "bf16-mixed" in f.fix
    # without a scaler the rule does not apply
    assert not [g for g in diagnose(doc(loss_scale=scales, nonfinite_steps=skipped, steps_seen=seen))
                if g.kind == "loss_scale"]


def test_nonfinite_tiles_carry_bounds_and_bad_bands() -> None:
    event = {"step": 5, "layer": "l9", "all_layers": True, "scenes": ["s0", "s1"],
             "windows": [[0, 64, 32, 32], [32, 0, 32, 32]],
             "bounds": [[400640.0, 5499680.0, 400960.0, 5500000.0], None], "crs": ["EPSG:32633", None],
             "band_max_abs": [[1.5, "nan", 2.0], [1.0, 2.0, 4.0e4]]}
    data = doc(nonfinite=[event], bands={"layer": "c", "names": ["red", "nir", "swir"], "norm": [[1.0] * 3] * 10})
    (f,) = diagnose(data)
    assert ("tiles (scene (row, col, height, width) at (left, bottom, right, top)): "
            "s0 (0, 64, 32, 32) at (400640, 5.49968e+06, 400960, 5.5e+06) in EPSG:32633 [non-finite input: nir], "
            "s1 (32, 0, 32, 32) [extreme input: swir (|x| up to 4e+04)]") in f.message


def test_a_layer_whose_gradient_vanishes_is_vanishing_not_stalled() -> None:
    rows = [[1e-12, 1e-3, 1e-3, 1e-3]] * 10
    data = updates(rows)
    assert [f.kind for f in diagnose(data)] == ["stalled"]
    for row in data["layer_norm"]:
        row[0] = 1e-9  # 1e-9 of the others' RMS gradient
    (f,) = diagnose(data)
    assert (f.kind, f.where) == ("vanishing", "l0")
