"""The speculative decoder's steps, on the fake memory of test_policy: the server's accept rule, its rollback,
and the bound on a slot that would never finish."""

import pytest
from test_policy import FakeMemory

from llama_cachecheck.engines.drafts import ngram_simple
from llama_cachecheck.policy import CheckpointPolicy, PolicySettings
from llama_cachecheck.speculation import NoProgress, SpeculativeDecoder

EOG = 99


def _decoder(kind: str, drafts: list[int], rows) -> tuple[SpeculativeDecoder, CheckpointPolicy]:
    policy = CheckpointPolicy(FakeMemory(kind), kind, 0, PolicySettings())
    policy.serve(list(range(1, 11)))
    return SpeculativeDecoder(policy, lambda held, sampled, n_max: list(drafts[:n_max]), rows,
                              lambda t: t == EOG, 512, 64), policy


def test_a_drafted_end_of_generation_token_ends_the_accepted_run():
    # the target agrees with every draft token: [11, EOG, 13]; acceptance stops at the EOG, and the reply with it
    dec, policy = _decoder("attention", [11, EOG, 13], lambda i: ([11, EOG, 13, 14][i], None))
    rows = dec.generate((10, None), 32)
    assert [t for t, _ in rows] == [10, 11, EOG]
    # the memory keeps the sampled token and the accepted draft before the EOG, not the drafts after it
    assert policy.tokens == list(range(1, 11)) + [10, 11]
    assert [v.n_out for v in dec.log] == [2]


def test_on_recurrent_memory_a_partial_acceptance_is_rolled_back_and_verified_again():
    # first batch [10, 11, 12, 13]: the target takes 11, then says 20 -> back to the checkpoint, then [10, 11, 20]
    answers = iter([11, 20, 11, 20, 21])
    dec, policy = _decoder("recurrent", [11, 12, 13], lambda i: (next(answers), None))
    rows = dec.generate((10, None), 4)
    assert [t for t, _ in rows] == [10, 11, 20, 21]
    assert [(v.tokens, v.n_out) for v in dec.log] == [((10, 11, 12), 0), ((10, 11, 20), 3)]  # a draft of 2: 4 to go
    assert policy.memory.state == list(range(1, 11)) + [10, 11, 20]  # no trace of the rejected 12, 13


def test_a_rollback_that_never_settles_is_an_error_not_a_hang():
    count = iter(range(1000, 2000))  # the target never says the same twice
    dec, _ = _decoder("recurrent", [11, 12], lambda i: (next(count), None))
    with pytest.raises(NoProgress, match="no progress"):
        dec.generate((10, None), 32)


def test_ngram_drafts_are_what_followed_the_last_n_gram_before():
    block = list(range(100, 160))  # 60 tokens, then again: the sampled token continues the repeat
    held = block + block[:30]
    assert ngram_simple(held, block[30], 8) == (block + block)[31:31 + 48]  # 48: it sizes its drafts itself
    assert ngram_simple(block, 7, 8) == []  # no earlier occurrence
    assert ngram_simple(block[:20], block[0], 8) == []  # too short to look
