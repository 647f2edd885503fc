"""The report renders from a saved gradflow.json into one self-contained page."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from geobp.callbacks import read_json, render_report, render_report_from_run_dir
from geobp.callbacks.diagnosis import Finding, encode_float
from geobp.callbacks.jsonfile import write_json
from geobp.callbacks.series import SCHEMA, SCHEMA_VERSION
from geobp.errors import DataNotFoundError, GeobpError


def document(recordings: int = 12, layers: int = 6) -> dict[str, Any]:
    """A complete gradflow document with every section filled, including non-finite values."""
    steps = list(range(0, 10 * recordings, 10))
    norm = [[encode_float(10.0 ** (-j / 2) * (1 + 0.1 * i)) for j in range(layers)] for i in range(recordings)]
    norm[-1][2] = "nan"
    finding = Finding("dead_band", "band 1 (conv1)", 10, 0.0, "input band 1 gets 0.0e+00 of the median band's gradient",
                      "check the band's pixels <b>not html</b>")
    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION,
        "meta": {"model": "ToyTask", "precision": "16-mixed", "gradient_clip_val": 0.5,
                 "gradient_clip_algorithm": "norm", "loss_scaler": True, "world_size": 1,
                 "every_n_steps": 10, "step_check": "sync"},
        "thresholds": {"dead_branch_ratio": 1e-3},
        "layers": [{"name": f"net.{j}", "type": "Conv2d", "numel": 50} for j in range(layers)],
        "steps": steps,
        "layer_norm": norm,
        "layer_max_abs": [[2 * float(v) if v != "nan" else "nan" for v in row] for row in norm],
        "total_norm": [1.0 / (i + 1) for i in range(recordings - 1)] + ["inf"],
        "clipped": [i % 3 == 0 for i in range(recordings)],
        "steps_seen": [s + 1 for s in steps],
        "clipped_steps": [i * 3 for i in range(recordings)],
        "nonfinite_steps": [0] * (recordings - 1) + [1],
        "loss_scale": [1024.0] * (recordings - 1) + [512.0],
        "loss": [2.0 - 0.1 * i for i in range(recordings)],
        "bands": {"layer": "net.0", "norm": [[1.0, 0.0, 0.5] for _ in range(recordings)]},
        "skips": [{"name": "net.3", "kind": "residual", "source": None, "paths": ["branch", "shortcut"],
                   "norms": [[0.5, 1.0]] * (recordings - 1) + [[None, None]],
                   "ratio": [0.5] * (recordings - 1) + [None]}],
        "metrics": {"val/loss": [[50, 1.5], [100, 1.2]], "val/mIoU": [[50, 0.3], [100, 0.4]]},
        "nonfinite": [{"step": steps[-1], "layer": "net.5", "all_layers": False, "nonfinite_layers": 3,
                       "loss_scale": 1024.0, "scenes": ["tile_a"], "windows": [[0, 64, 64, 64]]}],
        "diagnoses": [finding.to_dict()],
    }


def test_report_renders_from_a_saved_json(tmp_path: Path) -> None:
    json_path = write_json(document(), tmp_path / "gradflow" / "gradflow.json")
    html_path = render_report(json_path)
    assert html_path == tmp_path / "gradflow" / "report.html"
    page = html_path.read_text(encoding="utf-8")
    assert "input band 1 gets 0.0e+00 of the median band" in page
    assert "check the band&#x27;s pixels &lt;b&gt;not html&lt;/b&gt;" in page  # escaped
    assert page.index("Diagnoses") < page.index("<img")  # findings come first
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 6  # flow, heatmap, skips, bands, clipping + loss scale, metrics
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page) and "<script" not in page
    assert "tile_a (0, 64, 64, 64)" in page
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["gradflow.json", "report.html"]  # no temp files


def test_report_of_a_run_without_recordings_still_renders(tmp_path: Path) -> None:
    data = document()
    for key in ("steps", "layer_norm", "layer_max_abs", "total_norm", "loss"):
        data[key] = []
    data["diagnoses"] = []
    page = render_report(write_json(data, tmp_path / "g.json"), tmp_path / "out.html").read_text()
    assert "No findings" in page and "<img" not in page


def test_rediagnose_uses_the_stored_series(tmp_path: Path) -> None:
    data = document()
    data["diagnoses"] = []
    page = render_report(write_json(data, tmp_path / "g.json"), rediagnose=True).read_text()
    assert "dead_band" in page and "band_2 (net.0)" in page


def test_json_is_strict_and_non_finite_values_are_strings(tmp_path: Path) -> None:
    path = write_json(document(), tmp_path / "g.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert data["total_norm"][-1] == "inf" and data["layer_norm"][-1][2] == "nan"
    assert data["meta"]["updated"]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json({**document(), "loss": [math.nan]}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_run_dir_lookup(tmp_path: Path) -> None:
    run = tmp_path / "lightning_logs" / "version_3"
    empty = {"schema": SCHEMA, "version": SCHEMA_VERSION}  # renders fast: nothing to plot
    write_json(empty, run / "gradflow" / "gradflow.json")
    assert render_report_from_run_dir(run) == [run / "gradflow" / "report.html"]
    assert render_report_from_run_dir(tmp_path) == [run / "gradflow" / "report.html"]
    assert render_report_from_run_dir(run / "gradflow" / "gradflow.json") == [run / "gradflow" / "report.html"]
    write_json(empty, tmp_path / "lightning_logs" / "version_4" / "gradflow" / "gradflow.json")
    assert len(render_report_from_run_dir(tmp_path)) == 2


def test_missing_report_names_the_run_dir(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DataNotFoundError, match=r"empty_run: no gradflow/gradflow.json in this folder or below it\. "
                                                r"Fix: pass the log directory of a run trained with the "
                                                r"GradientFlowMonitor"):
        render_report_from_run_dir(tmp_path / "empty_run")
    with pytest.raises(FileNotFoundError, match=r"nowhere: run directory not found"):
        render_report_from_run_dir(tmp_path / "nowhere")


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", r"bad.json: cannot read the gradflow data \(Expecting property name"),
    ('{"schema": "other"}', r"bad.json: not a gradflow document \(expected schema 'geobp.gradflow'\)"),
    ('{"schema": "geobp.gradflow", "version": 99}', r"unsupported gradflow version \(expected 1, found 99\)"),
])
def test_unreadable_json_is_a_geobp_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GeobpError, match=match):
        read_json(path)


def test_findings_link_to_their_figure_and_bands_are_named(tmp_path: Path) -> None:
    data = document()
    data["bands"]["names"] = ["B02", "B8A", "B11"]
    data["update_ratio"] = [[1e-3] * 5 + [0.0] for _ in data["steps"]]
    data["frozen"] = [{"name": "encoder.stem", "type": "Conv2d", "numel": 10}]
    data["diagnoses"] = [
        Finding("stalled", "net.5", 0, 0.0, "1 of 6 layer(s) get gradients but do not change").to_dict(),
        Finding("band_scale", "B8A (net.0)", 0, 900.0, "input band B8A gets 900x").to_dict(),
        Finding("nonfinite", "net.5", 110, 1.0, "non-finite gradient").to_dict(),
        Finding("dead_branch", "net.3 branch", 0, 0.0, "dead").to_dict(),
    ]
    page = render_report(write_json(data, tmp_path / "g.json")).read_text()
    for kind, anchor in (("stalled", "updates"), ("band_scale", "bands"), ("nonfinite", "nonfinite"),
                         ("dead_branch", "skips")):
        assert f"<a href='#{anchor}'>{kind}</a>" in page
        assert f"<h2 id='{anchor}'>" in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 7  # the update ratios added
    assert "bands B02, B8A, B11" in page and "1 frozen layers" in page
    # a finding whose figure is absent is not linked
    del data["update_ratio"]
    page = render_report(write_json(data, tmp_path / "g.json")).read_text()
    assert "<td class='kind'>stalled</td>" in page and "href='#updates'" not in page


def test_the_page_written_during_training_shows_when(tmp_path: Path) -> None:
    from geobp.callbacks.writer import ReportWriter

    data = document()
    data["meta"].pop("updated", None)
    json_path, html_path = ReportWriter(tmp_path / "gradflow").write(data)
    updated = json.loads(json_path.read_text())["meta"]["updated"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", updated)
    assert f"updated {updated}" in html_path.read_text()


def test_layers_frozen_for_a_time_are_spans_in_the_document_and_the_report_header() -> None:
    from geobp.callbacks.report import frozen_span_text
    from geobp.callbacks.series import note_frozen

    data: dict[str, Any] = {"steps": [], "frozen_spans": []}
    encoder = ["model.encoder.conv1", "model.encoder.layer1.0.conv1", "model.encoder.layer1.0.conv2"]
    for step, frozen in [(0, encoder), (25, encoder), (50, encoder), (75, []), (100, encoder[:1]), (125, encoder[:1])]:
        data["steps"].append(step)
        note_frozen(data, step, frozen)
    assert data["frozen_spans"] == [
        {"layers": encoder, "first_step": 0, "last_step": 50},
        {"layers": encoder[:1], "first_step": 100, "last_step": 125},
    ]
    assert frozen_span_text(data["frozen_spans"][0]) == \
        "3 layers frozen at steps 0-50 (model.encoder.conv1, model.encoder.layer1.0.conv1, ...)"
