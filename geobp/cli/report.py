"""``geobp report``: re-render a run's gradient-flow report, or compare runs side by side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from geobp.cli.common import console


def build_parser() -> argparse.ArgumentParser:
    """The options of ``geobp report`` (built without torch)."""
    p = argparse.ArgumentParser(prog="geobp report", description="Re-render RUN_DIR/gradflow/report.html from gradflow.json, "
                                "or compare runs side by side on one page (--compare).")
    p.add_argument("run_dir", nargs="?", help="a run folder, e.g. runs/demo/version_0")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="runs to put side by side (after RUN_DIR, if given)")
    p.add_argument("--out", default="gradflow-compare.html", help="the comparison page (default: %(default)s)")
    return p


def run(argv: Sequence[str]) -> int:
    """``geobp report RUN_DIR``: re-render the gradient-flow report; ``--compare``: runs side by side."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.compare:
        from geobp.callbacks.compare import render_compare

        out = render_compare([*([a.run_dir] if a.run_dir else []), *a.compare], a.out)
        console.print(f"wrote {out}", highlight=False)
        return 0
    if a.run_dir is None:
        p.error("give RUN_DIR, or --compare RUN_A RUN_B ...")
    from geobp.callbacks.report import render_report_from_run_dir

    for html in render_report_from_run_dir(a.run_dir):
        console.print(f"wrote {html}", highlight=False)
    return 0
