"""The fault matrix: does the bundled library catch every known bug class on every arch?

Clean first (every scenario must pass: no false alarm), then each fault on each fixture it
applies to: the fault is killed on that arch when at least one scenario reports FAIL or
LOST-REUSE. A fault that cannot apply to an arch is shown as n/a, never as a pass.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

from rich.table import Table

from . import campaign, faults, models
from .arguments import positive
from .engines.inproc import InprocEngine
from .library import select
from .models import ModelRef
from .outcomes import ScenarioResult
from .report.console import out, progress_bar
from .scenario import BUNDLED, discover
from .status import Status

DETECTED = (Status.FAIL, Status.LOST_REUSE)


@dataclass
class ArchRow:
    model: str
    memory: str = "?"
    clean_statuses: dict[str, int] = field(default_factory=dict)
    clean_max: float = 0.0
    cells: dict[str, str] = field(default_factory=dict)  # fault -> killed / SURVIVED / n/a
    faulty_min: float = math.inf  # smallest "strongest distance" among faults killed as FAIL
    effects: dict[str, float] = field(default_factory=dict)  # fault -> its strongest distance where it FAILed


def run_suite(refs: list[ModelRef], scenarios, fault: str | None, *, threads: int, jobs: int,
              label: str) -> list[ScenarioResult]:
    with progress_bar(len(refs) * len(scenarios), label) as advance:
        return campaign.run_all(refs, scenarios, lambda m: InprocEngine(m.path, m.name, fault), fault=fault,
                              threads=threads, jobs=jobs, progress=advance)


def matrix(refs, scenarios, threads: int, jobs: int) -> tuple[list[ArchRow], list[str]]:
    rows = {r.name: ArchRow(r.name) for r in refs}
    for res in run_suite(refs, scenarios, None, threads=threads, jobs=jobs, label="clean"):
        row = rows[res.model]
        row.memory = res.memory
        row.clean_statuses[res.status] = row.clean_statuses.get(res.status, 0) + 1
        row.clean_max = max(row.clean_max, res.max_distance)
    for name in faults.FAULTS:
        by_model: dict[str, list[ScenarioResult]] = {}
        for res in run_suite(refs, scenarios, name, threads=threads, jobs=jobs, label=f"fault {name}"):
            by_model.setdefault(res.model, []).append(res)
        for model, results in by_model.items():
            row = rows[model]
            if all(r.status == Status.SKIP for r in results):
                row.cells[name] = "n/a"
                continue
            killed = [r for r in results if r.status in DETECTED]
            errors = [r for r in results if r.status == Status.ERROR]
            row.cells[name] = "killed" if killed else ("ERROR" if errors else "SURVIVED")
            fails = [r.max_distance for r in killed if r.status == Status.FAIL]
            if fails:
                row.faulty_min = min(row.faulty_min, max(fails))
                row.effects[name] = max(fails)
    return list(rows.values()), list(faults.FAULTS)


def smallest_effects(rows: list[ArchRow]) -> dict[str, float]:
    """Per fault, the weakest wrong answer it caused: the margin a comparison had to see it by."""
    effects: dict[str, float] = {}
    for r in rows:
        for f, d in r.effects.items():
            effects[f] = min(effects.get(f, math.inf), d)
    return effects


def table(rows: list[ArchRow], faults: list[str]) -> Table:
    t = Table(title="fault matrix (arch x fault)", title_justify="left")
    t.add_column("model")
    t.add_column("memory")
    t.add_column("clean")
    for f in faults:
        t.add_column(f)
    t.add_column("max clean Δ")
    t.add_column("min faulty Δ")
    style = {"killed": "green", "n/a": "dim", "SURVIVED": "bold red", "ERROR": "bold red"}
    for r in rows:
        clean = ", ".join(f"{k} {v}" for k, v in sorted(r.clean_statuses.items()))
        cells = [f"[{style.get(r.cells.get(f, '?'), '')}]{r.cells.get(f, '?')}[/]" for f in faults]
        t.add_row(r.model.removeprefix("fixture:"), r.memory, clean, *cells, f"{r.clean_max:.2g}",
                  "" if math.isinf(r.faulty_min) else f"{r.faulty_min:.3g}")
    return t


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck selftest`: its options, declared beside the code that runs it."""
    st = sub.add_parser(name, help="every fault x every applicable fixture x the bundled library",
                        description="Prove the harness catches each known bug class: run the bundled "
                                    "library clean and under every fault, print the arch x fault table, "
                                    "end with 'faults killed: K/N'. Exit 1 if a fault survives or a "
                                    "clean run fails.")
    st.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    st.add_argument("--threads", type=positive, default=1, metavar="N")
    st.add_argument("--jobs", type=positive, metavar="N")
    st.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    st.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    scenarios = select(discover([BUNDLED]), args.k)
    refs = models.resolve(args.model or ["all"])
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
    rows, faults = matrix(refs, scenarios, args.threads, jobs)
    out.print(table(rows, faults))
    cells = [(r.model, f, r.cells[f]) for r in rows for f in faults if r.cells.get(f) != "n/a"]
    killed = [c for c in cells if c[2] == "killed"]
    false_alarms = [r for r in rows if set(r.clean_statuses) - {Status.PASS, Status.NOISE, Status.SKIP}]
    for model, f, status in cells:
        if status != "killed":
            out.print(f"[bold red]survivor:[/] {f} on {model} ({status})")
    for r in false_alarms:
        out.print(f"[bold red]clean run not clean:[/] {r.model}: {r.clean_statuses}")
    for f, d in smallest_effects(rows).items():
        out.print(f"smallest effect of {f}: max |Δlogprob| {d:.3g} (on the model where it was weakest)")
    out.print(f"faults killed: {len(killed)}/{len(cells)}")
    return 0 if len(killed) == len(cells) and not false_alarms else 1
