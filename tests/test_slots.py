"""The in-process engine's slots and host-memory prompt cache: modelled, bit-exact, and watched."""


import pytest
from clirun import cli

from llama_cachecheck import fixtures
from llama_cachecheck.engines.base import Prompt, SessionSettings
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.invariants import Handovers, prompt_digest
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED
from llama_cachecheck.slots import SLOT_FAULTS


@pytest.fixture(scope="module")
def llama():
    engine = InprocEngine(str(fixtures.build_all(["llama"])[0].path), "fixture:llama")
    yield engine
    engine.close()


def chat(*questions: str) -> Prompt:
    return Prompt(messages=tuple(("user", q) for q in questions))


def test_the_slot_scenarios_pass_bit_exact_on_every_fixture(tmp_path):
    out = tmp_path / "r.json"
    p = cli("run", "-k", "slots", "--model", "all", "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:]
    doc = read_results(out)
    results = doc["results"]
    assert len(results) == 11 * len(list(BUNDLED.glob("slots-*.yaml")))
    assert {r["status"] for r in results} == {"PASS"}  # nothing skipped: in-process plays them all
    turns = [t for r in results for t in r["turns"]]
    # bit-exact, but for the sliding-window case the single-slot engine already names
    assert all(t["rule"] == "exact" or "window cells were overwritten" in t["rule"] for t in turns)
    kinds = {e["kind"] for t in turns for e in t["events"]}
    assert {"host-saved", "host-loaded", "cleared", "file-restored"} <= kinds
    assert len({t["slot"] for t in turns}) >= 3  # several slots served
    assert not any(t["violations"] for t in turns)


def test_a_conversation_comes_back_from_the_host_cache_whole(llama):
    s = llama.start_session(SessionSettings(n_parallel=1))
    # the server's defaults, but the slots; given -np, the server keeps the KV cache apart (unified only on auto)
    assert (s.n_parallel, s.cache_ram, s.kv_unified) == (1, 8192, False)
    assert llama.start_session(SessionSettings()).kv_unified is True
    first = llama.complete(chat("Hello there, who are you?"), 8, 4)
    llama.complete(chat("What is a comet made of?"), 8, 4)  # takes the one slot
    back = chat("Hello there, who are you?")
    again = llama.complete(back, 8, 4)
    kinds = [e["kind"] for e in again.events]
    assert "host-loaded" in kinds and kinds.index("host-saved") < kinds.index("host-loaded")
    assert again.n_reused == len(first.prompt_tokens) - 1  # all but the last token, as before the other came
    ref = llama.reference(back, 8, 4)
    assert ref.exact and ref.tokens == again.tokens and ref.top == again.top


def test_parallel_requests_take_slots_of_their_own_and_a_busy_pinned_one_waits(llama):
    llama.start_session(SessionSettings(n_parallel=2))
    a, b = chat("Tell me about the old city."), chat("What is a comet made of?")
    done = llama.complete_parallel([(a, 8, 4, None), (b, 8, 4, None)])
    assert done[0].slot != done[1].slot
    pinned = llama.complete_parallel([(a, 8, 4, 0), (b, 8, 4, 0)])
    assert [c.slot for c in pinned] == [0, 0]  # the second waited for slot 0 instead of swapping it mid-reply
    for prompt, c in zip((a, b), pinned, strict=True):
        ref = llama.reference(prompt, 8, 4)
        assert ref.exact and ref.tokens == c.tokens


def test_a_slot_file_brings_back_the_prompt_and_its_checkpoints():
    engine = InprocEngine(str(fixtures.build_all(["jamba"])[0].path), "fixture:jamba")
    try:
        engine.start_session(SessionSettings(n_parallel=2))
        prompt = chat("Hello there, who are you?")
        first = engine.complete(prompt, 8, 4, 0)
        n = engine.slot_action("save", "one.bin", 0)
        assert n == len(first.prompt_tokens) + len(first.tokens) - 1
        assert engine.slot_action("erase", None, 0) == n
        assert engine.slot_action("restore", "one.bin", 1) == n  # into another slot
        again = engine.complete(prompt, 8, 4, 1)  # a regeneration: behind the head, a checkpoint serves it
        assert "file-restored" in [e["kind"] for e in again.events]
        assert "restored" in [e["kind"] for e in again.events] and again.n_reused > 0
        ref = engine.reference(prompt, 8, 4)
        assert ref.exact and ref.tokens == again.tokens and ref.top == again.top
        with pytest.raises(Exception, match="no slot file 'never.bin'"):
            engine.slot_action("restore", "never.bin", 1)
        after = engine.complete(prompt, 8, 4, 1)
        kinds = [e["kind"] for e in after.events]
        cleared = next(e for e in after.events if e["kind"] == "cleared")  # a failed restore leaves the slot empty
        assert cleared["slot"] == 1 and cleared["pos_max"] == -1
        assert after.n_reused == 0 or kinds.index("host-loaded") > kinds.index("cleared")  # only the cache fills it
        ref = engine.reference(prompt, 8, 4)
        assert ref.exact and ref.tokens == after.tokens
    finally:
        engine.close()


def test_a_load_nobody_held_or_that_keeps_under_a_quarter_and_a_cleared_slot_with_cells_are_violations():
    h = Handovers()
    h.held([1, 2, 3, 4, 5, 6, 7, 8])
    loaded = [{"kind": "host-loaded", "n_tokens": 8, "slot": 0, "prompt": prompt_digest([1, 2, 3, 4, 5, 6, 7, 8])}]
    assert h.check(loaded, [1, 2, 9]) == []  # another conversation's, sharing a system prompt: the design's
    assert h.check(loaded, [1, 9]) == ["slot 0: a prompt of 8 tokens loaded from the host cache keeps only 1 of its "
                                       "tokens for the new prompt (less than a quarter)"]
    assert loaded[0]["violation"]
    nobody = [{"kind": "host-loaded", "n_tokens": 2, "slot": 1, "prompt": prompt_digest([9, 9])}]
    assert "that no conversation held" in h.check(nobody, [9, 9, 1])[0]
    cleared = [{"kind": "cleared", "n_tokens": 3, "pos_min": -1, "pos_max": -1, "slot": 0},
               {"kind": "cleared", "n_tokens": 3, "pos_min": 0, "pos_max": 2, "slot": 1}]
    assert h.check(cleared, []) == ["slot 1 was cleared for a new task but still holds cells up to 2"]


# each slot fault, on a scenario and fixture where it must show (the selftest covers every fixture)
FAULT_CASES = {
    "host-cache-wrong-entry": ("slots-conversation-returns", "llama"),
    "host-cache-no-checkpoints": ("slots-regenerate-after-host-cache", "jamba"),
    "restore-drops-checkpoints": ("slots-save-erase-restore", "jamba"),
    "failed-restore-keeps-state": ("slots-damaged-file", "llama"),
    "restore-keeps-slot-checkpoints": ("slots-restore-over-another-conversation", "jamba"),
    "idle-cleared-unsaved": ("slots-idle-cleared", "llama"),
    "save-only-below-half": ("slots-shared-system-prompt", "llama"),
    "pinned-skips-host-cache": ("slots-pinned", "llama"),
    "similarity-at-threshold": ("slots-similarity-threshold", "mamba"),
    "host-cache-older-entry": ("slots-two-entries-one-conversation", "llama"),
}


@pytest.mark.parametrize("fault", sorted(SLOT_FAULTS))
def test_each_slot_fault_is_caught(fault, tmp_path):
    scenario, fixture = FAULT_CASES[fault]
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED / f"{scenario}.yaml"), "--model", f"fixture:{fixture}", "--fault", fault,
            "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 1, p.stdout[-2000:]
    status = read_results(out)["results"][0]["status"]
    assert status in ("FAIL", "LOST-REUSE")
    clean = cli("run", str(BUNDLED / f"{scenario}.yaml"), "--model", f"fixture:{fixture}", "--report-dir",
                str(tmp_path))
    assert clean.returncode == 0, clean.stdout[-2000:]  # the same case without the fault passes
