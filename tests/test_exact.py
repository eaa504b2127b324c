"""Exact comparison in-process: the reference replays the subject's decode calls, so a correct
cache gives the same bits, and any difference at all is a FAIL."""

import dataclasses

import pytest
from clirun import cli

from llama_cachecheck import fixtures
from llama_cachecheck.compare import EXACT, compare
from llama_cachecheck.engines.base import Prompt
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.engines.lowlevel import Context, Model
from llama_cachecheck.engines.replay import RecordedMemory, Step
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED, DEFAULT_SETTINGS

WINDOW_REASON = "window cells were overwritten"


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED), "--json", str(out),
                        "--report-dir", str(tmp_path / "rep"), *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return read_results(out)


@pytest.fixture(scope="module")
def clean_exact(tmp_path_factory):
    return run_json(tmp_path_factory.mktemp("exact"))


def test_clean_runs_on_every_fixture_are_bit_exact_but_for_the_named_window_case(clean_exact):
    turns = [(r, t) for r in clean_exact["results"] for t in r["turns"]]
    assert len(turns) > 1000
    assert {r["status"] for r in clean_exact["results"]} <= {"PASS", "SKIP"}  # no NOISE in-process
    for r, t in turns:
        if t["rule"] == "exact":
            assert t["max_distance"] == 0 and t["max_kl"] == 0, (r["scenario"], r["model"], t["index"])
        else:  # the one documented exception: a sliding window whose cells a removed branch overwrote
            assert r["memory"] == "swa" and WINDOW_REASON in t["rule"], (r["scenario"], r["model"], t["rule"])
    by_kind = {}
    for r, t in turns:
        by_kind.setdefault(r["memory"], []).append(t["rule"] == "exact")
    assert all(all(v) for k, v in by_kind.items() if k != "swa")
    assert sum(by_kind["swa"]) > len(by_kind["swa"]) / 3  # most sliding-window turns are exact too


def test_the_replay_is_what_makes_it_exact(tmp_path, clean_exact):
    # chunked its own way, the same reference differs from the cache by rounding: the check can tell
    calibrated = run_json(tmp_path, "--tolerance", "calibrated", "--model", "fixture:llama")
    assert max(r["max_distance"] for r in calibrated["results"]) > 0
    assert {t["rule"].split(":")[0] for r in calibrated["results"] for t in r["turns"]} == {"calibrated tolerance"}
    exact = [r for r in clean_exact["results"] if r["model"] == "fixture:llama"]
    assert max(r["max_distance"] for r in exact) == 0


def test_any_difference_fails_and_names_position_size_and_both_lists():
    same = [[(1, -0.5), (2, -1.0)]]
    off = [[(1, -0.5), (2, -1.0)], [(1, -0.5 - 1e-7), (2, -1.0)]]
    v = compare([1, 1], same * 2, [1, 1], off, scored=off, thresholds=EXACT)
    assert v.status == "FAIL"
    assert "position 1 by 1e-07" in v.reason
    assert "subject top [1: -0.5, 2: -1.0] vs reference top [1: -0.5000001, 2: -1.0]" in v.reason
    assert compare([1, 1], same * 2, [1, 1], same * 2, scored=same * 2, thresholds=EXACT).status == "PASS"


def test_a_cut_batch_is_replayed_in_its_full_shape_and_a_restore_is_marked():
    path = str(fixtures.build_all(["llama"])[0].path)
    model = Model(path)
    ctx = Context(model, dataclasses.replace(DEFAULT_SETTINGS, n_batch=16, n_ubatch=16))
    try:
        mem = RecordedMemory(ctx, n_swa=64)  # bookkept as a window memory (the fixture's cells stay put either way)
        toks = list(range(5, 45))
        mem.decode(toks[:16], 0)
        mem.decode(toks[16:32], 16)
        state = mem.save_partial()
        mem.decode(toks[32:40], 32)
        assert mem.seq_rm(20)  # cut the second call back to 4 of its 16 tokens, drop the third
        mem.decode([7, 8], 20)
        plan = mem.plan(22, tail_ok=lambda c: True)
        assert plan == [Step(0, 16), Step(16, 4, tuple(toks[20:32])), Step(20, 2)]
        assert mem.plan(22, tail_ok=lambda c: False)[1].cut  # not replayable: said so
        assert mem.plan(23, tail_ok=lambda c: True) is None  # calls that do not cover the prompt: no plan
        mem.load_partial(state)  # a restore brings back the calls that built the state, marked
        assert [(s.pos0, s.keep, s.reload) for s in mem.plan(32, lambda c: True)] == [(0, 16, ""), (16, 16, "partial")]
        mem.n_swa = 0  # other memory keeps its cells in place on a restore: nothing to mirror
        mem.load_partial(state)
        assert not any(s.reload for s in mem.plan(32, lambda c: True))
    finally:
        ctx.close()
        model.close()


def test_teacher_forcing_runs_only_after_a_divergence():
    path = str(fixtures.build_all(["mamba"])[0].path)
    eng = InprocEngine(path, "mamba")
    try:
        eng.start_session(DEFAULT_SETTINGS)
        p = Prompt(messages=(("user", "Say something."),))
        sub = eng.complete(p, 6, 4)
        ref = eng.reference(p, 6, 4)
        assert ref.exact and sub.tokens == ref.tokens
        before = eng.decode_seconds()
        assert eng.score(p, sub.tokens, 4) == ref.top
        assert eng.decode_seconds() == before  # the reference's own pass already held every logprob
        assert len(ref.tokens) >= 2
        other = [ref.tokens[0], (ref.tokens[1] + 1) % eng.info.n_vocab]
        rows = eng.score(p, other, 4)
        assert eng.decode_seconds() > before and rows[:2] == ref.top[:2]  # bit-equal up to where they split
    finally:
        eng.close()


