"""A llama-server reference that repeats the subject's batches (engines/matched.py): a correct cache then gives
the same bits, so turns that reused a prefix are judged exactly, and what cannot be matched says why."""

from clirun import cli

from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

CHATS = ["multi-turn-extend", "regenerate-first-reply", "edit-middle-turn", "alternate-branches",
         "truncate-and-continue"]


def _turns(server_bin, tmp_path, models, scenarios, profile="deployed"):
    out = tmp_path / "r.json"
    args = ["run", *[str(BUNDLED / f"{s}.yaml") for s in scenarios], "--engine", "server", "--server-bin", server_bin,
            "--server-profile", profile, "--json", str(out), "--report-dir", str(tmp_path)]
    for m in models:
        args += ["--model", m]
    p = cli(*args)
    doc = read_results(out)
    return p, doc, [(r, t) for r in doc["results"] for t in r["turns"]]


def test_turns_that_reused_a_prefix_are_judged_exactly_on_every_memory_without_a_window(server_bin, tmp_path):
    p, doc, turns = _turns(server_bin, tmp_path, ["fixture:llama", "fixture:jamba", "fixture:mamba"], CHATS)
    # every reply right; alternate-branches loses reuse where it goes back to a branch an edit dropped (finding 19)
    assert {(r["scenario"], r["status"]) for r in doc["results"] if r["status"] != "PASS"} == \
        {("alternate-branches", "LOST-REUSE")}, [(r["model"], r["scenario"], r["reason"]) for r in doc["results"]]
    assert p.returncode == 1
    reused = [(r["model"], r["scenario"], t["reused"], t["rule"]) for r, t in turns if t["reused"] > 0]
    assert len(reused) >= 20
    # every turn, also those that restored a checkpoint or trimmed inside a batch: the same bits
    assert all(rule == "exact" for *_, rule in reused), [x for x in reused if x[3] != "exact"]
    same = [t["subject"]["top"] == t["reference"]["top"] and t["subject"]["tokens"] == t["reference"]["tokens"]
            for _, t in turns]
    assert all(same)


def test_what_cannot_be_matched_is_judged_by_the_tolerance_and_says_why(server_bin, tmp_path):
    # two conversations at once share batches: the plain reference; a window model's slot outgrew its 32-token
    # window, whose ring the matched reference does not wrap: its reply, judged by the tolerance
    p, doc, turns = _turns(server_bin, tmp_path, ["fixture:llama", "fixture:gemma3"],
                           ["slots-parallel-conversations", "multi-turn-extend"])
    rules = {(r["model"], r["scenario"]): [t["rule"] for t in r["turns"]] for r, t in turns}
    parallel = rules[("fixture:llama", "slots-parallel-conversations")]
    assert any("not matched: requests sent at once are batched together" in x for x in parallel), parallel
    window = rules[("fixture:gemma3", "multi-turn-extend")]
    said = "the reference repeated the subject's batches, but the slot held more than the model's window (32 tokens)"
    assert any(said in x for x in window), window
    assert all(x == "exact" or x.startswith("calibrated tolerance") for x in sum(rules.values(), []))


def test_a_slot_computed_beside_another_slots_cells_is_judged_by_the_tolerance(server_bin, tmp_path):
    # a regeneration the LRU rule sends to another slot (similarity off, idle slots not saved): its cells go after
    # the first slot's in the shared cache, elsewhere than the reference's one slot puts them (a soak's false FAIL
    # of 4e-6 nats, b11434)
    case = tmp_path / "beside.yaml"
    case.write_text("purpose: a regeneration on another slot\n"
                    "settings: {cache_idle_slots: false, slot_prompt_similarity: 0.0}\nsampling: {n_predict: 4}\n"
                    "steps:\n  - user: Keeps checkpoint so cannot edit state be a window\n  - generate\n"
                    "  - regenerate\n")
    out = tmp_path / "r.json"
    p = cli("run", str(case), "--engine", "server", "--server-bin", server_bin, "--model", "fixture:llama",
            "--json", str(out), "--report-dir", str(tmp_path))
    (r,) = read_results(out)["results"]
    assert p.returncode == 0 and r["status"] == "PASS", r["reason"]
    first, again = r["turns"]
    assert first["rule"] == "exact"
    assert "other slots held cells in the shared cache" in again["rule"], again["rule"]
