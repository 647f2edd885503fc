"""The diagnosis-rule registry: one declaration gives a rule its kind, order, thresholds and figure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

import geobp.callbacks.rules as rules
from geobp.callbacks.diagnosis import Finding, GradientFlowWarning, Thresholds, diagnose
from geobp.callbacks.report import render_html
from geobp.callbacks.rules import RULES, kind_order, register_rule, threshold
from geobp.errors import ConfigError
from tests.callbacks.test_report import document


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so rules registered by a test leave the module's as it was."""
    monkeypatch.setattr(rules, "RULES", dict(RULES))
    return rules.RULES


def test_builtin_rules_keep_their_order_and_figures():
    assert kind_order() == ("nonfinite", "loss_scale", "exploding", "unstable_updates", "vanishing", "stalled",
                            "dead_branch", "dead_band", "band_scale")
    assert {k: r.figure for k, r in RULES.items()} == {
        "vanishing": "flow", "exploding": "clip", "nonfinite": "nonfinite", "loss_scale": "clip",
        "unstable_updates": "updates", "stalled": "updates", "dead_branch": "skips", "dead_band": "bands",
        "band_scale": "bands"}


def _long_loss_figure(data: Mapping[str, Any], steps: np.ndarray) -> Figure:
    fig = Figure()
    fig.add_subplot().plot(steps, np.asarray(data["loss"], dtype=float))
    return fig


def test_a_registered_rule_appears_in_its_order_with_its_figure_and_threshold(registry):
    @register_rule("high_loss", order=15, figure="high_loss", thresholds={"high_loss_value": 1.0},
                   title="Loss against its bound", plot=_long_loss_figure)
    def find_high_loss(data: Mapping[str, Any], t: Thresholds) -> list[Finding]:
        bound = threshold(t, "high_loss_value")
        loss = [float(v) for v in data.get("loss") or []]
        first = next((i for i, v in enumerate(loss) if v > bound), None)
        if first is None:
            return []
        return [Finding("high_loss", "loss", int(data["steps"][first]), loss[first],
                        f"loss {loss[first]:.3g} above {bound:g}", "lower the learning rate")]

    data = document()  # loss 2.0 .. 0.9; a nonfinite event (order 10) and a dead band (order 80) among the findings
    data["nonfinite"][0]["all_layers"] = True
    kinds = [f.kind for f in diagnose(data)]
    assert "high_loss" in kinds
    # after nonfinite (10), before everything from loss_scale (20) on
    assert kinds[: kinds.index("high_loss") + 1] == ["nonfinite", "high_loss"]
    assert kind_order()[:3] == ("nonfinite", "high_loss", "loss_scale")
    # its threshold: the declared default, or the configured value
    (high,) = [f for f in diagnose(data) if f.kind == "high_loss"]
    assert (high.step, high.value) == (0, 2.0)
    assert not [f for f in diagnose(data, Thresholds(extra={"high_loss_value": 5.0})) if f.kind == "high_loss"]

    data["diagnoses"] = [f.to_dict() for f in diagnose(data)]
    page = render_html(data)
    assert "<h2 id='high_loss'>Loss against its bound</h2>" in page  # its own figure
    assert re.search(r"<td class='kind'><a href='#high_loss'>high_loss</a></td>", page)  # linked from its finding
    assert page.index("<a href='#nonfinite'>nonfinite</a>") < page.index("<a href='#high_loss'>high_loss</a>")


def test_a_registered_rule_may_show_an_existing_figure(registry):
    register_rule("always", order=95, figure="flow")(
        lambda data, t: [Finding("always", "net.0", 0, 1.0, "always found", "nothing")])
    data = document()
    data["diagnoses"] = [f.to_dict() for f in diagnose(data)]
    assert data["diagnoses"][-1]["kind"] == "always"
    assert "<td class='kind'><a href='#flow'>always</a></td>" in render_html(data)


def test_registration_errors(registry):
    noop = lambda data, t: []  # noqa: E731
    with pytest.raises(ConfigError, match=r"^diagnosis rule 'vanishing' is registered already\. Fix: give the new rule another kind"):
        register_rule("vanishing", order=1, figure="flow")(noop)
    with pytest.raises(ConfigError, match=r"diagnosis rule 'mine': threshold name\(s\) \['persist'\] are taken"):
        register_rule("mine", order=1, figure="flow", thresholds={"persist": 0.5})(noop)
    with pytest.raises(ConfigError, match=r"threshold defaults must be finite numbers > 0 \(found \{'mine_ratio': 0\}\)"):
        register_rule("mine", order=1, figure="flow", thresholds={"mine_ratio": 0})(noop)
    with pytest.raises(ConfigError, match=r"a figure of its own needs a title\. Fix: pass title= with plot="):
        register_rule("mine", order=1, figure="mine", plot=_long_loss_figure)(noop)
    assert "mine" not in registry
    with pytest.raises(ConfigError, match=r"unknown diagnosis threshold 'nope'"):
        threshold(Thresholds(), "nope")


def test_extra_thresholds_are_checked_and_unknown_ones_warned():
    with pytest.raises(ConfigError, match=r"gradflow\.thresholds\.extra\.x must be a finite number > 0 \(found -1\)"):
        Thresholds(extra={"x": -1})
    with pytest.warns(GradientFlowWarning, match=r"no registered diagnosis rule declares \['typo_ratio'\]; ignored"):
        diagnose(document(), Thresholds(extra={"typo_ratio": 1.0}))
