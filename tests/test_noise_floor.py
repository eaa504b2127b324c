"""A model with no calibration of its own for the server profile judging it (a user's GGUF) gets its noise floor
measured on the spot, from uncached repeats in two batch shapes (engines/noise_floor.py): printed, and named in
every reply's rule that the tolerance judged."""

from clirun import cli

from llama_cachecheck import compare, models, noise
from llama_cachecheck.engines.server import ServerEngine
from llama_cachecheck.models import info_of
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED


def test_a_users_gguf_is_judged_by_the_noise_floor_measured_on_the_spot(server_bin, tmp_path):
    gguf = models.resolve(["fixture:gemma3"])[0].path  # a GGUF given by its path: nobody calibrated it
    out = tmp_path / "r.json"
    # a window model whose slot outgrows its 32-token window: those replies are judged by the tolerance; its
    # noise floor: 6 prompts, each against three twins (other micro-batches, cells after a slot's, the window kept)
    p = cli("run", str(BUNDLED / "multi-turn-extend.yaml"), "--engine", "server", "--server-bin", server_bin,
            "--model", gguf, "--json", str(out), "--report-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"measuring the noise floor of {gguf} on server-deployed" in p.stderr
    said = {a: next(ln for ln in p.stderr.splitlines() if ln.startswith(f"  {a}: 6 replies, largest Δlogprob"))
            for a in ("batches", "cells", "window")}
    (r,) = read_results(out)["results"]
    th = r["thresholds"]
    assert th["source"] == f"server-deployed/{gguf}, measured on the spot"
    each = th["arrangements"]
    for a, line in said.items():
        assert f"thresholds Δlogprob {each[a]['max_dlogprob']:.3g}, KL {each[a]['max_kl']:.3g}" in line
    assert th["max_dlogprob"] == max(t["max_dlogprob"] for t in each.values())
    # the outgrown window: judged by what was measured for the way its reference differs, the window kept
    tolerated = [t["rule"] for t in r["turns"] if t["rule"] != "exact"]
    assert tolerated and all("thresholds for window: " in x for x in tolerated), tolerated
    assert "judged by: " in p.stdout and "measured on the spot" in p.stdout


def test_the_noise_floor_is_what_another_batching_moves_and_the_rule_applied_to_it(server_bin):
    path = models.resolve(["fixture:llama"])[0].path
    engine = ServerEngine(server_bin, path, "user.gguf", info_of(path), profile="isolated")
    try:
        each = engine.noise_floor()
    finally:
        engine.close()
    assert sorted(each) == ["batches", "cells"]  # no window to keep whole
    measured = each["batches"]
    assert measured.replies == 6  # two prompts per length
    th = measured.thresholds("here")
    assert th.max_dlogprob == max(noise.FACTOR * measured.max_dlogprob, noise.FLOOR["max_dlogprob"])
    assert th.max_kl == max(noise.FACTOR * measured.max_kl, noise.FLOOR["max_kl"])
    moved = max(measured.max_flipped_margin, measured.max_preference_shift)
    assert th.tie == max(noise.TIE_FACTOR * moved, 2 * noise.FLOOR["max_dlogprob"])
    assert isinstance(th, compare.Thresholds) and th.source == "here"
    both = noise.thresholds(each, "both")
    assert both.within(("cells",)).max_kl == each["cells"].thresholds("").max_kl
    assert both.max_kl == max(n.thresholds("").max_kl for n in each.values()) == both.within(()).max_kl
