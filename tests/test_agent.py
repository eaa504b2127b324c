"""Agent loops: tools, tool calls, tool results, reasoning stripped or kept, template variables."""

import json
import shutil
from pathlib import Path

import pytest
from clirun import cli

from llama_cachecheck import models
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

AGENT = sorted(p.stem for p in BUNDLED.glob("agent-*.yaml"))


def run_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "r.json"
    p = cli("run", *args, "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode in (0, 1), p.stdout + p.stderr
    return read_results(out)


def sent(turn: dict) -> list[dict]:
    """The messages a turn's request sent, as dicts (role, content and the agent-loop fields)."""
    return [{"role": m[0], "content": m[1], **(json.loads(m[2]) if len(m) > 2 else {})} for m in turn["messages"]]


def test_a_stripped_reply_leaves_its_reasoning_out_and_the_prompt_diverges_inside_it(tmp_path):
    doc = run_json(tmp_path, "agent-strip-reasoning", "agent-keep-reasoning", "--model", "fixture:jamba")
    strip, keep = (next(r for r in doc["results"] if r["scenario"] == n)
                   for n in ("agent-strip-reasoning", "agent-keep-reasoning"))
    assert strip["status"] == keep["status"] == "PASS"
    # the first reply was the model's reasoning (the template opened <think>) and called the tool
    for r in (strip, keep):
        call = [m for m in sent(r["turns"][1]) if m["role"] == "assistant"][0]
        assert call["content"] == "" and call["tool_calls"][0]["function"]["name"] == "get_weather"
        assert sent(r["turns"][1])[-1] == {"role": "tool", "content": '{"city": "Paris", "temp": 21, "sky": "clear"}',
                                           "tool_call_id": "call_1"}
    assert not any("reasoning_content" in m for t in strip["turns"] for m in sent(t))
    assert any("reasoning_content" in m for m in sent(keep["turns"][1]))
    # kept, the next prompt extends the cached reply; stripped, it diverges where the reasoning began, so a
    # checkpoint from before the reply is restored and the reasoning is processed no more
    assert keep["turns"][1]["reused"] > strip["turns"][1]["reused"] > 0
    assert "restored" in [e["kind"] for e in strip["turns"][1]["events"]]


def template_without_agent_support(tmp_path: Path) -> Path:
    """A real GGUF of the fixtures whose chat template names no tool calls, reasoning or `think` (the same
    length, so the file stays valid): a model whose template renders none of the agent loop."""
    data = Path(models.resolve(["fixture:jamba"])[0].path).read_bytes()
    for old, new in ((b"tool_calls", b"tool_cxlls"), (b"reasoning_content", b"reasoning_cxntent"),
                     (b"think", b"thxnk")):
        data = data.replace(old, new)
    out = tmp_path / "plain-template.gguf"
    out.write_bytes(data)
    return out


def test_a_template_without_tools_or_reasoning_skips_a_bundled_agent_scenario_and_refuses_a_users(tmp_path):
    gguf = template_without_agent_support(tmp_path)
    doc = run_json(tmp_path, "agent-strip-reasoning", "agent-date-line", "--model", str(gguf))
    rows = {r["scenario"]: r for r in doc["results"]}
    assert rows["agent-strip-reasoning"]["status"] == "SKIP"
    assert rows["agent-strip-reasoning"]["reason"] == \
        "the model's chat template renders no tools, variable think (the scenario needs it)"
    assert rows["agent-date-line"]["status"] == "PASS"  # its date variable is still there
    mine = tmp_path / "mine.yaml"
    shutil.copy(BUNDLED / "agent-strip-reasoning.yaml", mine)
    p = cli("run", str(mine), "--model", str(gguf))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"cachecheck: error: {mine}: cannot play on {gguf}: the model's chat template "
                               f"renders no tools, variable think"), p.stderr
    reasoning = tmp_path / "reasoning.yaml"
    reasoning.write_text("purpose: x\nsteps:\n  - user: hi\n  - assistant: {content: fine, reasoning: hm}\n"
                         "  - user: again\n  - generate\n")
    p = cli("run", str(reasoning), "--model", str(gguf), "--model", "fixture:jamba")
    assert p.returncode == 2 and p.stderr.strip() == (f"cachecheck: error: {reasoning}: cannot play on {gguf}: the "
                                                      f"model's chat template renders no reasoning (the scenario needs "
                                                      f"it)"), p.stderr


def test_a_new_date_line_promises_no_reuse_and_the_next_turn_reuses_again(tmp_path):
    doc = run_json(tmp_path, "agent-date-line", "--model", "fixture:mamba", "--model", "fixture:llama")
    for r in doc["results"]:
        assert r["status"] == "PASS", r["reason"]
        reused = [t["reused"] for t in r["turns"]]
        assert reused[1] > 0 and reused[2] == 0 and reused[3] > 0, reused  # the date changed before turn 3


@pytest.mark.parametrize("fault", ["keep-stale-checkpoints", "no-restore"])
def test_the_agent_scenarios_catch_a_checkpoint_kept_past_stripped_reasoning(tmp_path, fault):
    doc = run_json(tmp_path, *AGENT, "--model", "fixture:qwen35", "--fault", fault)
    failed = {r["scenario"] for r in doc["results"] if r["status"] == "FAIL"}
    assert "agent-strip-reasoning" in failed, [(r["scenario"], r["status"]) for r in doc["results"]]


def test_the_agent_scenarios_pass_against_the_real_server(server_bin, tmp_path):
    doc = run_json(tmp_path, *AGENT, "--engine", "server", "--server-bin", server_bin,
                   "--model", "fixture:jamba", "--model", "fixture:gemma3", "--model", "fixture:llama")
    bad = [(r["model"], r["scenario"], r["status"], r["reason"][:200]) for r in doc["results"]
           if r["status"] not in ("PASS", "NOISE")]
    assert not bad, bad
    strip = next(r for r in doc["results"] if r["scenario"] == "agent-strip-reasoning" and r["model"].endswith("jamba"))
    assert not any("reasoning_content" in m for t in strip["turns"] for m in sent(t))
    assert "restored" in [e["kind"] for t in strip["turns"] for e in t["events"]]


def test_a_user_tool_call_survives_the_writer(tmp_path):
    from llama_cachecheck.scenario import dump, load

    sc = load(BUNDLED / "agent-parallel-tool-calls.yaml")
    path = tmp_path / "again.yaml"
    path.write_text(dump(sc))
    assert load(path).steps == sc.steps and load(path).tools == sc.tools


def test_a_chat_reply_goes_back_as_its_tokens_bytes_unless_they_are_not_all_there():
    from llama_cachecheck.engines.server import _as_written

    probs = [{"id": 1, "bytes": list(b" The")}, {"id": 2, "bytes": list(b" answer")}, {"id": 3, "bytes": []}]
    assert _as_written(probs, 3, True, "The answer") == " The answer"  # the parser's trim undone, EOG left out
    assert _as_written(probs, 2, False, "The answer") == " The answer"
    assert _as_written(probs[:1] + [{"id": 2}], 2, False, "The answer") == "The answer"  # no bytes: as parsed
    cut = [{"id": 1, "bytes": list("é".encode())[1:]}]  # a character's first byte left out of the list
    assert _as_written(cut, 1, False, "?") == "?"
