"""Bad scenario input: one line naming file:line and what is wrong, exit 2, no traceback."""

import textwrap
from pathlib import Path

import pytest

from llama_cachecheck import cli
from llama_cachecheck.scenario import BUNDLED, discover, load

BAD = {
    "syntax": ("purpose: x\nsteps:\n  - user: [unclosed\n", ":3: YAML syntax error"),
    "unknown-step": ("purpose: x\nsteps:\n  - user: hi\n  - shout: hi\n", ":4: steps[2]: unknown key 'shout'"),
    "wrong-type": ("purpose: x\nsettings: {n_batch: lots}\nsteps:\n  - user: hi\n  - generate\n",
                   ":2: settings.n_batch: expected an integer, got 'lots'"),
    "edit-missing-turn": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - edit: {turn: 3, content: yo}\n",
                          ":5: edit.turn: no user turn 3"),
    "unknown-key": ("purpose: x\nsampling: {n_predict: 4, temperature: 1}\nsteps:\n  - user: hi\n  - generate\n",
                    ":2: sampling: unknown key 'temperature'"),
    "no-generate": ("purpose: x\nsteps:\n  - user: hi\n", "nothing to compare"),
    "zero-threads": ("purpose: x\nsettings: {threads: 0}\nsteps:\n  - user: hi\n  - generate\n",
                     ":2: settings.threads: must be at least 1, got 0"),
    "zero-batch": ("purpose: x\nsettings:\n  n_batch: 0\nsteps:\n  - user: hi\n  - generate\n",
                   ":3: settings.n_batch: must be at least 1, got 0"),
    "ubatch-over-batch": ("purpose: x\nsettings: {n_batch: 32, n_ubatch: 64}\nsteps:\n  - user: hi\n  - generate\n",
                          ":2: settings: n_ubatch (64) must not exceed n_batch (32)"),
    "zero-top-k": ("purpose: x\nsampling: {top_k: 0}\nsteps:\n  - user: hi\n  - generate\n",
                   ":2: sampling.top_k: must be at least 1, got 0"),
    "prompt-over-n-ctx": ("purpose: x\nsettings: {n_ctx: 256}\nsampling: {n_predict: 16}\nsteps:\n"
                          "  - tokens: {random: {length: 200}}\n  - generate\n  - tokens: {random: {length: 50}}\n"
                          "  - generate\n",
                          ":5: steps: request 2 (step 4) has a prompt of at least 250 tokens; with n_predict 16 it "
                          "cannot fit n_ctx 256 (raise settings.n_ctx)"),
    # several conversations, slots and slot files
    "restore-never-saved": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - slot: {save: a.bin}\n"
                            "  - slot: {restore: b.bin}\n",
                            ":6: slot.restore: 'b.bin' was never saved before this step (saved so far: a.bin)"),
    "id-slot-beyond-n-parallel": ("purpose: x\nsettings: {n_parallel: 2}\nsteps:\n  - user: hi\n"
                                  "  - generate: {id_slot: 2}\n",
                                  ":5: steps: id_slot 2 is beyond settings.n_parallel 2 (slots are 0 to 1)"),
    "parallel-one-conversation-twice": ("purpose: x\nsteps:\n  - conversation: a\n  - user: hi\n"
                                        "  - parallel: [a, {conversation: a, regenerate: true}]\n",
                                        ":5: parallel: two requests for conversation 'a'"),
    "parallel-unknown-conversation": ("purpose: x\nsteps:\n  - user: hi\n  - parallel: [main, b]\n",
                                      ":4: parallel: no conversation 'b' so far (known: main)"),
    "parallel-of-one": ("purpose: x\nsteps:\n  - user: hi\n  - parallel: [main]\n",
                        ":4: steps[2].parallel: a parallel block sends at least two requests at once"),
    "regenerate-in-new-conversation": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - conversation: b\n"
                                       "  - regenerate\n", "regenerate before any generate in conversation 'b'"),
    "slot-file-with-path": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - slot: {save: ../x.bin}\n",
                            ":5: steps[3].slot.save: a plain file name"),
    "slot-two-actions": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - slot: {save: x, erase: true}\n",
                         ":5: steps[3].slot: give one of save: FILE, restore: FILE, damage: FILE or erase: true"),
    "damage-never-saved": ("purpose: x\nsteps:\n  - user: hi\n  - generate\n  - slot: {damage: a.bin}\n",
                           ":5: slot.damage: 'a.bin' was never saved before this step (saved so far: none)"),
    "similarity-not-a-number": ("purpose: x\nsettings: {slot_prompt_similarity: high}\nsteps:\n  - user: hi\n"
                                "  - generate\n", ":2: settings.slot_prompt_similarity: expected a number"),
    # agent loops
    "tool-without-call": ("purpose: x\nsteps:\n  - user: hi\n  - tool: '42'\n  - generate\n",
                          ":4: tool: no tool call to answer here"),
    "tool-after-its-answer": ("purpose: x\ntools: [{name: f}]\nsteps:\n  - user: hi\n"
                              "  - generate: {tool_calls: [{name: f}]}\n  - tool: '1'\n  - tool: '2'\n",
                              ":7: tool: no tool call to answer here"),
    "call-of-unknown-tool": ("purpose: x\ntools: [{name: f}]\nsteps:\n  - user: hi\n"
                             "  - assistant: {tool_calls: [{name: g}]}\n  - generate\n",
                             ":5: tool_calls: 'g' is not one of the scenario's tools (f)"),
    "call-without-tools": ("purpose: x\nsteps:\n  - user: hi\n  - generate: {tool_calls: [{name: f}]}\n",
                           ":4: tool_calls: 'f' is not one of the scenario's tools (none: add tools: at the top)"),
    "arguments-not-a-mapping": ("purpose: x\ntools: [{name: f}]\nsteps:\n  - user: hi\n"
                                "  - generate: {tool_calls: [{name: f, arguments: [1, 2]}]}\n",
                                ":5: steps[2].generate.tool_calls[1].arguments: expected a mapping"),
    "reasoning-on-a-user-message": ("purpose: x\nsteps:\n  - user: {content: hi, reasoning: hm}\n  - generate\n",
                                    ":3: steps[1].user: unknown key 'reasoning'"),
    "template-vars-not-a-mapping": ("purpose: x\nsteps:\n  - template_vars: today\n  - user: hi\n  - generate\n",
                                    ":3: steps[1].template_vars: expected a mapping, got a single value"),
    "template-var-not-scalar": ("purpose: x\nsteps:\n  - template_vars: {date: [1]}\n  - user: hi\n  - generate\n",
                                ":3: steps[1].template_vars.date: expected text, a number or true/false"),
    "tools-in-raw": ("purpose: x\ntools: [{name: f}]\nsteps:\n  - tokens: {random: {length: 9}}\n  - generate\n",
                     ":4: steps: tools, tool calls, reasoning and template variables are for chat scenarios"),
    "cache-ram-below-minus-one": ("purpose: x\nsettings: {cache_ram: -2}\nsteps:\n  - user: hi\n  - generate\n",
                                  ":2: settings.cache_ram: must be at least -1, got -2"),
}


def test_a_scenario_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("purpose: x\nsteps:\n  - user: caf\u00e9\n  - generate\n".encode("latin-1"))
    assert cli.main(["run", str(path), "--model", "fixture:llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:3: not UTF-8 text (byte 0xe9)" in err[0], err


def test_an_empty_scenario_directory_is_nothing_selected(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path), "--model", "fixture:llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing selected" in err[0], err


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenario_is_one_line_with_file_and_line(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert cli.main(["run", str(path), "--model", "fixture:llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(path) in err[0] and expected in err[0], err[0]


def test_bundled_library_loads_and_covers_the_required_cases():
    scenarios = discover([BUNDLED])
    assert len(scenarios) >= 15
    assert all(sc.purpose for sc in scenarios)
    tags = {t for sc in scenarios for t in sc.tags}
    assert {"regenerate", "edit", "truncate", "long", "batch", "eviction", "swa", "hit", "prefix", "branches",
            "stress", "seed"} <= tags


def test_defaults_apply_and_repeat_expands(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        purpose: repeat
        settings: {n_batch: 32}
        steps:
          - repeat: {times: 3, steps: [{user: hi}, generate]}
          - regenerate: {times: 2}
        """))
    sc = load(path)
    # only what differs; a ubatch larger than the batch is clamped to it, as llama.cpp does
    assert sc.settings.n_batch == 32 and sc.settings.n_ubatch == 32 and sc.settings.n_ctx == 2048
    assert len(sc.steps) == 8


def test_the_format_pages_first_example_is_a_valid_scenario(tmp_path):
    page = (Path(__file__).resolve().parents[1] / "docs" / "scenarios.md").read_text()
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    sc = load(path)
    assert sc.settings.ctx_checkpoints == 3 and len(sc.steps) > 8


def test_every_bundled_scenario_round_trips_through_the_writer(tmp_path):
    from llama_cachecheck.scenario import dump

    for sc in discover([BUNDLED]):
        path = tmp_path / f"{sc.name}.yaml"
        path.write_text(dump(sc))
        back = load(path)
        assert (back.steps, back.settings, back.sampling, back.expect, back.requires, back.tags, back.tools,
                back.strip_reasoning) == \
            (sc.steps, sc.settings, sc.sampling, sc.expect, sc.requires, sc.tags, sc.tools, sc.strip_reasoning), \
            sc.name


def test_several_conversations_parallel_blocks_and_slot_steps_are_read():
    from llama_cachecheck.scenario import Generate, Parallel, Request, SlotAction, Switch

    sc = load(BUNDLED / "slots-restore-into-another-slot.yaml")
    assert sc.settings.n_parallel == 2 and sc.settings.cache_ram is None
    assert SlotAction("restore", "harbour.bin", 1) in sc.steps and Switch("b") in sc.steps
    assert Generate(id_slot=1) in sc.steps and not sc.single_conversation
    par = next(s for s in load(BUNDLED / "slots-concurrent-regenerations.yaml").steps if isinstance(s, Parallel))
    assert par.requests == (Request("a", regenerate=True), Request("b", regenerate=True))
    primer = load(BUNDLED / "slots-primer.yaml")
    assert Generate(n_predict=0) in primer.steps and primer.single_conversation


def test_agent_loop_steps_are_read_and_say_what_the_template_must_render():
    from llama_cachecheck.scenario import Generate, Message, TemplateVars, ToolCall

    sc = load(BUNDLED / "agent-strip-reasoning.yaml")
    assert sc.strip_reasoning and sc.template_needs == ("tools", "var:think")
    assert TemplateVars('{"think": true}') in sc.steps
    assert Generate(tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)) in sc.steps
    assert Message("tool", '{"city": "Paris", "temp": 21, "sky": "clear"}') in sc.steps
    assert json_tools(sc)[0]["function"]["parameters"]["required"] == ["city"]
    date = load(BUNDLED / "agent-date-line.yaml")
    assert date.template_needs == ("var:date",) and not date.tools


def json_tools(sc) -> list:
    import json

    return json.loads(sc.tools)
