"""The self-contained HTML report: one file, inline CSS and SVG, every model/log text escaped.

Geometry for the plots is computed here; the page itself is a jinja2 template with
autoescape on, so text from a model or a server log can never become markup.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2

from ..compare import DEFAULT_THRESHOLDS
from ..engines.base import event_text
from ..status import ORDER, Status

TEMPLATES = Path(__file__).with_name("templates")
PLOT_W, PLOT_H, PAD = 560, 150, 34
LOG_MIN = 1e-7  # distances below this are drawn at the floor of the log axis


def _y(value: float, top: float) -> float:
    lo, hi = math.log10(LOG_MIN), math.log10(top)
    v = math.log10(max(value, LOG_MIN))
    return PAD / 2 + (PLOT_H - PAD) * (1 - (v - lo) / (hi - lo))


def distance_plot(turn: dict, threshold: float | None) -> dict:
    """Polylines of max |Δlogprob| and KL along the reply, log scale, with the threshold line (none: exact)."""
    d, k = turn["distances"], turn["kls"]
    n = max(len(d), 1)
    top = 10 ** math.ceil(math.log10(max([(threshold or 0) * 10, *d, *k, 1e-3])))

    def x(i: int) -> float:
        return PAD + (PLOT_W - PAD - 10) * (i / max(n - 1, 1))

    def line(vals: list[float]) -> str:
        return " ".join(f"{x(i):.1f},{_y(v, top):.1f}" for i, v in enumerate(vals))

    ticks = [10.0 ** e for e in range(int(math.log10(LOG_MIN)), int(math.log10(top)) + 1, 2)]
    return {
        "w": PLOT_W, "h": PLOT_H, "pad": PAD, "dist": line(d), "kl": line(k),
        "dots": [(round(x(i), 1), round(_y(v, top), 1), i, f"{v:.3g}") for i, v in enumerate(d)],
        "thr_y": round(_y(threshold, top), 1) if threshold is not None else None, "threshold": threshold,
        "ticks": [(round(_y(t, top), 1), f"{t:.0e}") for t in ticks],
        "focus_x": round(x(turn["focus"]), 1) if turn.get("focus") is not None else None,
    }


def timeline(result: dict) -> dict:
    """Per turn: prompt bar (reused / processed) and the cache events at their positions."""
    turns = result["turns"]
    longest = max([t["prompt_tokens"] for t in turns] + [1])
    width = 560

    def x(n: int) -> float:
        return 10 + (width - 20) * n / longest

    rows = []
    for i, t in enumerate(turns):
        marks = []
        for e in t["events"]:
            marks.append({"kind": e["kind"], "x": round(x(max(e["n_tokens"], 0)), 1), "text": event_text(e),
                          "violation": e.get("violation", "")})
        rows.append({"y": 14 + i * 26, "reused_w": round(x(t["reused"]) - 10, 1),
                     "total_w": round(x(t["prompt_tokens"]) - 10, 1), "marks": marks, "turn": t,
                     "violations": t.get("violations", [])})
    return {"w": width, "h": 22 + 26 * len(turns), "rows": rows, "longest": longest}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["quoted"] = lambda s: json.dumps(s, ensure_ascii=False)  # then autoescaped
    return env


def render_soak(doc: dict) -> str:
    """The soak's page: findings (minimized, known or new), counts, footprint. Every text is escaped."""
    return _env().get_template("soak.html.j2").render(doc=doc)


def render(doc: dict) -> str:
    env = _env()
    # the thresholds that judged each case, as the results recorded them: an old results file
    # re-rendered shows its own, not today's calibration
    thresholds = {r["thresholds"].get("source") or (r["memory"] if r["model"].startswith("fixture:") else r["model"]):
                  r["thresholds"] for r in doc["results"] if r.get("thresholds")}
    models = list(dict.fromkeys(r["model"] for r in doc["results"]))
    # a column header: the fixture's name, a GGUF's file name (the full name is its tooltip)
    labels = {m: Path(m).name if "/" in m else m.removeprefix("fixture:") for m in models}
    scenarios = list(dict.fromkeys(r["scenario"] for r in doc["results"]))
    grid = {(r["scenario"], r["model"]): r for r in doc["results"]}
    cases = []
    for r in doc["results"]:
        limit = (r.get("thresholds") or {}).get("max_dlogprob") or DEFAULT_THRESHOLDS.max_dlogprob
        plots = {t["index"]: distance_plot(t, None if t.get("rule") == "exact" else limit) for t in r["turns"]}
        cases.append({"r": r, "plots": plots, "timeline": timeline(r) if r["turns"] else None,
                      "open": r["status"] not in (Status.PASS, Status.SKIP)})
    cases.sort(key=lambda c: -ORDER.index(c["r"]["status"]))
    return env.get_template("report.html.j2").render(
        doc=doc, models=models, labels=labels, scenarios=scenarios, grid=grid, cases=cases, thresholds=thresholds,
        event_text=event_text)
