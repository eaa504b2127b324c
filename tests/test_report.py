"""The HTML report: complete, self-contained, escaped, and seen in a real headless Chromium."""

import copy

import pytest
from clirun import cli

from llama_cachecheck.report import REPORT_NAME, RESULTS_NAME, write_report
from llama_cachecheck.report.html import render
from llama_cachecheck.results import read as read_results

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

    monkeypatch.setattr("llama_cachecheck.report.render", boom)
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


MODELS = [f"fixture:{n}" for n in ("llama", "gemma3", "mamba", "mamba2", "jamba", "nemotron_h", "granitehybrid",
                                   "lfm2", "qwen35", "falcon-h1", "gpt-oss")] + \
    ["gemma3-270m", "/home/someone/models/Qwen3-30B-A3B-Instruct-2507-UD-Q4_K_XL.gguf", "tiny.gguf"]
STATUSES = ["PASS", "PASS", "SKIP", "PASS", "LOST-REUSE", "PASS", "NOISE", "FAIL", "PASS", "ERROR"]


def wide(doc: dict, n_models: int, n_scenarios: int) -> dict:
    """The real run's cases spread over many models and scenarios (their turns left out: the grid is the point)."""
    out = copy.deepcopy(doc)
    names = [*MODELS, *(f"extra-model-{i}" for i in range(n_models))][:n_models]
    base = [{k: v for k, v in r.items() if k != "turns"} for r in doc["results"]]
    out["results"] = [{**base[0], "turns": [], "scenario": f"{base[0]['scenario']}-{i:02d}", "model": m,
                       "status": STATUSES[(i + j) % len(STATUSES)]}
                      for i in range(n_scenarios) for j, m in enumerate(names)]
    return out


def box(driver, el) -> dict:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom};", el)


@pytest.mark.parametrize("width", [1400, 1920])
def test_the_grid_of_fourteen_models_fits_the_window_and_keeps_its_header_in_view(failing_run, chromium, tmp_path,
                                                                                 width):
    from selenium.webdriver.common.by import By

    page = tmp_path / "wide.html"
    page.write_text(render(wide(read_results(failing_run / RESULTS_NAME), 14, 50)))
    chromium.set_window_size(width, 1000)
    chromium.get(page.as_uri())
    wrap = chromium.find_element(By.CSS_SELECTOR, ".grid-wrap")
    chromium.execute_script("arguments[0].scrollIntoView()", wrap)
    assert chromium.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", wrap)
    assert box(chromium, wrap)["right"] <= chromium.execute_script("return window.innerWidth")
    headers = wrap.find_elements(By.CSS_SELECTOR, "thead th")
    assert len(headers) == 15 and all(h.is_displayed() and h.size["width"] < 64 for h in headers[1:])
    first_row = wrap.find_element(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")
    chromium.execute_script("arguments[0].scrollTop = 600", wrap)
    top = box(chromium, wrap)["top"]
    assert abs(box(chromium, headers[3])["top"] - top) < 3  # the model names stay at the top of the grid
    assert box(chromium, first_row)["bottom"] < top  # while the rows under them scrolled away
    shot = tmp_path / f"grid-{width}.png"
    chromium.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_a_grid_wider_than_the_window_scrolls_with_the_scenario_names_held(failing_run, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "wider.html"
    page.write_text(render(wide(read_results(failing_run / RESULTS_NAME), 40, 10)))
    chromium.set_window_size(1400, 1000)
    chromium.get(page.as_uri())
    wrap = chromium.find_element(By.CSS_SELECTOR, ".grid-wrap")
    assert chromium.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", wrap)
    assert box(chromium, wrap)["right"] <= chromium.execute_script("return window.innerWidth")
    name = wrap.find_element(By.CSS_SELECTOR, "tbody tr td:first-child")
    left = box(chromium, wrap)["left"]
    chromium.execute_script("arguments[0].scrollLeft = 800", wrap)
    assert abs(box(chromium, name)["left"] - left) < 3 and name.is_displayed()
    assert [e for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
