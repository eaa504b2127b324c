"""Speculative decoding as a scenario setting: the subject llama-server drafts (a draft model or n-grams),
the reference does not, and greedy output must not change by a token."""

import struct
from pathlib import Path

import pytest
from clirun import cli

from llama_cachecheck import compare, models, scenario
from llama_cachecheck.engines.base import SessionSettings, Speculative, Unsupported
from llama_cachecheck.engines.capabilities import Capabilities, probe, speculative_flags
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

SPEC = sorted(str(p) for p in BUNDLED.glob("spec-*.yaml"))
# findings of the pinned server, each with its own test below: a recurrent draft for an attention model aborts it
# (17), and so do drafts longer than its batch (12)
RECURRENT_DRAFT = str(BUNDLED / "spec-rejected-drafts-attention.yaml")
OVERFLOW = str(BUNDLED / "spec-ngram-batch-overflow.yaml")
SAME_FAMILY_OR_CHECKPOINTED = [p for p in SPEC if p not in (RECURRENT_DRAFT, OVERFLOW)]


def _scenario(tmp_path: Path, speculative: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(f"purpose: p\nsettings:\n  speculative: {speculative}\nsteps:\n  - user: hi\n  - generate\n")
    return p


@pytest.mark.parametrize("spec, said", [
    ("{draft: fixture:llama, ngram: ngram-simple}", "give one of draft"),
    ("{n_max: 3}", "give one of draft"),
    ("{ngram: ngram-magic}", "unknown drafter 'ngram-magic'"),
    ("{draft: self, n_max: 2, n_min: 3}", "n_min <= n_max"),
    ("{draft: self, depth: 3}", "unknown key 'depth'"),
])
def test_a_bad_speculative_setting_is_one_line_naming_file_line_and_field(tmp_path, spec, said):
    p = cli("run", str(_scenario(tmp_path, spec)), "--model", "fixture:llama")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(f"cachecheck: error: {tmp_path / 's.yaml'}:3: settings.speculative") and said in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_the_writer_keeps_the_speculative_setting(tmp_path):
    for path in SPEC:
        sc = scenario.load(path)
        assert sc.settings.speculative is not None
        again = scenario.reload(sc, tmp_path / Path(path).name)
        assert again is not None and again.settings == sc.settings and scenario.dump(again) == scenario.dump(sc)


def test_a_draft_of_another_vocabulary_is_bad_input(tmp_path):
    """A real GGUF whose token list differs from the fixtures' in one token (same length): llama.cpp
    would refuse it as a draft; cachecheck says so before anything starts."""
    fixture = Path(models.resolve(["fixture:llama"])[0].path).read_bytes()
    old = b"water"
    at = fixture.index(struct.pack("<Q", len(old)) + old)
    other = tmp_path / "other-vocab.gguf"
    other.write_bytes(fixture[:at + 8] + b"wQtQr" + fixture[at + 8 + len(old):])
    p = cli("run", str(_scenario(tmp_path, f"{{draft: {other}}}")), "--model", "fixture:jamba")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "settings.speculative.draft" in p.stderr and "cannot draft for fixture:jamba" in p.stderr
    assert "'wQtQr' in it and 'water' in the model" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _speculated(turn: dict) -> dict:
    return next(e for e in turn["events"] if e["kind"] == "speculated")


def test_in_process_the_subject_speculates_and_every_reply_is_exact(tmp_path):
    """The policy drafts, verifies in one batch and rolls back (a checkpoint restore on recurrent and hybrid
    memory, a trim elsewhere); the reference makes the same verify batches from empty memory, so every
    reply is compared bit for bit."""
    out = tmp_path / "r.json"
    p = cli("run", *SPEC, "--model", "fixture:llama", "--model", "fixture:jamba", "--model", "fixture:mamba",
            "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:]
    ran = read_results(out)["results"]
    assert len(ran) == 3 * len(SPEC) and {r["status"] for r in ran} == {"PASS"}
    assert all(t["rule"] == "exact" for r in ran for t in r["turns"])
    told = {}
    for r in ran:
        for t in r["turns"]:
            e = _speculated(t)
            got = told.setdefault(r["model"], dict.fromkeys(("batches", "rolled_back", "drafted", "accepted"), 0))
            for key in got:
                got[key] += e[key]
    assert all(t["batches"] > 20 and t["accepted"] > 20 for t in told.values()), told
    assert told["fixture:llama"]["rolled_back"] == 0 < told["fixture:llama"]["drafted"] - told["fixture:llama"][
        "accepted"]  # attention trims its rejected drafts
    assert told["fixture:jamba"]["rolled_back"] > 10 and told["fixture:mamba"]["rolled_back"] > 10, told


@pytest.mark.parametrize("fault, scenario_name, model", [
    ("spec-keeps-rejected-draft", "spec-rejected-drafts-attention", "fixture:llama"),
    ("spec-no-rollback", "spec-draft-multi-turn", "fixture:jamba"),
    ("spec-no-rollback", "spec-draft-multi-turn", "fixture:mamba"),
    ("spec-past-end", "spec-self-draft-regenerate", "fixture:llama"),
])
def test_in_process_a_wrong_rollback_or_a_reply_past_its_end_is_caught(tmp_path, fault, scenario_name, model):
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED / f"{scenario_name}.yaml"), "--model", model, "--fault", fault, "--json", str(out),
            "--report-dir", str(tmp_path))
    assert p.returncode == 1, p.stdout[-2000:]
    (r,) = read_results(out)["results"]
    assert r["status"] == "FAIL", r["reason"]
    if fault == "spec-past-end":
        assert "reference end of reply" in r["reason"]
    clean = cli("run", str(BUNDLED / f"{scenario_name}.yaml"), "--model", model, "--report-dir", str(tmp_path))
    assert clean.returncode == 0, clean.stdout[-2000:]


def test_the_flags_follow_the_build(server_bin):
    caps = probe(server_bin)
    assert speculative_flags(caps, Speculative(draft="/d.gguf", n_max=6, n_min=1)) == [
        "--spec-type", "draft-simple", "--spec-draft-model", "/d.gguf", "--spec-draft-n-max", "6",
        "--spec-draft-n-min", "1"]
    assert speculative_flags(caps, Speculative(ngram="ngram-mod")) == ["--spec-type", "ngram-mod"]
    old = Capabilities("old", "1 (x)", frozenset({"--port", "-md", "--draft-max", "--draft-min"}), False)
    assert speculative_flags(old, Speculative(draft="/d.gguf")) == ["-md", "/d.gguf", "--draft-max", "4",
                                                                    "--draft-min", "0"]
    with pytest.raises(Unsupported, match="no n-gram drafter ngram-simple"):
        speculative_flags(old, Speculative(ngram="ngram-simple"))
    from llama_cachecheck.engines.capabilities import server_flags

    s = SessionSettings(speculative=Speculative(draft="/d.gguf"))
    assert "--spec-type" in server_flags(caps, s, True) and "--spec-type" not in server_flags(caps, s, False)


def test_the_server_speculates_and_the_answers_do_not_change(server_bin, tmp_path):
    out = tmp_path / "r.json"
    p = cli("run", *SAME_FAMILY_OR_CHECKPOINTED, "--engine", "server", "--server-bin", server_bin, "--model",
            "fixture:jamba", "--model", "fixture:llama", "--model", "fixture:mamba", "--json", str(out), "--report-dir",
            str(tmp_path))
    ran = read_results(out)["results"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(ran) == 3 * len(SAME_FAMILY_OR_CHECKPOINTED) and all(r["status"] in ("PASS", "NOISE") for r in ran)
    for r in ran:
        assert "--spec-type" in r["command"], r["command"]  # the subject speculated
        if "draft" in r["scenario"]:
            assert "--spec-draft-model" in r["command"]
    # the pinned build reports no probabilities for speculated tokens: those are compared by token, and said
    rules = {t["rule"] for r in ran for t in r["turns"]}
    assert any("reported no probabilities" in rule and "compared by token only" in rule for rule in rules)


def test_a_rollback_that_keeps_rejected_draft_tokens_is_caught(planted_server, tmp_path, monkeypatch):
    """Plant: a rejected draft rolled back without restoring the memory (recurrent, hybrid). The pinned
    server then cannot cut the rejected tokens out of a recurrent state and aborts; the same build
    without the plant passes."""
    def play(plant: str) -> dict:
        monkeypatch.setenv("CACHECHECK_PLANT", plant)
        out = tmp_path / f"{plant or 'none'}.json"
        cli("run", str(BUNDLED / "spec-draft-multi-turn.yaml"), "--engine", "server", "--server-bin", planted_server,
            "--model", "fixture:jamba", "--model", "fixture:mamba", "--json", str(out), "--report-dir", str(tmp_path))
        return {r["model"]: (r["status"], r["reason"]) for r in read_results(out)["results"]}

    planted = play("spec-no-rollback")
    assert {m: s for m, (s, _) in planted.items()} == {"fixture:jamba": "ERROR", "fixture:mamba": "ERROR"}, planted
    assert all("failed to remove sequence" in why for _, why in planted.values())
    assert {s for s, _ in play("").values()} <= {"PASS", "NOISE"}


def test_a_recurrent_draft_for_an_attention_model_aborts_the_pinned_server(server_bin, tmp_path):
    """Finding 17: the target trims its rejected drafts (attention memory can), and the same trim of the draft
    context, whose recurrent state cannot drop positions, is a GGML_ABORT. A recurrent target restores its
    checkpoints instead, and passes; in-process, the design's rollback passes on both."""
    out = tmp_path / "r.json"
    cli("run", RECURRENT_DRAFT, "--engine", "server", "--server-bin", server_bin, "--model", "fixture:llama",
        "--model", "fixture:jamba", "--json", str(out), "--report-dir", str(tmp_path))
    got = {r["model"]: r for r in read_results(out)["results"]}
    assert got["fixture:llama"]["status"] == "ERROR" and "failed to remove sequence" in got["fixture:llama"]["reason"]
    assert got["fixture:jamba"]["status"] in ("PASS", "NOISE"), got["fixture:jamba"]["reason"]


def test_drafts_longer_than_the_batch_abort_the_pinned_server_and_the_class_is_the_abort_line(server_bin, tmp_path):
    """Finding 12, one conversation: n-gram drafts of up to n_predict - 1 tokens (get_n_draft_max bounds them by the
    context and the reply, never by the batch) and the sampled token overflow a 17-token batch: GGML_ASSERT. The
    ERROR's class is that line, and the known-findings file names it; in-process the design bounds the draft by the
    batch, and the same scenario passes."""
    from llama_cachecheck import findings

    out = tmp_path / "r.json"
    p = cli("run", OVERFLOW, "--engine", "server", "--server-bin", server_bin, "--model", "fixture:llama", "--model",
            "fixture:jamba", "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 1
    rows = read_results(out)["results"]
    for r in rows:
        assert r["status"] == "ERROR", r["reason"]
        assert r["error_class"] == ('subject server died: server-context.cpp:508: GGML_ASSERT(add_ok && "batch must be '
                                    'large enough to hold the sampled and draft tokens") failed'), r["error_class"]
        assert " ".join(f"[{r['error_class']}]".split()) in " ".join(p.stdout.split())  # the console names it too
        known = findings.explain(findings.load_known(), ("ERROR", r["error_class"]), memory=r["memory"],
                                 engine="server",
                                 build=r["build"], sc=scenario.load(OVERFLOW), events=None)
        assert known is not None and known.name.startswith("finding 12:"), known
    assert 'failure class: <code>subject server died: server-context.cpp:508' in (tmp_path / "report.html").read_text()
    assert cli("run", OVERFLOW, "--model", "fixture:llama", "--model", "fixture:jamba", "--report-dir",
               str(tmp_path / "inproc")).returncode == 0


def test_a_blind_subject_position_is_judged_by_the_reference_margin_alone():
    th = compare.Thresholds(max_dlogprob=0.1, max_kl=0.01, tie=0.01)
    ref_top = [[(5, -0.1)], [(7, -1.0), (8, -1.005)]]
    near = compare.compare([5, 8], [[(5, -0.1)], []], [5, 7], ref_top, scored=None, thresholds=th)
    assert near.status == "NOISE" and "reported no probabilities" in near.reason
    far = compare.compare([5, 8], [[(5, -0.1)], []], [5, 7], [[(5, -0.1)], [(7, -1.0), (8, -2.0)]], scored=None,
                          thresholds=th)
    assert far.status == "FAIL" and "reported no probabilities" in far.reason
