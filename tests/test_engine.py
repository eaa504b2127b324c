"""The in-process engine's worker: a llama.cpp abort becomes an error with the signal and stderr."""

import dataclasses

import pytest

from llama_cachecheck import fixtures
from llama_cachecheck.engines.base import EngineError, Prompt
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.scenario import DEFAULT_SETTINGS


def test_ggml_abort_in_llama_cpp_is_an_error_not_a_crash(tmp_path, monkeypatch):
    # a real abort: the pinned llama.cpp asserts token_shift_count == 2 when building rwkv7's graph
    monkeypatch.setenv("CACHECHECK_CACHE", str(tmp_path))
    spec = fixtures.FixtureSpec(name="rwkv7-bad", arch="rwkv7", n_embd=64, n_layer=2, n_head=2, n_ff=128, seed=1,
                                output_scale=4.0, kv={"token_shift_count": 1})
    path = fixtures.build(spec).path
    eng = InprocEngine(str(path), "rwkv7-bad")
    with pytest.raises(EngineError, match=r"died \(signal SIGABRT\).*GGML_ASSERT"):
        eng.start_session(DEFAULT_SETTINGS)
    eng.close()
    assert eng.worker.proc is None


def test_subject_matches_reference_and_reports_reuse():
    path = fixtures.build_all(["mamba"])[0].path
    eng = InprocEngine(str(path), "mamba")
    try:
        eng.start_session(dataclasses.replace(DEFAULT_SETTINGS, n_batch=32, n_ubatch=32))
        p = Prompt(messages=(("user", "What is the square root of 81?"),))
        first = eng.complete(p, 8, 5)
        again = eng.complete(p, 8, 5)
        ref = eng.reference(p, 8, 5)
        assert first.tokens == again.tokens == ref.tokens
        assert first.n_reused == 0 and again.n_reused == len(again.prompt_tokens) - 4
        assert any(e["kind"] == "restored" for e in again.events)
    finally:
        eng.close()
