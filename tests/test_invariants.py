"""Cache-event invariants: each rule fires on a run that breaks it, and on no clean run."""


import pytest
from clirun import cli

from llama_cachecheck.invariants import Invariants
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED


def run(tmp_path, scenario: str, model: str, fault: str) -> dict:
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED / scenario), "--model", model,
                        "--fault", fault, "--json", str(out), "--report-dir", str(tmp_path / "rep"))
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    (result,) = read_results(out)["results"]
    return result


@pytest.mark.parametrize(("fault", "scenario", "model", "said"), [
    ("needless-restore", "multi-turn-extend.yaml", "fixture:mamba", "restored although the memory held all"),
    ("no-checkpoint-limit", "checkpoint-limit.yaml", "fixture:jamba", "checkpoints are kept, the limit is"),
    ("keep-stale-checkpoints", "stale-branch-checkpoint.yaml", "fixture:jamba", "belongs to an abandoned branch"),
    ("keep-stale-checkpoints", "stale-branch-raw.yaml", "fixture:jamba", "but the new prompt differs"),
    ("restore-off-by-one", "seed-regenerate.yaml", "fixture:mamba", "resumed at"),
    ("swa-threshold", "swa-window-threshold.yaml", "fixture:gemma3", "the window memory was used"),
])
def test_each_invariant_fires_where_a_fault_breaks_it(tmp_path, fault, scenario, model, said):
    r = run(tmp_path, scenario, model, fault)
    assert r["status"] == "FAIL" and "cache invariant broken" in r["reason"]
    broken = [v for t in r["turns"] for v in t["violations"]]
    assert any(said in v for v in broken), broken
    # the report's timeline marks it
    page = (tmp_path / "rep" / "report.html").read_text()
    assert 'class="violation"' in page and "invariant broken: " in page


def test_a_correct_history_breaks_no_rule():
    inv = Invariants("hybrid", limit=2)
    p1 = list(range(1, 40))
    created = [{"kind": "created", "n_tokens": 35, "pos_min": 34, "pos_max": 34}]
    assert inv.check(p1, created, 0, p1 + [7, 8]) == []  # the prompt and the reply [7, 8, 9] but its last token
    p2 = p1 + [7, 8, 9, 50]  # extends what the memory held: no restore needed, none made
    assert inv.check(p2, [{"kind": "created", "n_tokens": 39, "pos_min": 38, "pos_max": 38}], 41, p2) == []
    p3 = p1[:37] + [99]  # a branch inside the prompt: restore the checkpoint before it, erase those after
    events = [{"kind": "restored", "n_tokens": 35, "pos_min": 34, "pos_max": 34},
              {"kind": "erased", "n_tokens": 39, "pos_min": 38, "pos_max": 38}]
    assert inv.check(p3, events, 35, p3) == []
