"""The verdict rule on hand-made streams: what is noise, what is a failure, what is lost reuse."""

import pytest

from llama_cachecheck.compare import Thresholds, compare, judge_reuse, topk_distance

TH = Thresholds(max_dlogprob=0.05, max_kl=0.01)


def top(*pairs):
    return [(t, lp) for t, lp in pairs]


def test_identical_streams_pass():
    t = [top((1, -0.1), (2, -2.5))] * 3
    v = compare([1, 1, 1], t, [1, 1, 1], t, scored=t, thresholds=TH)
    assert v.status == "PASS" and v.divergence is None and v.max_distance == 0


def test_near_tie_divergence_is_noise():
    sub = [top((1, -0.69), (2, -0.70))]
    ref = [top((2, -0.69), (1, -0.70))]
    v = compare([1], sub, [2], ref, scored=ref, thresholds=Thresholds(max_dlogprob=0.05, max_kl=0.01))
    assert v.status == "NOISE"
    assert v.divergence.position == 0 and v.divergence.noise


def test_confident_divergence_fails_and_names_both_tokens():
    sub = [top((1, -0.1), (2, -3.0))]
    ref = [top((2, -0.1), (1, -3.0))]
    v = compare([1], sub, [2], ref, scored=ref, thresholds=TH)
    assert v.status == "FAIL"
    assert "subject 1" in v.reason and "reference 2" in v.reason


def test_flat_distribution_flip_is_noise_though_a_token_fell_off_the_list():
    # a real model on a random prompt: ten tokens within 1.7 nats; the reference's pick fell just
    # below the subject's list, so the subject prefers its own by at most 1.67 - inside the tie margin
    flat_sub = top((5, -3.17), (6, -3.65), (7, -4.0), (8, -4.1), (9, -4.84))
    flat_ref = top((4, -3.07), (5, -3.99), (8, -4.01), (6, -4.66), (7, -4.7))
    th = Thresholds(max_dlogprob=5.0, max_kl=5.0, tie=1.84)
    v = compare([5], [flat_sub], [4], [flat_ref], scored=[flat_ref], thresholds=th)
    assert v.status == "NOISE"
    assert abs(v.divergence.reference_margin - 0.92) < 1e-9 and abs(v.divergence.subject_margin - 1.67) < 1e-9


def test_a_confident_pick_the_other_side_does_not_list_fails():
    # the same tie margin, but the subject is sure of a token the reference ranks below its list
    sub = top((5, -0.05), (6, -4.0), (9, -6.0))
    ref = top((4, -1.0), (5, -1.5), (8, -2.5))
    th = Thresholds(max_dlogprob=5.0, max_kl=5.0, tie=1.84)
    v = compare([5], [sub], [4], [ref], scored=[ref], thresholds=th)
    assert v.status == "FAIL" and v.divergence.subject_margin >= 5.9
    assert "subject its own by 5.95" in v.reason


def test_same_tokens_but_logprobs_apart_fail():
    sub = [top((1, -0.1), (2, -3.0))]
    scored = [top((1, -0.5), (2, -1.2))]
    v = compare([1], sub, [1], scored, scored=scored, thresholds=TH)
    assert v.status == "FAIL" and v.max_distance > 0.05


def test_lost_reuse_is_its_own_status_and_never_hides_a_wrong_answer():
    t = [top((1, -0.1), (2, -2.5))]
    v = compare([1], t, [1], t, scored=t, thresholds=TH)
    judge_reuse(v, n_reused=0, promised=40)
    assert v.status == "LOST-REUSE" and v.promised_reuse == 40
    wrong = compare([1], t, [2], [top((2, -0.1), (1, -2.5))], scored=None, thresholds=TH)
    judge_reuse(wrong, n_reused=0, promised=40)
    assert wrong.status == "FAIL"


def test_missing_token_uses_the_other_sides_floor():
    d, kl = topk_distance(top((1, -0.1), (2, -2.0)), top((1, -0.1), (3, -2.0)))
    assert d == 0.0 and kl == 0.0  # each missing token at the other's floor: the same two lists
    d, kl = topk_distance(top((1, -0.1), (2, -2.0)), top((1, -0.5), (2, -1.2)))
    assert d == pytest.approx(0.8) and kl > 0.1  # and where they do differ, both measures say so


def test_a_token_below_the_other_sides_floor_is_not_a_distance():
    # the server's lists are one short now and then: token 3 (-3.0) is missing on the reference
    # side, whose list ends at -1.9, so its reference logprob may be -3.0 too: no evidence of a gap
    sub = top((1, -0.1), (2, -2.0), (3, -3.0))
    ref = top((1, -0.1), (2, -1.9))
    d, _ = topk_distance(sub, ref)
    assert abs(d - 0.1) < 1e-9


