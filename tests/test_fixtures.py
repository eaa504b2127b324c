"""The fixture writer: deterministic bytes, the memory kind llama.cpp reports, usable margins."""

import dataclasses
import hashlib

import numpy as np

from llama_cachecheck import fixtures
from llama_cachecheck.engines.base import SessionSettings
from llama_cachecheck.engines.lowlevel import Context, Model


def test_same_spec_gives_same_bytes(tmp_path, monkeypatch):
    spec = fixtures.load_specs()[4]
    digests = []
    for sub in ("a", "b"):
        monkeypatch.setenv("CACHECHECK_CACHE", str(tmp_path / sub))
        f = fixtures.build(spec)
        digests.append(hashlib.sha256(f.path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    monkeypatch.setenv("CACHECHECK_CACHE", str(tmp_path / "c"))
    other = fixtures.build(dataclasses.replace(spec, seed=spec.seed + 1))
    assert hashlib.sha256(other.path.read_bytes()).hexdigest() != digests[0]


def test_every_fixture_loads_with_its_memory_kind_and_a_clear_top1():
    for f in fixtures.build_all():
        m = Model(f.path)
        assert m.memory_kind == f.memory
        c = Context(m, SessionSettings(n_ctx=256, n_batch=64, n_ubatch=64, threads=1))
        c.decode(m.tokenize("What is the square root of 81? Please repeat that."), 0)
        s = np.sort(c.logits())[::-1]
        # greedy decoding must not hinge on float noise (~1e-4 here)
        assert s[0] - s[1] > 0.01, (f.name, s[0] - s[1])
        c.close()
        m.close()


def test_vocab_round_trips_text():
    m = Model(fixtures.build_all(["llama"])[0].path)
    text = "Hello there, what is the square root of 81?\n\tOK: [a-z] {x} <tag> ~`|"
    assert m.detokenize(m.tokenize(text, add_special=False)).strip() == text


def test_every_token_of_every_fixture_is_valid_utf8_without_control_bytes():
    # a random model emits any token: none may be part of a multi-byte character or a control byte,
    # or a server refuses the reply and the two engines' texts part ways
    for f in fixtures.build_all():
        m = Model(f.path)
        for t in range(m.n_vocab):
            raw = m._piece_bytes(t, False)
            text = raw.decode("utf-8")  # raises on a partial character
            assert all(ch in "\t\n" or ord(ch) >= 0x20 for ch in text), (f.name, t, raw)
        m.close()


def test_non_ascii_text_on_a_fixture_is_a_skip_with_the_reason(tmp_path):
    from llama_cachecheck import compare
    from llama_cachecheck.engines.inproc import InprocEngine
    from llama_cachecheck.runner import play
    from llama_cachecheck.scenario import load

    path = tmp_path / "accents.yaml"
    path.write_text("purpose: a question with accents\nsteps:\n  - user: Qu'est-ce que c'est, ça?\n  - generate\n")
    f = fixtures.build_all(["jamba"])[0]
    eng = InprocEngine(str(f.path), "jamba")
    try:
        res = play(load(path), eng, "jamba", None, thresholds=compare.Thresholds(0.01, 1e-4))
    finally:
        eng.close()
    assert res.status == "SKIP" and "ASCII-only" in res.reason and "'ç'" in res.reason
