"""The design's reuse promise (promise.py), request by request: what a correct llama-server must reuse, from
the checkpoints its slot surely keeps across requests and the branches its host cache surely holds."""

from clirun import cli

from llama_cachecheck.conversation import Track
from llama_cachecheck.engines.base import Completion, SessionSettings
from llama_cachecheck.promise import Promise
from llama_cachecheck.results import read as read_results

A = list(range(1000, 1100))  # 100 tokens


def promises(memory: str, requests: list[tuple[list[int], int]], **settings) -> list[int]:
    """Each request's promise, the subject reusing what the request says; every reply is two tokens."""
    s = SessionSettings(**settings)
    design = Promise("policy", memory, s, reuse=True)
    t = Track("main", memory, s.ctx_checkpoints, 16)
    out = []
    for turn, (prompt, reused) in enumerate(requests, 1):
        sub = Completion(prompt, [7, 8], "", [], reused, len(prompt) - reused)
        pledge = design.of(t, sub, alone=True)
        design.served(t, sub, pledge, turn)
        t.prev_prompt, t.prev_held = prompt, prompt + [7]
        out.append(pledge.n)
    return out


def test_a_regeneration_is_promised_the_near_end_checkpoint():
    # checkpoints 4 + n_ubatch and 4 tokens before the prompt's end (36 and 96); SWA restores to p - 1
    assert promises("hybrid", [(A, 0), (A, 96)]) == [0, 96]
    assert promises("swa", [(A, 0), (A, 95)]) == [0, 95]
    assert promises("attention", [(A, 0), (A, 99)]) == [0, 99]
    assert promises("recurrent", [(A, 0), (A[:50] + [7] * 60, 36)]) == [0, 36]


def test_a_recurrent_state_cut_to_its_checkpoint_needs_the_one_before():
    # the prompt ends at the checkpoint (96): a restored state is kept whole and one token must be left to
    # decode, so only the one at 36 serves; an SWA checkpoint restores to 95 and decodes the 96th
    assert promises("recurrent", [(A, 0), (A[:96], 36)]) == [0, 36]
    assert promises("swa", [(A, 0), (A[:96], 95)]) == [0, 95]


def test_a_state_the_prompt_continues_is_promised_whole():
    assert promises("recurrent", [(A, 0), (A + [7] + [9] * 20, 101)]) == [0, 101]


def test_an_earlier_requests_checkpoint_stays_promised():
    # the second request's checkpoints (232, 296) lie past where the third prompt leaves the first's: the
    # design still keeps the first request's (96, at the cut it resumed from) and must restore it
    longer = A + [7] + [9] * 199
    back = A + [5] * 30
    assert promises("recurrent", [(A, 0), (longer, 101), (back, 96)]) == [0, 101, 96]


def test_a_checkpoint_past_where_a_request_resumed_is_erased():
    # the second request resumed at 36 (cut inside the first prompt): the one at 96 is gone with it
    edit = A[:50] + [5] * 50
    assert promises("recurrent", [(A, 0), (edit, 36), (A + [6] * 10, 36)]) == [0, 36, 36]


def test_a_full_list_promises_only_the_last_requests_checkpoints():
    longer = A + [7] + [9] * 199
    back = A + [5] * 30
    assert promises("recurrent", [(A, 0), (longer, 101), (back, 0)], ctx_checkpoints=8) == [0, 101, 0]


def test_an_earlier_branch_comes_back_from_the_host_cache():
    # the edit drops the first branch's tail from the slot: the design saves it (with its checkpoint at 96)
    # and loads it for the prompt that goes back to it, which the slot's own checkpoints serve only to 36
    edit = A[:50] + [5] * 50
    again = A + [6] * 10
    assert promises("recurrent", [(A, 0), (edit, 36), (again, 36)], cache_ram=8192) == [0, 36, 96]
    assert promises("attention", [(A, 0), (edit, 50), (again, 50)], cache_ram=8192) == [0, 50, 100]
    assert promises("recurrent", [(A, 0), (edit, 36), (again, 36)], cache_ram=0) == [0, 36, 36]


def _played(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    p = cli("run", *args, "--model", "fixture:jamba", "--json", str(out), "--report-dir", str(tmp_path))
    (res,) = read_results(out)["results"]
    return res | {"stdout": p.stdout}


def test_the_design_keeps_the_promise_of_an_earlier_branch_in_process(tmp_path):
    # alternate-branches: the question edited, edited back, edited again. Turns 4 and 5 go back to a branch an
    # edit dropped from the slot: the in-process design loads it from the host cache and restores its checkpoint
    # (52 of 56 tokens), what the promise asks
    res = _played(tmp_path, "alternate-branches")
    assert res["status"] == "PASS", res["stdout"][-2000:]
    turns = res["turns"]
    assert [t["promised_reuse"] for t in turns[3:5]] == [52, 52] == [t["reused"] for t in turns[3:5]]
    assert all(t["reused"] >= t["promised_reuse"] for t in turns)


def test_a_lost_checkpoint_of_an_earlier_request_is_lost_reuse(tmp_path):
    # edit-middle-turn goes back into the first exchange after two more: only the first request's checkpoint
    # serves it, and a policy that drops earlier requests' checkpoints re-processes everything
    assert _played(tmp_path, "edit-middle-turn")["status"] == "PASS"
    res = _played(tmp_path, "edit-middle-turn", "--fault", "drop-earlier-checkpoints")
    assert res["status"] == "LOST-REUSE", res["stdout"][-2000:]
    assert res["reason"].endswith("(the checkpoint at 16 tokens taken at turn 1, in its slot)"), res["reason"]
