"""What a person sees in the terminal: progress while it runs; when it is done, a line per model and a
table of the cases that need a look (every case with -v)."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..outcomes import ScenarioResult
from ..status import FAILING, ORDER, Status

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 150)  # logs of CI jobs are wide



def say(text: str) -> None:
    """One line of plain text as it is: no markup, no highlighting, no wrapping (logs are grepped)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)


STYLE = {"PASS": "green", "NOISE": "yellow", "LOST-REUSE": "magenta", "FAIL": "bold red",
         "ERROR": "bold red", "SKIP": "dim"}


@contextmanager
def progress_bar(total: int, what: str):  # yields the per-result callback
    lock = threading.Lock()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console,
                  transient=True) as p:
        task = p.add_task(what, total=total, last="")

        def advance(r: ScenarioResult) -> None:
            with lock:
                p.update(task, advance=1, last=f"{r.model} {r.scenario.name}: {r.status}")
        yield advance


def _divergence(r: ScenarioResult) -> str:
    bad = r.first_bad if r.status in (Status.FAIL, Status.NOISE) else None
    return bad.divergence_text() if bad is not None else ""


def summary_table(results: list[ScenarioResult], title: str) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in ("scenario", "model", "status", "first divergence (subject vs reference)", "max Δlogprob",
                "reused"):
        t.add_column(col, overflow="fold")
    for r in results:
        reused, total = r.reused
        t.add_row(r.scenario.name, r.model, Text(r.status, style=STYLE.get(r.status, "")), _divergence(r),
                  f"{r.max_distance:.2g}" if r.turns else "",
                  f"{reused}/{total}" if total else "")
    return t


def model_lines(results: list[ScenarioResult]) -> list[Text]:
    """One line per model: its memory, its counts (worst first) and its time, for a run read at a glance."""
    by_model: dict[str, list[ScenarioResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    width = max((len(m) for m in by_model), default=0)
    lines = []
    for model, rs in by_model.items():
        counts = Counter(r.status for r in rs)
        line = Text(f"{model:<{width}}  {next((r.memory for r in rs if r.memory != '?'), '?'):<9}  ")
        for i, st in enumerate(sorted(counts, key=lambda st: (st == Status.SKIP, -ORDER.index(st)))):
            line += Text(("" if i == 0 else ", ") + f"{st} {counts[st]}", style=STYLE.get(st, ""))
        line += Text(f"  ({len(rs)} runs, {sum(r.seconds for r in rs):.1f} s)", style="dim")
        lines.append(line)
    return lines


def print_problems(results: list[ScenarioResult]) -> None:
    for r in results:
        if r.status in FAILING:
            said = f"[{r.error_class}] {r.reason}" if r.error_class else r.reason
            out.print(Text(f"{r.status} {r.scenario.name} [{r.model}]: ", style=STYLE[r.status]) + Text(said))
            out.print(Text(f"  replay: {r.replay}", style="dim"))


def judged_by(results: list) -> str:
    """Which rule judged the run's replies: exact, and which calibrated thresholds (from where)."""
    exact = sum(t.verdict.rule == "exact" for r in results for t in r.turns)
    used = {r.thresholds.source or "default": r.thresholds for r in results
            if r.thresholds and any(t.verdict.rule != "exact" for t in r.turns)}
    parts = [f"exact {exact} replies"] if exact else []
    parts += [f"{k} (Δlogprob {th.max_dlogprob:.3g}, KL {th.max_kl:.3g}, tie {th.tie_margin:.3g})"
              for k, th in sorted(used.items())]
    filed = any("measured on the spot" not in k for k in used)
    return "judged by: " + ("; ".join(parts) if parts else "nothing ran") + \
        (" (llama_cachecheck/thresholds.json)" if filed else "")
