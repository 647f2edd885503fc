"""``geobp report --compare``: runs side by side on one page; one-line errors for bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from geobp.callbacks.compare import render_compare
from geobp.callbacks.diagnosis import Finding
from geobp.callbacks.jsonfile import write_json
from geobp.cli import main
from geobp.errors import ConfigError
from tests.callbacks.test_report import document


def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = document(), document()
    for data in (good, bad):
        data["update_ratio"] = [[1e-3] * 6 for _ in data["steps"]]
    bad["bands"]["names"] = ["B02", "B03", "B04"]
    bad["update_ratio"] = [[1e-3] * 5 + [0.0] for _ in bad["steps"]]
    bad["diagnoses"] = [Finding("stalled", "net.5", 0, 0.0, "1 of 6 layer(s) get gradients but do not "
                                "change").to_dict()]
    good["diagnoses"] = []
    for name, data in (("good", good), ("bad", bad)):
        write_json(data, tmp_path / name / "version_0" / "gradflow" / "gradflow.json")
    return tmp_path / "good" / "version_0", tmp_path / "bad" / "version_0"


def test_compare_puts_runs_side_by_side(tmp_path: Path) -> None:
    good, bad = two_runs(tmp_path)
    page = render_compare([good, bad], tmp_path / "cmp.html").read_text()
    for key in ("flow", "updates", "skips", "bands", "clip", "metrics"):
        assert f"<h2 id='{key}'>" in page
    # one image per run per figure, each under its run's label
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 12
    assert page.count(f"<h3>{bad}</h3>") == 7  # findings + six figures
    assert "<a href='#updates'>stalled</a>" in page and "No findings" in page
    assert "B02, B03, B04" in page and "band_1, band_2, band_3" in page
    assert "grid-template-columns:repeat(2," in page
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page) and "<script" not in page


def test_compare_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = two_runs(tmp_path)
    out = tmp_path / "out" / "c.html"
    assert main(["report", "--compare", str(good), str(bad / "gradflow" / "gradflow.json"), "--out", str(out)]) == 0
    assert "<h1>Gradient flow: 2 runs compared</h1>" in out.read_text()
    assert main(["report", "--compare", str(good), "--out", str(out)]) == 2
    assert "error: --compare needs at least two runs (found 1). Fix: pass two or more run folders" in capsys.readouterr().err
    assert main(["report", "--compare", str(tmp_path), str(good)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert re.search(r"holds 2 runs \(.*bad/version_0, .*good/version_0\)\. Fix: pass each run's own folder", err)
    assert main(["report", "--compare", str(good), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: run directory not found" in capsys.readouterr().err.replace("\n", "")


def test_compare_needs_two_runs() -> None:
    with pytest.raises(ConfigError, match=r"--compare needs at least two runs \(found 0\)\. Fix: pass two"):
        render_compare([], "x.html")


def test_compared_figures_share_their_y_range() -> None:
    import copy

    from geobp.callbacks.compare import share_limits
    from geobp.callbacks.plots import figures

    small = document()
    large = copy.deepcopy(small)
    large["total_norm"] = [100.0 * v if isinstance(v, float) else v for v in large["total_norm"]]
    large["update_ratio"] = small["update_ratio"] = [[1e-3] * 6 for _ in small["steps"]]
    (_, _, a), = figures(small, ["clip"])
    (_, _, b), = figures(large, ["clip"])
    assert a.axes[0].get_ylim() != b.axes[0].get_ylim()
    share_limits([a, b])
    assert a.axes[0].get_ylim() == b.axes[0].get_ylim()
    assert a.axes[0].get_ylim()[1] >= max(v for v in large["total_norm"] if isinstance(v, float))
    (_, _, u1), = figures(small, ["updates"])
    (_, _, u2), = figures(large, ["updates"])
    rows = u1.axes[0].get_ylim()
    share_limits([u1, u2])
    assert u1.axes[0].get_ylim() == rows  # the heatmap of layers keeps its rows
