"""`cachecheck soak`: random scenarios from the grammar, every finding minimized, the footprint watched."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from clirun import cli

from conftest import PLANTS
from llama_cachecheck import findings, footprint, grammar, scenario
from llama_cachecheck.results import read as read_results


def test_the_grammar_draws_every_step_kind_the_same_way_for_a_seed_and_the_loader_accepts_them(tmp_path):
    kinds = set()
    for i in range(300):
        sc = grammar.checked(grammar.random_scenario(7, i), tmp_path)
        kinds |= {type(s) for s in sc.steps}
        assert scenario.dump(sc) == scenario.dump(grammar.random_scenario(7, i)), i
    assert kinds == {scenario.Message, scenario.Generate, scenario.Regenerate, scenario.Edit, scenario.Truncate,
                     scenario.Tokens, scenario.Switch, scenario.Parallel, scenario.SlotAction, scenario.TemplateVars,
                     scenario.Splice}
    drawn = [grammar.random_scenario(7, i) for i in range(300)]
    actions = {s.action for sc in drawn for s in sc.steps if isinstance(s, scenario.SlotAction)}
    assert actions == {"save", "restore", "erase", "damage"}
    # agent loops: tool calls answered by tool messages, reasoning kept and stripped, date lines
    agents = [sc for sc in drawn if grammar.kind_of(sc) == "agent"]
    assert {sc.strip_reasoning for sc in agents} == {True, False}
    assert any(s.role == "tool" for sc in agents for s in sc.steps if isinstance(s, scenario.Message))
    assert {"tools", "var:think", "var:date"} <= {n for sc in agents for n in sc.template_needs}
    assert scenario.dump(grammar.random_scenario(7, 0)) != scenario.dump(grammar.random_scenario(8, 0))
    reuse = [sc for sc in drawn if sc.settings.cache_reuse]  # in-process too: attention memory shifts chunks
    assert reuse and all(grammar.kind_of(sc) == "raw" for sc in reuse)
    # speculating subjects, in-process too
    drafts = {(sc.settings.speculative.draft, sc.settings.speculative.ngram) for sc in drawn if sc.settings.speculative}
    assert drafts == {("fixture:llama", None), ("self", None), (None, "ngram-simple")}


def test_the_footprint_sees_a_process_and_a_file_left_behind():
    with footprint.own_temp_dir() as tmp:
        before = footprint.footprint()
        (tmp / "cachecheck-worker-x.log").write_text("left behind")
        child = subprocess.Popen(["sleep", "30"])
        try:
            now = footprint.footprint()
        finally:
            child.kill()
            child.wait()
    assert (now.temp_files, now.processes) == (before.temp_files + 1, before.processes + 1)
    assert now.rss_mb > 0 and now.fds > 0


def test_a_short_soak_on_a_correct_engine_passes_flat_and_clean(tmp_path):
    p = cli("soak", "--minutes", "0.25", "--seed", "3",
                        "--model", "jamba", "--model", "gemma3", "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "soak: zero findings, footprint flat, nothing left behind" in p.stdout
    summary = next(line for line in p.stdout.splitlines() if line.startswith("soak: seed 3"))
    assert "x 2 models" in summary and "PASS" in summary and "FAIL" not in summary
    assert sorted(f.name for f in tmp_path.iterdir()) == ["soak.html", "soak.json"]  # no finding saved
    doc = json.loads((tmp_path / "soak.json").read_text())
    assert doc["verdict"] == "PASS" and doc["findings"] == [] and doc["runs"] > 0 and doc["requests"] > 0


def test_a_failure_class_leaves_out_numbers_paths_and_names_and_says_where_reuse_was_lost():
    from llama_cachecheck.outcomes import ScenarioResult
    from llama_cachecheck.status import Status

    sc = grammar.random_scenario(1, 0)
    a = ScenarioResult(sc, "fixture:jamba", "server", "hybrid", None, Status.ERROR,
                       "fixture:jamba subject server /v1/chat/completions answered 500: boom at 12; log: x")
    b = ScenarioResult(sc, "fixture:mamba", "server", "recurrent", None, Status.ERROR,
                       "fixture:mamba subject server /completion answered 500: boom at 7")
    assert findings.failure_class(a) == findings.failure_class(b) == ("ERROR", "MODEL subject server PATH answered "
                                                                               "N: boom at N")
    assert findings.failure_class(ScenarioResult(sc, "m", "inproc", "hybrid", None, Status.PASS)) is None


def test_known_findings_match_on_status_memory_engine_build_and_what_the_scenario_does(tmp_path):
    known = findings.load_known()
    assert len(known) >= 8
    sc = scenario.load(scenario.BUNDLED / "slots-save-erase-restore.yaml")
    lost = ("LOST-REUSE", "reused fewer prompt tokens than the policy promises on its own slot")
    restore = {"selected", "full-reprocess", "created"}  # what the pinned server logs at finding 4's turn

    def explain(klass, memory, engine, build, events=restore):
        return findings.explain(known, klass, memory=memory, engine=engine, build=build, sc=sc, events=events)

    hit = explain(lost, "hybrid", "server", "llama-server 0.5.0 (x)")
    assert hit is not None and hit.name.startswith("finding 4")
    assert explain(lost, "attention", "server", "llama-server 0.5.0 (x)") is None  # not for it
    assert explain(lost, "hybrid", "inproc", "llama-cpp-python") is None  # a server's finding
    # the same shape, other evidence: the checkpoint was restored, so the loss is not finding 4's
    assert explain(lost, "hybrid", "server", "llama-server 0.5.0 (x)", {"selected", "restored"}) is None
    assert explain(lost, "hybrid", "server", "llama-server 0.5.0 (x)", None) is None  # no evidence, no credit
    wrong = ("FAIL", "tokens diverge")
    back = {"selected", "restored", "created"}  # b10001 rolled back to a checkpoint the file did not bring
    assert explain(wrong, "hybrid", "server", "llama-server 10001 (unknown) (/b)", back).name.startswith("finding 6")
    assert explain(wrong, "hybrid", "server", "llama-server 10001 (unknown) (/b)") is None  # nothing restored
    assert explain(wrong, "hybrid", "server", "llama-server 11434 (unknown) (/b)", back) is None


@pytest.mark.parametrize("text, said", [
    ("- name: x\n  status: FAIL\n", "entry 1: explanation must be given as text"),
    ("- {name: x, status: MAYBE, explanation: y}\n", "entry 1: status must be one of"),
    ("- {name: x, status: FAIL, explanation: y, needs: [teleport]}\n", "needs: 'teleport' is not a feature"),
    ("- {name: x, status: FAIL, explanation: y, colour: red}\n", "entry 1: unknown field 'colour'"),
    ("- {name: x, status: FAIL, explanation: y, build: '(('}\n", "entry 1: build is not a regular expression"),
    ("key: [unclosed\n", ": not valid YAML"),
    ("- {name: x, status: FAIL, explanation: y, case: {scenario: s}}\n", "entry 1: case must give scenario and model"),
    ("- {name: x, status: FAIL, explanation: y, case: {scenario: s, model: m, tries: 0}}\n",
     "entry 1: case.profile is deployed or isolated, case.tries at least 1"),
])
def test_a_bad_known_findings_file_is_one_line_naming_the_entry(tmp_path, text, said):
    path = tmp_path / "known.yaml"
    path.write_text(text)
    p = cli("soak", "--known", str(path), "--minutes", "0.01", "--model", "llama", "--report-dir", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and str(path) in p.stderr and said in p.stderr, p.stderr


@pytest.mark.parametrize("args, said", [
    (["--until-findings", "0"], "--until-findings: must be at least 1, got 0"),
    (["--replays", "0"], "--replays: must be at least 1, got 0"),
    (["--replays", "ten"], "--replays"),
    (["--engine", "server", "--server-url", "http://127.0.0.1:9"], "--server-url http://127.0.0.1:9: no server "
                                                                   "answers there"),
    (["--engine", "server", "--server-args", "--model other.gguf"], "--model"),
    (["--server-url", "http://127.0.0.1:9"], "--server-url needs --engine server"),
])
def test_bad_soak_input_is_one_line_and_exit_2(tmp_path, server_bin, args, said):
    binary = ["--server-bin", server_bin] if "server" in args else []
    p = cli("soak", *args, *binary, "--minutes", "0.01", "--model", "llama", "--report-dir", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr
    assert not (tmp_path / "soak.json").exists()


def _soak_until_found(server: str, tmp_path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    p = cli("soak", "--engine", "server", "--server-bin", server,
                        "--until-findings", "1", "--minutes", "10", "--seed", "1", "--model", "jamba",
                        "--report-dir", str(tmp_path), env={**os.environ, **(env or {})})
    return p, json.loads((tmp_path / "soak.json").read_text())


@pytest.mark.build
# cache-reuse-off-by-one is left out: the soak's reference is the same planted build, whose shifting reference
# would carry the plant too; tests/test_cache_reuse.py catches it against the unplanted build (--reference-bin)
@pytest.mark.parametrize("plant", ["restore-removed", *(p for p in PLANTS if p != "cache-reuse-off-by-one")])
def test_a_server_soak_finds_a_planted_bug_alone_and_minimizes_it(plant, good_and_bad_servers, planted_server,
                                                                  tmp_path, chromium):
    server = good_and_bad_servers[1] if plant == "restore-removed" else planted_server
    env = {} if plant == "restore-removed" else {"CACHECHECK_PLANT": plant}
    p, doc = _soak_until_found(server, tmp_path, env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "stopped: --until-findings 1 reached" in p.stdout
    (finding,) = doc["findings"]
    assert finding["status"] in ("FAIL", "ERROR") and finding["known"] is None and not finding["flaky"]
    small = finding["minimized"]
    assert small is not None and small["requests"] <= 3, finding
    replayed = cli(*small["replay"].split()[1:], "--report-dir",
                               str(tmp_path / "replay"), env={**os.environ, **env})
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr  # it still fails, on its own
    from selenium.webdriver.common.by import By

    chromium.get((tmp_path / "soak.html").as_uri())
    assert chromium.title == "cachecheck soak: FAIL"
    shown = chromium.find_element(By.CSS_SELECTOR, "details.finding")
    assert shown.get_attribute("open") is not None and "new" in shown.text and small["path"] in shown.text
    assert [e for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []


@pytest.mark.build
def test_the_pinned_server_without_a_plant_passes_the_seed_the_plants_are_found_with(planted_server, tmp_path):
    p = cli("soak", "--engine", "server", "--server-bin",
                        planted_server, "--minutes", "0.5", "--seed", "1", "--model", "jamba",
                        "--report-dir", str(tmp_path))
    doc = json.loads((tmp_path / "soak.json").read_text())
    first = [g for g in doc["findings"] if g["scenario"] in ("soak-1-0", "soak-1-1")]
    assert doc["scenarios"] >= 2 and first == [], p.stdout  # what the plants fail on passes without them


FALSE_ALARMS = sorted((Path(__file__).parent / "data" / "soak-false-alarms").glob("*.yaml"))


@pytest.mark.parametrize("path", FALSE_ALARMS, ids=lambda p: p.stem)
def test_what_in_process_soaks_found_in_our_own_promises_passes_now(path, tmp_path):
    """Each was a LOST-REUSE of a correct engine (our policy, in-process), minimized by a soak: the promise
    or our slot design was wrong, not the cache. Played again, every turn reuses what is promised."""
    out = tmp_path / "r.json"
    p = cli("run", str(path), "--model", f"fixture:{path.suffixes[0][1:]}", "--json", str(out),
            "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-1500:]
    (case,) = read_results(out)["results"]
    assert case["status"] == "PASS" and len(case["turns"]) >= 2
    assert all(t["rule"] == "exact" and t["reused"] >= t["promised_reuse"] for t in case["turns"])


def test_a_finding_that_does_not_come_back_is_replayed_and_its_rate_and_orders_measured(server_bin):
    """Finding 1 on the pinned server: two requests pinned to one busy slot give wrong answers or not, by which
    the server takes up first. Each replay records that order from the server's log, and the rate counts the
    replays that failed alike."""
    from llama_cachecheck import campaign, flaky, models, scenario
    from llama_cachecheck.library import make_engine

    ref = models.resolve(["fixture:llama"])[0]
    engines = campaign.Engines(lambda m: make_engine(m.path, m.name, server_bin=server_bin))
    sc = scenario.load(scenario.BUNDLED / "slots-pinned-busy.yaml")
    try:
        first = engines.play(sc, ref, None)
        order = flaky.order_of(first)  # per block whose requests the log told apart: `a>b | b>a`
        assert order and set(order.replace("|", ">").replace(" ", "").split(">")) == {"a", "b"}, order
        klass = findings.failure_class(first) or ("FAIL", "tokens diverge")
        rate = flaky.measure(lambda: engines.play(sc, ref, None), klass, 4, 300, first=first)
    finally:
        engines.close()
    assert rate.replays == 4 and sum(n for _, n in rate.orders.values()) == 4
    assert rate.failed == sum(f for f, _ in rate.orders.values()) and 0 <= rate.failed <= 4
    said = rate.text()
    assert said.startswith(f"failed alike in {rate.failed} of 4 replays") and "by order of service: " in said
    assert all(o in said for o in rate.orders)


def test_a_reference_started_late_is_no_leak_and_a_process_left_over_is():
    """The 17 -> 18 of a server soak: a reference for flags first met after the warm mark is what an engine keeps
    (a subject and up to REFERENCES_KEPT references per model); a worker or any other process more at the end,
    or more servers than the engines keep, is a leak."""
    from llama_cachecheck.engines.server import REFERENCES_KEPT

    def at(workers: int, servers: int) -> footprint.Footprint:
        return footprint.Footprint(100.0, 10, workers + servers, 0, {p: ("m reference", 50.0) for p in range(servers)})

    warm = at(workers=2, servers=3)
    kept = 2 * (1 + REFERENCES_KEPT)  # two models
    assert footprint.leaks(warm, warm, at(2, 4), at(0, 0), servers_kept=kept) == []
    assert footprint.leaks(warm, warm, at(3, 4), at(0, 0), servers_kept=kept) == [
        "processes other than llama-servers grew from 2 to 3"]
    assert footprint.leaks(warm, warm, at(2, kept + 1), at(0, 0), servers_kept=kept) == [
        f"{kept + 1} llama-servers ran at the end, more than the {kept} the engines keep"]
    assert footprint.leaks(warm, warm, at(2, 3), at(0, 1), servers_kept=kept) == ["1 llama-server(s) left running"]


def test_a_lost_reuse_of_finding_3s_shape_with_another_cause_is_new(server_bin, tmp_path):
    """Known means the evidence matches, not the shape. On the pinned server, `slots-pinned` loses reuse in a
    scenario of several conversations (finding 3's shape: LOST-REUSE, server, conversations), but its cause is
    finding 2's (an empty pinned slot, the host cache never searched, no slot selected by similarity). With finding
    3 alone known it comes out new; with the registry, finding 2; finding 3's own case is still finding 3."""
    import shutil

    from llama_cachecheck import campaign, models, registry, scenario
    from llama_cachecheck.library import make_engine

    only_3 = tmp_path / "only-3"
    only_3.mkdir()
    (three,) = [p for p in registry.files() if p.name.startswith("003-")]
    shutil.copy(three, only_3)
    ref = models.resolve(["fixture:llama"])[0]
    engines = campaign.Engines(lambda m: make_engine(m.path, m.name, server_bin=server_bin))
    said = {}
    try:
        for name in ("slots-pinned", "slots-shared-system-prompt"):
            sc = scenario.load(scenario.BUNDLED / f"{name}.yaml")
            res = engines.play(sc, ref, None)
            klass = findings.failure_class(res)
            assert klass is not None and klass[0] == "LOST-REUSE", res.reason
            assert "conversations" in findings.features(sc)
            for known in (findings.load_known(only_3), findings.load_known()):
                hit = findings.explain(known, klass, memory=res.memory, engine="server", build=res.build, sc=sc,
                                       events=findings.evidence(res))
                against = "registry" if len(known) > 1 else "finding 3 alone"
                said[name, against] = hit.name.split(":")[0] if hit else "new"
    finally:
        engines.close()
    assert said == {("slots-pinned", "finding 3 alone"): "new", ("slots-pinned", "registry"): "finding 2",
                    ("slots-shared-system-prompt", "finding 3 alone"): "finding 3",
                    ("slots-shared-system-prompt", "registry"): "finding 3"}
