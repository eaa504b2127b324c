"""Reports: the HTML file a person opens, the JSON beside it, and the console summary."""

from __future__ import annotations

from pathlib import Path

from ..results import publish, to_json
from .html import render

REPORT_NAME, RESULTS_NAME = "report.html", "results.json"


def write_report(doc: dict, report_dir: Path) -> Path:
    """Render first, then replace both files together: both new or both old (Ctrl-C, a full disk)."""
    html = render(doc)
    publish({report_dir / RESULTS_NAME: to_json(doc), report_dir / REPORT_NAME: html})
    return report_dir / REPORT_NAME
