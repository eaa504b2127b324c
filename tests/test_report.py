"""The HTML report: complete, self-contained, escaped, and seen in a real headless Chromium."""

import copy

import pytest
from clirun import cli

from harness.report import REPORT_NAME, RESULTS_NAME, write_report
from harness.report.html import render
from harness.results import read as read_results

EVIL = '<script>document.title="pwned"</script> "quotes" & \'apostrophes\''


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """A real run with a known failure: the seed conversation under no-restore on jamba."""
    d = tmp_path_factory.mktemp("report")
    p = cli("run", "-k", "seed or long-prompt",
                        "--model", "fixture:jamba", "--fault", "no-restore", "--report-dir", str(d))
    assert p.returncode == 1, p.stderr
    return d


def test_report_and_results_are_written_together(failing_run):
    doc = read_results(failing_run / RESULTS_NAME)
    html = (failing_run / REPORT_NAME).read_text()
    assert doc["status"] == "FAIL"
    assert "<svg class=\"plot\"" in html and "<svg class=\"timeline\"" in html
    assert "tok div" in html  # the first divergent token is marked
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside
    assert "cachecheck run" in html and "--fault no-restore" in html  # the replay command


def test_model_and_log_text_is_escaped(failing_run, tmp_path):
    doc = read_results(failing_run / RESULTS_NAME)
    evil = copy.deepcopy(doc)
    turn = next(t for r in evil["results"] for t in r["turns"] if t["status"] == "FAIL")
    turn["subject"]["pieces"][0] = EVIL
    turn["subject"]["text"] = EVIL
    turn["messages"] = [["user", EVIL]]
    turn["top_pieces"] = {k: EVIL for k in turn["top_pieces"]}
    evil["results"][0]["reason"] = EVIL
    html = render(evil)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html and "&#34;quotes&#34;" in html


def test_report_in_headless_chromium(failing_run, chromium):
    from selenium.webdriver.common.by import By

    driver = chromium
    driver.get((failing_run / REPORT_NAME).as_uri())
    assert "cachecheck report" in driver.title
    fail = driver.find_element(By.CSS_SELECTOR, "details.FAIL-case")
    assert fail.get_attribute("open") is not None
    for css in (".tok.div", "svg.plot polyline.dist", ".legend span.exact", "svg.timeline rect",
                "table.topk"):
        el = fail.find_element(By.CSS_SELECTOR, css)
        driver.execute_script("arguments[0].scrollIntoView()", el)
        size = el.size
        assert el.is_displayed() and size["width"] > 0, css  # a threshold line has no height
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    shot = failing_run / "report.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_interrupted_write_keeps_the_previous_report(failing_run, tmp_path, monkeypatch):
    doc = read_results(failing_run / RESULTS_NAME)
    write_report(doc, tmp_path)
    before = (tmp_path / REPORT_NAME).read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("harness.report.render", boom)
    with pytest.raises(KeyboardInterrupt):
        write_report(doc, tmp_path)
    assert (tmp_path / REPORT_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME, RESULTS_NAME]


def test_a_re_rendered_report_shows_the_thresholds_that_judged_it(failing_run):
    doc = read_results(failing_run / RESULTS_NAME)
    assert all(r["thresholds"]["max_dlogprob"] > 0 for r in doc["results"])  # recorded with every case
    for r in doc["results"]:
        r["thresholds"]["max_dlogprob"] = 0.123456  # as if calibrated differently back then
    html = render(doc)
    assert "hybrid: Δlogprob 0.123" in html
