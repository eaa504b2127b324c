"""The docs cannot drift from the code: every `cachecheck` command they show is read by the real
argument parser, and every one that can run here in seconds (in-process, on the fixtures, or on the
pinned llama-server the suite builds anyway) is run as written. The findings index is what the
registry's files render, and the README links every finding."""

import re
import shlex
from pathlib import Path

import pytest
from clirun import cli as run_cli

from llama_cachecheck import cli, findings, registry

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md")),
         *registry.files(REPO / "findings"), REPO / "benchmarks" / "RESULTS.md"]


def commands() -> list[tuple[str, str]]:
    """(where, command) for each `cachecheck ...` line of a code block and each inline `cachecheck ...`."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO)
        for block in re.finditer(r"^```(?:sh|bash)?\n(.*?)^```", text, re.S | re.M):
            first = text[:block.start()].count("\n") + 2
            for i, line in enumerate(block.group(1).splitlines()):
                line = line.removeprefix("$ ")
                if line.startswith("cachecheck "):
                    out.append((f"{name}:{first + i}", line))
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for m in re.finditer(r"`(cachecheck [^`\s]+ [^`]+)`", prose):  # a command, not a command's name
            out.append((f"{name}", " ".join(m.group(1).split())))
    return out


def argv(command: str) -> list[str]:
    """The words of a documented command; `[...]` marks what may be left out, `$(...)` a path it prints."""
    command = re.sub(r"\$\((cachecheck [^)]*)\)", "/path/it/printed", command)
    command = re.sub(r'"\$\(.*?\)"', "/path/it/printed", command)
    words = shlex.split(command, comments=True)[1:]
    kept, optional = [], False
    for w in words:  # `[--server-bin B]` is left out; a quoted value with brackets in it ('NAME [MODEL]') is not
        optional = optional or w.startswith("[")
        if not optional:
            kept.append(w)
        optional = optional and not w.endswith("]")
    return [w for w in kept if w != "..."]


def test_the_docs_show_commands():
    found = commands()
    assert len(found) > 60, len(found)
    assert {c.split()[1] for _, c in found} >= {"run", "minimize", "diff", "soak", "bisect", "findings", "repro",
                                               "server", "selftest"}


@pytest.mark.parametrize("where,command", commands(), ids=lambda v: v if " " not in v else None)
def test_every_documented_command_is_one_cachecheck_reads(where, command, capsys):
    try:
        cli.parse(argv(command))
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` is not a command cachecheck takes: "
                    f"{capsys.readouterr().err.strip()} (exit {e.code})")


# not run here, and why: each is run by the test named, or needs what this machine must build first
_NOT_RUN = [
    (r"--pypi|--git|--source|--lcp-version|lib build|lib venv|server build", "builds a llama.cpp or a venv"),
    (r"--server-url|--url |--reference-url", "needs a server someone started"),
    (r"\bbisect\b", "builds llama.cpp commits (tests/test_bisect.py)"),
    (r"\bsoak\b|\bselftest\b|\bcalibrate\b|\bconformance\b", "runs for minutes (tests/test_soak.py, test_selftest.py, "
                                                             "test_calibrate.py, test_server.py)"),
    (r"gemma3-270m", "the real model (tests/test_real_model.py)"),
    (r"\b[A-Z][A-Z_]*\b|path/to|/path/it|build/bin|base/|pr/|~|\.json|\.\.\.", "names a placeholder"),
    (r"--model all|^cachecheck run (-k \"[^\"]*\" )?--engine server(?!.*--model)", "the whole library on a server, "
                                                                                "minutes"),
    (r"^cachecheck run (--tolerance calibrated|--engine llama-cpp-python)\s*(#|$)",
     "the whole library again in another mode (test_exact.py, test_lcp.py)"),
]


def why_not(command: str) -> str | None:
    return next((why for pattern, why in _NOT_RUN if re.search(pattern, command)), None)


RUNNABLE = sorted({" ".join(argv(c)): c for _, c in commands() if why_not(c) is None}.values())


def test_some_documented_commands_run_here():
    assert len(RUNNABLE) >= 15, RUNNABLE


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE)
def test_documented_command_runs_as_written(command, server_bin, tmp_path):
    """It runs to its end: 0, or 1 where it shows a finding or a planted fault; never bad input or a crash.
    (server_bin: the pinned llama-server a server command uses, built once for the suite.)"""
    words = [str(REPO / w) if w.startswith("scenarios/") else w for w in argv(command)]
    first = words[0] if words and words[0] in cli.COMMANDS else "run"
    if first in ("run", "minimize"):
        words += ["--report-dir", str(tmp_path)]
    if first == "repro" and "--out" not in words:
        words += ["--out", "repro"]  # beside the rest, in tmp_path
    done = run_cli(*words, cwd=tmp_path)
    assert done.returncode in (0, 1), f"`{command}` exited {done.returncode}: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr[-2000:]


def test_the_findings_index_is_what_the_registry_renders():
    assert (REPO / "findings" / "README.md").read_text(encoding="utf-8") == registry.index(REPO / "findings"), \
        "findings/README.md is stale: python -m llama_cachecheck.registry writes it"


def test_every_finding_has_its_fields_and_the_readme_links_it():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    entries = registry.entries(REPO / "findings")
    assert [front["id"] for _, front in entries] == list(range(1, 20))
    for path, front in entries:
        assert f"| [{front['id']}](findings/{path.name}) | {front['title']} | {front['kind']} |" in readme, path.name
        assert front["builds"] and front["upstream"] and front["explanation"]
        assert front.get("case") or front["engine"] != "server", path.name
    assert len(findings.load_known()) == 19


@pytest.mark.parametrize("text,said", [
    ("no front matter\n", "no front matter"),
    ("---\nid: 9\ntitle: t\nkind: crash\nupstream: none\nbuilds: {x: live}\n---\n", "id must be 1"),
    ("---\nid: 1\ntitle: t\nkind: odd\nupstream: none\nbuilds: {x: live}\n---\n", "kind must be one of"),
    ("---\nid: 1\ntitle: t\nkind: crash\nupstream: none\nbuilds: {x: live}\nstatus: ERROR\nexplanation: e\n"
     "colour: red\n---\n", "unknown field 'colour'"),
    ("---\nid: 1\ntitle: [t\n---\n", "not valid YAML"),
])
def test_a_bad_finding_file_is_one_line_naming_it(tmp_path, text, said):
    (tmp_path / "001-x.md").write_text(text)
    with pytest.raises(findings.KnownError) as e:
        findings.load_known(tmp_path)
    assert "001-x.md" in str(e.value) and said in str(e.value) and "\n" not in str(e.value)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation out, spaces to hyphens."""
    heads = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M),
                       re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_between_the_pages_leads_somewhere():
    broken = []
    for page in [*PAGES, REPO / "findings" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_every_scenario_the_docs_show_is_one_cachecheck_reads(tmp_path):
    from llama_cachecheck.scenario import ScenarioError, load

    shown = [(page, m.group(1)) for page in PAGES
             for m in re.finditer(r"^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)]
    assert len(shown) >= 5
    for i, (page, text) in enumerate(shown):
        if "steps:" not in text:
            continue  # a fragment (a step or a setting), shown inside a sentence that says where it goes
        path = tmp_path / f"shown-{i}.yaml"
        path.write_text(text if "purpose:" in text else f"purpose: shown in {page.name}\n{text}")
        try:
            load(path)
        except ScenarioError as e:
            pytest.fail(f"{page.relative_to(REPO)}: an example that is no scenario: {e}")
