"""Training callbacks: the gradient-flow monitor, its diagnosis rules and its report."""

from geobp.callbacks.compare import render_compare
from geobp.callbacks.diagnosis import Finding, GradientFlowWarning, Thresholds, diagnose
from geobp.callbacks.gradflow import GradientFlowMonitor
from geobp.callbacks.jsonfile import read_json
from geobp.callbacks.report import render_report, render_report_from_run_dir

__all__ = [
    "Finding",
    "GradientFlowMonitor",
    "GradientFlowWarning",
    "Thresholds",
    "diagnose",
    "read_json",
    "render_compare",
    "render_report",
    "render_report_from_run_dir",
]
