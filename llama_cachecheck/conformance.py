"""Does the in-process policy do what llama-server does? Same scenarios, both engines, timelines side by side.

Per turn it compares the tokens reused and processed and the restore points. The two can only
be compared while both subjects saw the same prompts, so a scenario is followed until the
first turn whose prompt differs (e.g. the two engines wrote different replies); the rest is
counted as not comparable rather than hidden.
"""

from __future__ import annotations

import argparse

from rich.table import Table

from . import campaign, models
from .arguments import positive
from .engines.base import SessionSettings
from .library import make_engine, select, server_binary
from .outcomes import ScenarioResult, TurnResult
from .report.console import out, progress_bar
from .scenario import BUNDLED, discover
from .status import Status


def _restores(turn: TurnResult) -> list[int]:
    """Restore points; a full re-process is -1 (the server's log line carries no position)."""
    return [e["n_tokens"] if e["kind"] == "restored" else -1 for e in turn.subject.events
            if e["kind"] in ("restored", "full-reprocess")]


def compare_runs(a: ScenarioResult, b: ScenarioResult) -> tuple[int, int, list[str]]:
    """(turns that agree, turns compared, differences) for one scenario on one model."""
    same, compared, diffs = 0, 0, []
    for ta, tb in zip(a.turns, b.turns, strict=False):
        if ta.subject.prompt_tokens != tb.subject.prompt_tokens:
            diffs.append(f"turn {ta.index}: prompts differ from here on, not comparable")
            break
        compared += 1
        got = (ta.subject.n_reused, ta.subject.n_processed, _restores(ta))
        want = (tb.subject.n_reused, tb.subject.n_processed, _restores(tb))
        if got == want:
            same += 1
        elif ta.at_once and ta.subject.slot != tb.subject.slot:  # the order of a block chose another slot
            compared -= 1
            diffs.append(f"turn {ta.index} ({ta.step}): sent at once, served on slot {tb.subject.slot} by the server "
                         f"and {ta.subject.slot} in-process, as the order they were taken in decides: not comparable")
        else:
            diffs.append(f"turn {ta.index} ({ta.step}): in-process reused {got[0]} processed {got[1]} "
                         f"restores {got[2]}; server reused {want[0]} processed {want[1]} restores {want[2]}")
    return same, compared, diffs


# the deployed server's batch sizes are the build's (2048 / 512); the in-process engine runs the scenario's
# (64 by default), and checkpoints follow batch boundaries: the server gets the scenario's too; and the in-process
# kernels (no flash attention, no repacking: lowlevel.py), so that both subjects write the same replies (a reply
# flipped by the kernels, as on a Zen 3 CPU, would leave the rest of the scenario uncompared)
SAME_COMPUTE = f"-b {SessionSettings.n_batch} -ub {SessionSettings.n_ubatch} -fa off --no-repack"


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck conformance`: its options, declared beside the code that runs it."""
    cf = sub.add_parser(name, help="in-process policy vs llama-server: the cache timelines compared")
    cf.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    cf.add_argument("--server-bin", metavar="PATH", help="default: built from the pinned source")
    cf.add_argument("--threads", type=positive, default=1, metavar="N")
    cf.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    cf.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # every scenario: the in-process engine models llama-server's slots and host cache with the server's
    # defaults (4 slots, unified KV, 8 GiB host cache, idle slots saved and cleared), the deployed profile
    scenarios = select(discover([BUNDLED]), args.k)
    refs = models.resolve(args.model or ["all"])
    binary = server_binary(args.server_bin)
    table = Table("model", "memory", "turns agreeing", "scenarios identical", title="conformance: in-process "
                  "policy vs llama-server (reuse, processed, restore points per turn)", title_justify="left")
    details: list[str] = []
    with progress_bar(2 * len(refs) * len(scenarios), "conformance") as advance:
        for m in refs:
            inproc = campaign.run_model(m, scenarios, lambda r: make_engine(r.path, r.name), thresholds={},
                                      threads=args.threads, progress=advance)
            server = campaign.run_model(m, scenarios, lambda r: make_engine(r.path, r.name, server_bin=binary,
                                                                          profile="deployed",
                                                                          server_args=SAME_COMPUTE),
                                      thresholds={}, threads=args.threads, progress=advance)
            agree = compared = identical = played = 0
            for a, b in zip(inproc, server, strict=True):
                skipped = next((r for r in (a, b) if r.status == Status.SKIP), None)
                if skipped is not None:  # one engine cannot play it (speculation in-process)
                    who = "in-process" if skipped is a else "the server"
                    details.append(f"{m.name} {a.scenario.name}: not compared, skipped by {who}: {skipped.reason}")
                    continue
                played += 1
                s, c, diffs = compare_runs(a, b)
                agree, compared = agree + s, compared + c
                identical += not diffs
                details += [f"{m.name} {a.scenario.name}: {d}" for d in diffs]
            table.add_row(m.name, inproc[0].memory if inproc else "?", f"{agree}/{compared}",
                          f"{identical}/{played}")
    out.print(table)
    for line in details:
        out.print(line, markup=False, highlight=False)
    tails = sum("prompts differ" in d for d in details)
    at_once = sum("sent at once" in d for d in details)
    out.print(f"not comparable: {tails} tails (scenarios whose prompts parted, so the rest could not be compared), "
              f"{at_once} requests sent at once that the two served on other slots")
    return 0
