"""Calibration on the real engine: clean runs measured, thresholds derived by the rule and written
beside what the file already holds (other kinds and server profiles are kept)."""

import argparse
import json
import shutil

from llama_cachecheck import calibrate, compare, noise


def test_calibrate_writes_the_rules_thresholds_and_keeps_the_rest(tmp_path, monkeypatch):
    file = tmp_path / "thresholds.json"
    shutil.copy(compare.THRESHOLDS_FILE, file)
    before = json.loads(file.read_text())
    monkeypatch.setattr(compare, "THRESHOLDS_FILE", file)
    args = argparse.Namespace(runs=1, threads=[1], model=["fixture:llama", "fixture:gemma3"], engine="inproc",
                              write=True)
    assert calibrate.main(args) == 0
    doc = json.loads(file.read_text())
    for kind in ("attention", "swa"):
        seen, th = doc["measured"][kind], doc["thresholds"][kind]
        assert seen["replies"] > 100  # the whole library ran, both sides compared
        for k, floor in noise.FLOOR.items():
            assert th[k] == max(noise.FACTOR * seen[k], floor)
        assert "--model fixture:llama --model fixture:gemma3 --write" in doc["runs"][kind]["how"]
    kept = {k: v for k, v in before["thresholds"].items() if k not in ("attention", "swa")}
    assert kept and all(doc["thresholds"][k] == v for k, v in kept.items())
