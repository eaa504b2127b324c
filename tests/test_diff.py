"""`cachecheck diff`: a clean run against a faulted one names exactly the failing cases."""

import json

import pytest
from clirun import cli

from llama_cachecheck.scenario import BUNDLED

SCENARIOS = [str(BUNDLED / "seed-regenerate.yaml"), str(BUNDLED / "long-prompt.yaml"),
             str(BUNDLED / "edit-first-turn.yaml")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    for name, extra in (("clean", []), ("clean2", []), ("faulty", ["--fault", "no-restore"])):
        cli("run", *SCENARIOS, "--model", "fixture:jamba", "--model", "fixture:mamba", "--json",
            str(d / f"{name}.json"), "--report-dir", str(d / name), *extra)
    return d


def test_clean_against_faulted_lists_exactly_the_failing_cases(runs):
    p = cli("diff", str(runs / "clean.json"), str(runs / "faulty.json"), "--json", str(runs / "d.json"),
            "--html", str(runs / "d.html"))
    assert p.returncode == 1, p.stdout + p.stderr
    faulty = json.loads((runs / "faulty.json").read_text())
    failing = {f"{r['scenario']} [{r['model']}]" for r in faulty["results"] if r["status"] == "FAIL"}
    found = json.loads((runs / "d.json").read_text())
    regressed = {c["case"] for c in found["changes"] if c["kind"] == "regression"}
    assert failing and regressed == failing and found["regressions"] == len(failing)
    html = (runs / "d.html").read_text()
    assert all(case in html for case in failing)


def test_two_clean_runs_have_no_regression(runs):
    p = cli("diff", str(runs / "clean.json"), str(runs / "clean2.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 regression(s); no changes" in p.stdout


def test_model_text_is_escaped_on_the_diff_page(runs, tmp_path):
    doc = json.loads((runs / "faulty.json").read_text())
    doc["replies"][doc["results"][0]["turns"][0]["subject"]]["text"] = '<script>alert("x")</script>'
    doc["results"][0]["status"] = "ERROR"
    (tmp_path / "evil.json").write_text(json.dumps(doc))
    cli("diff", str(runs / "clean.json"), str(tmp_path / "evil.json"), "--html", str(tmp_path / "d.html"))
    html = (tmp_path / "d.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


def _damaged(d, runs):
    doc = json.loads((runs / "clean.json").read_text())
    doc["replies"] = doc["replies"][:1]  # the turns name replies that are gone
    (d / "damaged.json").write_text(json.dumps(doc))
    return d / "damaged.json"


@pytest.mark.parametrize("make, said", [
    (lambda d, _: d / "missing.json", "missing.json: no such file"),
    (lambda d, _: (d / "x.json").write_text("{not json") and d / "x.json", "not a cachecheck results file"),
    (lambda d, _: (d / "old.json").write_text(json.dumps({"results": []})) and d / "old.json",
     "results schema 1, this cachecheck reads schemas 2, 3, 4"),
    (_damaged, "damaged.json: a damaged results file of schema 4 (IndexError"),
])
def test_bad_input_to_diff_is_one_line_and_exit_2(runs, tmp_path, make, said):
    p = cli("diff", str(runs / "clean.json"), str(make(tmp_path, runs)))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], p.stderr


def test_the_headline_is_the_worst_verdict_and_a_skip_is_none():
    from llama_cachecheck.results import headline

    assert headline(["PASS", "SKIP", "PASS"]) == "PASS"  # a clean run with skips reads as clean
    assert headline(["SKIP", "LOST-REUSE", "PASS"]) == "LOST-REUSE"
    assert headline(["SKIP", "SKIP"]) == "SKIP"  # nothing ran: not a pass


def test_each_reply_is_stored_once_and_read_back_whole(runs, tmp_path):
    from llama_cachecheck.results import read, to_json

    raw = json.loads((runs / "clean.json").read_text())
    turns = [t for case in raw["results"] for t in case["turns"]]
    assert turns and all(t["reference"] == t["subject"] for t in turns)  # a clean run: every reply bit-identical
    assert len(raw["replies"]) < len(turns) and all(isinstance(r["top"], str) for r in raw["replies"])  # packed
    doc = read(runs / "clean.json")
    for turn in (t for case in doc["results"] for t in case["turns"]):
        assert turn["reference"]["tokens"] == turn["subject"]["tokens"] and turn["reference"]["top"]
        assert isinstance(turn["scored_top"], list)
        assert all(len(position) == 10 for position in turn["subject"]["top"])
    assert json.loads(to_json(doc)) == raw  # written again, the same file

    faulty = read(runs / "faulty.json")  # a failing reply keeps both sides
    differing = [t for case in faulty["results"] for t in case["turns"]
                 if t["reference"]["tokens"] != t["subject"]["tokens"]]
    assert differing and all(t["reference"]["top"] != t["subject"]["top"] for t in differing)


def test_a_schema_3_file_is_still_read(runs, tmp_path):
    from llama_cachecheck.results import read

    new = read(runs / "clean.json")
    old = {**new, "schema": 3, "results": [{**case, "turns": [
        {**t, "reference": "subject", "scored_top": "subject"} for t in case["turns"]]} for case in new["results"]]}
    (tmp_path / "v3.json").write_text(json.dumps(old))  # schema 3: rows in place, "subject" for the same reply
    assert read(tmp_path / "v3.json")["results"] == new["results"]
    p = cli("diff", str(tmp_path / "v3.json"), str(runs / "clean2.json"))
    assert p.returncode == 0 and "0 regression(s); no changes" in p.stdout, p.stdout + p.stderr


def test_a_schema_2_file_is_still_read(runs, tmp_path):
    from llama_cachecheck.results import read

    old = {**read(runs / "clean.json"), "schema": 2}  # schema 2 stored every side in full, unrounded
    (tmp_path / "v2.json").write_text(json.dumps(old, indent=1))
    p = cli("diff", str(tmp_path / "v2.json"), str(runs / "clean2.json"))
    assert p.returncode == 0 and "0 regression(s); no changes" in p.stdout, p.stdout + p.stderr
