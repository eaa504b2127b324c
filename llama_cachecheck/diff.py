"""`cachecheck diff BASE.json NEW.json`: what did my change do to the cache, case by case?

A PR is judged against the build it started from, not against an absolute bar: a case that
was LOST-REUSE on master and still is, is not the PR's doing. Both documents are reduced to
one view per case (status; per turn: tokens reused, largest distance) and deepdiff compares
the views, with distances equal within the case's recorded threshold. Every change is then
named: a regression (a status worse than before), a fix, reuse lost or gained on a turn, a
distance that moved by more than the threshold, a case added or removed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from deepdiff import DeepDiff

from .results import publish, read
from .status import Status

# how bad a status is for a PR; SKIP is not comparable (the case did not run on one side)
RANK = {Status.PASS: 0, Status.NOISE: 0, Status.LOST_REUSE: 1, Status.FAIL: 2, Status.ERROR: 3}


@dataclass(frozen=True)
class Change:
    case: str  # "scenario [model]"
    kind: str  # regression, fix, status, reuse-lost, reuse-gained, distance, added, removed, turns
    where: str  # "status", "turn 3"
    base: str
    new: str


def load(path: str) -> dict:
    return read(path)


def _key(r: dict) -> str:
    return f"{r['scenario']} [{r['model']}]"


def _view(doc: dict) -> dict:
    return {_key(r): {"status": r["status"],
                      "turns": {f"turn {t['index']}": {"reused": t["reused"], "distance": t["max_distance"]}
                                for t in r["turns"]}}
            for r in doc["results"]}


def changes(base: dict, new: dict) -> list[Change]:
    """Every difference that means something, case by case, in the new document's order."""
    eps = max([r["thresholds"]["max_dlogprob"] for r in new["results"] if r.get("thresholds")] or [0.01])
    dd = DeepDiff(_view(base), _view(new), math_epsilon=eps, view="tree", verbose_level=2)
    out: list[Change] = []
    for kind, items in dd.items():
        for item in items:
            path = item.path(output_format="list")
            case = path[0]
            if kind == "dictionary_item_added" and len(path) == 1:
                out.append(Change(case, "added", "case", "", item.t2["status"]))
            elif kind == "dictionary_item_removed" and len(path) == 1:
                out.append(Change(case, "removed", "case", item.t1["status"], ""))
            elif path[-1] == "status":
                was, now = item.t1, item.t2
                if Status.SKIP in (was, now):
                    label = "status"
                else:
                    label = "regression" if RANK[now] > RANK[was] else "fix" if RANK[now] < RANK[was] else "status"
                out.append(Change(case, label, "status", was, now))
            elif path[-1] == "reused":
                out.append(Change(case, "reuse-lost" if item.t2 < item.t1 else "reuse-gained", path[2],
                                  str(item.t1), str(item.t2)))
            elif path[-1] == "distance":
                out.append(Change(case, "distance", path[2], f"{item.t1:.3g}", f"{item.t2:.3g}"))
            elif len(path) == 3:  # a turn only one side has
                out.append(Change(case, "turns", path[2], "" if kind.endswith("added") else "played",
                                  "played" if kind.endswith("added") else ""))
    order = {_key(r): i for i, r in enumerate(new["results"])}
    return sorted(out, key=lambda c: (order.get(c.case, len(order)), c.where != "status", c.where))


def render_html(base: dict, new: dict, found: list[Change], *, base_path: str, new_path: str) -> str:
    import jinja2

    from .report.html import TEMPLATES

    cases = {_key(r): r for r in new["results"]}
    olds = {_key(r): r for r in base["results"]}
    changed = list(dict.fromkeys(c.case for c in found))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("diff.html.j2").render(
        base=base, new=new, base_path=base_path, new_path=new_path, found=found,
        pairs=[(c, olds.get(c), cases.get(c), [x for x in found if x.case == c]) for c in changed])


def markdown(found: list[Change], base: dict, new: dict) -> str:
    """The job summary a CI page shows (GitHub's $GITHUB_STEP_SUMMARY takes markdown)."""
    regressions = sum(c.kind == "regression" for c in found)
    lines = [f"## cachecheck: {regressions} regression(s)", "",
             f"base: {', '.join(base['builds'])}  ", f"new: {', '.join(new['builds'])}", ""]
    counts = " / ".join(f"{k} {v}" for k, v in sorted(new["counts"].items()))
    lines += [f"new run: {counts}", ""]
    if not found:
        return "\n".join(lines + ["No changes."]) + "\n"
    lines += ["| case | change | where | base | new |", "|---|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731 - a table cell
    lines += [f"| {cell(c.case)} | {'**' + c.kind + '**' if c.kind == 'regression' else c.kind} | {c.where} | "
              f"{cell(c.base)} | {cell(c.new)} |" for c in found]
    return "\n".join(lines) + "\n"


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck diff`: its options, declared beside the code that runs it."""
    df = sub.add_parser(name, help="what changed between two runs (e.g. a PR's build vs its base's)",
                        description="Compare two results.json documents case by case: regressions (a status "
                                    "worse than before) and fixes, reuse lost or gained per turn, distances that "
                                    "moved by more than the threshold, cases added or removed. Exit 1 on a "
                                    "regression, 0 otherwise, 2 when a file is missing, damaged or of another "
                                    "schema.")
    df.add_argument("base", metavar="BASE.json", help="the results to compare against (e.g. the merge base's)")
    df.add_argument("new", metavar="NEW.json", help="the results under review (e.g. the PR's)")
    df.add_argument("--json", metavar="FILE", help="also write the changes as JSON")
    df.add_argument("--html", metavar="FILE", help="also write a page with each changed case side by side")
    df.add_argument("--markdown", metavar="FILE", help="also write a markdown summary (a CI job's summary page)")
    df.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .report.console import STYLE, out

    base, new = load(args.base), load(args.new)
    found = changes(base, new)
    regressions = [c for c in found if c.kind == "regression"]
    t = Table("case", "change", "where", "base", "new", title=f"cachecheck diff: {args.base} -> {args.new}",
              title_justify="left")
    for c in found:
        style = "bold red" if c.kind in ("regression", "reuse-lost") else "green" if c.kind in ("fix", "reuse-gained") \
            else ""
        t.add_row(escape(c.case), f"[{style}]{c.kind}[/]" if style else c.kind, c.where,
                  f"[{STYLE.get(c.base, '')}]{c.base}[/]" if c.base in STYLE else c.base,
                  f"[{STYLE.get(c.new, '')}]{c.new}[/]" if c.new in STYLE else c.new)
    if found:
        out.print(t)
    counts = {k: sum(c.kind == k for c in found) for k in dict.fromkeys(c.kind for c in found)}
    out.print(f"{len(regressions)} regression(s); " + (", ".join(f"{k} {v}" for k, v in counts.items())
                                                        or "no changes"), highlight=False)
    files = {}
    if args.json:
        files[Path(args.json)] = json.dumps({"base": args.base, "new": args.new, "regressions": len(regressions),
                                             "changes": [asdict(c) for c in found]}, indent=1)
    if args.html:
        files[Path(args.html)] = render_html(base, new, found, base_path=args.base, new_path=args.new)
    if args.markdown:
        files[Path(args.markdown)] = markdown(found, base, new)
    if files:
        publish(files)
    return 1 if regressions else 0
