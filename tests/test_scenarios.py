"""Bad scenario input: one line naming file:line and what is wrong, exit 2, no traceback."""

import textwrap
from pathlib import Path

import pytest

from harness import cli
from harness.scenario import BUNDLED, discover, load

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


def test_readme_example_is_a_valid_scenario(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    sc = load(path)
    assert sc.settings.ctx_checkpoints == 3 and len(sc.steps) > 8
