"""The fixture writer: deterministic bytes, the memory kind llama.cpp reports, usable margins."""

import dataclasses
import hashlib

import numpy as np

from harness import fixtures
from harness.engines.base import SessionSettings
from harness.engines.lowlevel import Context, Model


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
    text = "Hello there, what is the square root of 81? ünïcödé ok"
    assert m.detokenize(m.tokenize(text, add_special=False)).strip() == text
