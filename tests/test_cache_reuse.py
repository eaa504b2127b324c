"""--cache-reuse as a scenario setting: chunks of the cache shifted into place after a splice in the middle
of a prompt. Attention memory is judged against a reference that shifts the same chunks; recurrent state,
which cannot drop a chunk it absorbed, against a full re-process."""

from pathlib import Path

import pytest
from clirun import cli

from llama_cachecheck import promise, scenario
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

REUSE = sorted(BUNDLED.glob("reuse-*.yaml"))


@pytest.mark.parametrize("held, prompt, n_min, reused", [
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 5, 6, 7, 8, 9], 3, 6),  # deleted [3, 4]: 5-8 shifted over the gap
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 5, 6, 7, 8, 9], 5, 2),  # the chunk is shorter than n_min: the prefix only
    ([1, 2, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], 2, 2),  # inserted: chunks are sought at the prompt's head only
    ([1, 2, 3, 4, 5, 6], [1, 2, 9, 9, 5, 6], 2, 2),  # replaced: the same
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 4, 5, 8, 9], 2, 5),  # two deletions, two chunks
])
def test_chunk_reuse_follows_the_servers_loop(held, prompt, n_min, reused):
    assert promise.chunk_reuse(held, prompt, n_min) == reused


def test_the_writer_keeps_splices_and_cache_reuse(tmp_path):
    for path in REUSE:
        sc = scenario.load(path)
        again = scenario.reload(sc, tmp_path / path.name)
        assert again is not None and again.steps == sc.steps and again.settings == sc.settings
        assert scenario.dump(again) == scenario.dump(sc)
    assert len(REUSE) >= 5 and all(scenario.load(p).settings.cache_reuse > 0 for p in REUSE)


@pytest.mark.parametrize("body, said", [
    ("  - user: hi\n  - generate\n  - splice: {at: 1, delete: 1}\n", "splice: only in raw-token scenarios"),
    ("  - tokens: {random: {length: 20}}\n  - generate\n  - splice: {at: 15, delete: 10}\n",
     "tokens [15, 25) are beyond the 20 tokens"),
    ("  - tokens: {random: {length: 20}}\n  - generate\n  - splice: {at: 5}\n", "give delete"),
    ("  - tokens: {random: {length: 20}}\n  - generate\n  - splice: {at: 5, remove: 2}\n", "unknown key 'remove'"),
])
def test_a_bad_splice_is_one_line_naming_file_and_line(tmp_path, body, said):
    p = tmp_path / "s.yaml"
    p.write_text("purpose: p\nsteps:\n" + body + "  - generate\n")
    run = cli("run", str(p), "--model", "fixture:llama")
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.startswith(f"cachecheck: error: {p}:5") and said in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def _user_file(tmp_path: Path) -> Path:
    p = tmp_path / "mine.yaml"
    p.write_text((BUNDLED / "reuse-delete-middle.yaml").read_text())
    return p


def test_cache_reuse_on_a_model_that_cannot_shift_is_bad_input_for_a_users_file(tmp_path):
    # gemma3's SWA cache shifts only with swa_full; qwen35 (M-RoPE) never: the server turns cache_reuse off there
    for model, said in (("fixture:gemma3", "swa memory of gemma3 cannot without swa_full"),
                        ("fixture:qwen35", "llama_memory_can_shift is false")):
        p = cli("run", str(_user_file(tmp_path)), "--model", model)
        assert p.returncode == 2 and p.stdout == "", p.stdout
        assert p.stderr.startswith(f"cachecheck: error: {tmp_path / 'mine.yaml'}: settings.cache_reuse: cannot play "
                                   f"on {model}") and said in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_in_process_attention_shifts_the_chunks_exactly_and_recurrent_memory_shifts_none(tmp_path):
    out = tmp_path / "r.json"
    p = cli("run", "-k", "reuse", "--model", "fixture:llama", "--model", "fixture:gemma3", "--model", "fixture:jamba",
            "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:]
    res = {(r["model"], r["scenario"]): r for r in read_results(out)["results"]}
    assert len(res) == 3 * len(REUSE)
    ran = [r for r in res.values() if r["status"] != "SKIP"]
    assert {r["status"] for r in ran} == {"PASS"} and all(t["rule"] == "exact" for r in ran for t in r["turns"])
    # attention: 300 tokens and a reply, then [100, 160) deleted; everything after the cut moves into place
    cut = res["fixture:llama", "reuse-delete-middle"]["turns"][1]
    assert cut["reused"] == cut["promised_reuse"] > 200
    assert res["fixture:gemma3", "reuse-sliding-window"]["turns"][1]["reused"] > 100  # swa_full: it shifts
    skipped = {s for (m, s), r in res.items() if r["status"] == "SKIP"}
    assert all(m == "fixture:gemma3" and "cannot without swa_full" in r["reason"]
               for (m, _), r in res.items() if r["status"] == "SKIP") and len(skipped) == len(REUSE) - 1
    jamba = res["fixture:jamba", "reuse-delete-middle"]["turns"][1]
    assert jamba["reused"] <= 100  # the design: no chunk moves in a recurrent state; nothing after the cut


def test_in_process_a_shift_off_by_one_is_caught(tmp_path):
    """The policy's chunk lands one position late: the reference moves the same cells, but holds the
    prompt's tokens where they land, so it differs."""
    out = tmp_path / "r.json"
    p = cli("run", "-k", "reuse-delete", "--model", "fixture:llama", "--fault", "cache-reuse-off-by-one",
            "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 1, p.stdout[-2000:]
    res = read_results(out)["results"]
    assert len(res) == 2 and {r["status"] for r in res} == {"FAIL"}, [r["reason"] for r in res]
    assert all(r["turns"][1]["reused"] == r["turns"][1]["promised_reuse"] for r in res)  # the same count, wrong


def test_on_the_pinned_server_attention_reuses_the_chunks_and_recurrent_state_keeps_the_deleted_one(server_bin,
                                                                                                      tmp_path):
    """Finding 13 (README): the pinned server shifts a recurrent state over a chunk it cannot take out."""
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED / "reuse-delete-middle.yaml"), "--engine", "server", "--server-bin", server_bin,
            "--model", "fixture:llama", "--model", "fixture:jamba", "--model", "fixture:gemma3", "--json", str(out),
            "--report-dir", str(tmp_path))
    assert p.returncode == 1, p.stdout[-2000:]
    res = {r["model"]: r for r in read_results(out)["results"]}
    llama, jamba, gemma3 = res["fixture:llama"], res["fixture:jamba"], res["fixture:gemma3"]
    assert gemma3["status"] == "SKIP" and "swa memory of gemma3 cannot without swa_full" in gemma3["reason"]
    assert llama["status"] == "PASS", llama["reason"]
    cut = llama["turns"][1]  # 300 tokens and a reply, then [100, 160) deleted: everything after the cut shifted
    assert cut["reused"] == cut["promised_reuse"] > 200 and "shifted the same chunks" in cut["rule"]
    assert jamba["status"] == "FAIL" and jamba["turns"][1]["status"] == "FAIL", jamba["reason"]
    assert jamba["turns"][1]["reused"] > 200 and jamba["turns"][1]["promised_reuse"] == 0
    assert "shifted" not in jamba["turns"][1]["rule"]  # recurrent state: the reference is a full re-process


@pytest.mark.build
def test_a_shift_off_by_one_is_caught(planted_server, server_bin, tmp_path, monkeypatch):
    """Plant: every reused chunk lands one position late. The reference (the pinned build, unplanted)
    shifts it where it belongs; the same planted build with the plant off passes."""
    def play(plant: str) -> dict:
        monkeypatch.setenv("CACHECHECK_PLANT", plant)
        out = tmp_path / f"{plant or 'none'}.json"
        cli("run", "-k", "reuse-delete", "--engine", "server", "--server-bin", planted_server, "--reference-bin",
            server_bin, "--model", "fixture:llama", "--json", str(out), "--report-dir", str(tmp_path))
        return {r["scenario"]: r for r in read_results(out)["results"]}

    planted = play("cache-reuse-off-by-one")
    assert {r["status"] for r in planted.values()} == {"FAIL"}, {s: r["reason"] for s, r in planted.items()}
    assert {r["status"] for r in play("").values()} <= {"PASS", "NOISE"}
