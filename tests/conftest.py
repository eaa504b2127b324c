"""Shared by the tests: the pinned llama-server, and a llama.cpp clone with a known cache bug in its last commit."""

import os
import shutil
import subprocess

import pytest

from harness import builds

RESTORE = "it->load_tgt(ctx_tgt, slot.id, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);"
FIXED_DATES = {"GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
               "GIT_AUTHOR_NAME": "cachecheck", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "cachecheck",
               "GIT_COMMITTER_EMAIL": "t@localhost"}


@pytest.fixture(scope="session")
def server_bin():
    return str(builds.build().binary)  # cached by source; builds from the pinned sdist when missing


@pytest.fixture(scope="session")
def clone(tmp_path_factory):
    """The pinned llama.cpp, then a commit that skips the checkpoint restore. Fixed dates give stable
    commit ids, so their builds stay in the build cache between runs (and ccache shares the rest)."""
    repo = tmp_path_factory.mktemp("llama.cpp")
    shutil.copytree(builds.pinned_source().tree, repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    env = {**os.environ, **FIXED_DATES}

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "pinned llama.cpp")
    server = repo / "tools" / "server" / "server-context.cpp"
    text = server.read_text()
    assert text.count(RESTORE) == 1, "the pinned server's restore line moved; update the injected bug"
    server.write_text(text.replace(RESTORE, "/* injected: the checkpoint is not restored */"))
    git("commit", "-q", "-am", "server: skip the checkpoint restore")
    return repo


@pytest.fixture(scope="session")
def good_and_bad_servers(clone):
    """llama-server of the clone's two commits: (without the bug, with it)."""
    return tuple(str(builds.build(builds.git_source(clone, ref)).binary) for ref in ("HEAD~1", "HEAD"))
