"""Reports: the HTML file a person opens, the JSON beside it, and the console summary."""

from __future__ import annotations

import json
from pathlib import Path

from ..results import write_atomic
from .html import render

REPORT_NAME, RESULTS_NAME = "report.html", "results.json"


def write_report(doc: dict, report_dir: Path) -> Path:
    """Render first, then replace both files: a Ctrl-C leaves the old report or the whole new one."""
    html = render(doc)
    write_atomic(report_dir / RESULTS_NAME, json.dumps(doc, indent=1))
    write_atomic(report_dir / REPORT_NAME, html)
    return report_dir / REPORT_NAME
