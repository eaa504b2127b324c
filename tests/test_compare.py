"""The verdict rule on hand-made streams: what is noise, what is a failure, what is lost reuse."""

from harness.compare import Thresholds, compare, promised_reuse, topk_distance

TH = Thresholds(max_dlogprob=0.05, max_kl=0.01)


def top(*pairs):
    return [(t, lp) for t, lp in pairs]


def test_identical_streams_pass():
    t = [top((1, -0.1), (2, -2.5))] * 3
    v = compare([1, 1, 1], t, [1, 1, 1], t, t, TH)
    assert v.status == "PASS" and v.divergence is None and v.max_distance == 0


def test_near_tie_divergence_is_noise():
    sub = [top((1, -0.69), (2, -0.70))]
    ref = [top((2, -0.69), (1, -0.70))]
    v = compare([1], sub, [2], ref, ref, Thresholds(max_dlogprob=0.05, max_kl=0.01))
    assert v.status == "NOISE"
    assert v.divergence.position == 0 and v.divergence.noise


def test_confident_divergence_fails_and_names_both_tokens():
    sub = [top((1, -0.1), (2, -3.0))]
    ref = [top((2, -0.1), (1, -3.0))]
    v = compare([1], sub, [2], ref, ref, TH)
    assert v.status == "FAIL"
    assert "subject 1" in v.reason and "reference 2" in v.reason


def test_same_tokens_but_logprobs_apart_fail():
    sub = [top((1, -0.1), (2, -3.0))]
    scored = [top((1, -0.5), (2, -1.2))]
    v = compare([1], sub, [1], scored, scored, TH)
    assert v.status == "FAIL" and v.max_distance > 0.05


def test_lost_reuse_is_its_own_status():
    t = [top((1, -0.1), (2, -2.5))]
    v = compare([1], t, [1], t, t, TH, n_reused=0, promised=40)
    assert v.status == "LOST-REUSE"


def test_missing_token_uses_the_other_sides_floor():
    d, kl = topk_distance(top((1, -0.1), (2, -2.0)), top((1, -0.1), (3, -2.0)))
    assert d == 0.0 and kl >= 0.0


def test_promise_follows_the_near_end_checkpoints():
    prev = list(range(100))
    regenerate = list(prev)
    assert promised_reuse(prev, 0, regenerate, "hybrid", 64, 64, 32) == 96
    assert promised_reuse(prev, 0, regenerate, "swa", 64, 64, 32) == 95
    assert promised_reuse(prev, 0, regenerate, "attention", 64, 64, 32) == 99
    assert promised_reuse(prev, 0, prev[:50] + [7] * 60, "recurrent", 64, 64, 32) == 36
    assert promised_reuse(None, 0, prev, "hybrid", 64, 64, 32) == 0
