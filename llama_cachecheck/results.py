"""Results as JSON: what a CI job or the HTML report reads back."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from . import pins, stored
from .outcomes import ScenarioResult, TurnResult
from .processes import signals_deferred
from .status import InputError, Status, worst

SCHEMA = 4  # bumped when a results document changes shape; `read` expands the older shapes it still knows
READABLE = (2, 3, 4)  # 3: a reply identical on both sides stored once, top-k logprobs rounded; 4: `stored`


def _turn(t: TurnResult) -> dict:
    v = t.verdict
    return {
        "index": t.index, "step": t.step, "conversation": t.conversation, "slot": t.subject.slot,
        "status": v.status, "reason": v.reason,
        "messages": t.messages,
        "prompt_tokens": t.subject.prompt_length,
        "reused": t.subject.n_reused, "processed": t.subject.n_processed, "promised_reuse": v.promised_reuse,
        "events": t.subject.events,
        "subject": {"tokens": t.subject.tokens, "pieces": t.subject_pieces, "text": t.subject.text,
                    "top": t.subject.top},
        "reference": {"tokens": t.reference.tokens, "pieces": t.reference_pieces, "text": t.reference.text,
                      "top": t.reference.top},
        "teacher_forced": v.teacher_forced, "scored_top": t.scored, "rule": v.rule,
        "focus": t.focus, "top_pieces": {str(k): p for k, p in t.top_pieces.items()}, "violations": t.violations,
        "distances": v.distances, "kls": v.kls,
        "max_distance": v.max_distance, "max_kl": v.max_kl,
        "divergence": None if v.divergence is None else {
            "position": v.divergence.position, "subject": v.divergence.subject,
            "reference": v.divergence.reference, "reference_margin": v.divergence.reference_margin,
            "subject_margin": v.divergence.subject_margin, "noise": v.divergence.noise,
            "subject_blind": v.divergence.subject_blind},
    }


def result_dict(r: ScenarioResult) -> dict:
    bad = r.first_bad if r.status not in (Status.PASS, Status.SKIP) else None
    reused, total = r.reused
    return {
        "scenario": r.scenario.name, "path": str(r.scenario.path), "purpose": r.scenario.purpose,
        "model": r.model, "engine": r.engine, "memory": r.memory, "fault": r.fault, "build": r.build,
        "status": r.status, "reason": r.reason, "seconds": round(r.seconds, 3), "error_class": r.error_class,
        "first_divergence": None if bad is None or bad.verdict.divergence is None else {
            "turn": bad.index, "position": bad.verdict.divergence.position},
        "max_distance": r.max_distance, "reused_tokens": reused, "prompt_tokens": total,
        "settings": dataclasses.asdict(r.settings or r.scenario.settings), "replay": r.replay, "command": r.command,
        "thresholds": None if r.thresholds is None else asdict(r.thresholds),
        "turns": [_turn(t) for t in r.turns],
    }


def document(results: list[ScenarioResult], meta: dict) -> dict:
    return document_of([result_dict(r) for r in results], meta)


def document_of(cases: list[dict], meta: dict) -> dict:
    """The results document from cases already in their JSON shape (e.g. sent back by pytest-xdist workers)."""
    counts = {str(status): n for status, n in Counter(str(c["status"]) for c in cases).items()}
    under_test = sorted({c["build"] for c in cases if c["build"]})
    return {
        "schema": SCHEMA,
        "builds": under_test or ["(no engine started)"],
        "llama_cpp_python": pins.LLAMA_CPP_PYTHON_VERSION,  # the bindings of the in-process engine
        **meta, "status": headline([c["status"] for c in cases]), "counts": counts,
        "results": cases,
    }


def headline(statuses: list[str]) -> str:
    """The worst verdict; a SKIP is not one (PASS and SKIP read PASS), unless nothing else ran."""
    ran = [s for s in statuses if s != Status.SKIP]
    return str(worst(ran)) if ran or not statuses else str(Status.SKIP)


def write_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: a reader (or Ctrl-C) never sees half a file."""
    publish({path: text})


def publish(files: dict[Path, str]) -> None:
    """Write every file beside its place first, then rename them all: a full disk or a Ctrl-C while
    writing leaves all the old files, never a new results.json beside an old report.html."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            staged.append((tmp, path))
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        with signals_deferred():  # all renamed or none: a Ctrl-C or TERM waits for the last one
            for tmp, path in staged:
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def check_writable(path: Path, what: str) -> str | None:
    """Why `path` (a file to write, or with what == 'directory' a directory) cannot be written, or None."""
    target = path if what == "directory" else path.parent
    if what != "directory" and path.is_dir():
        return f"{path}: is a directory, not a file"
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path}: {probe} is not writable"
    return None


def write_json(path: Path, doc: dict) -> None:
    write_atomic(path, to_json(doc))


def to_json(doc: dict) -> str:
    """The document as written: each reply, message, event and settings block once (`stored`)."""
    return json.dumps({**stored.pack(doc), "schema": SCHEMA}, separators=(",", ":"), ensure_ascii=False)


def read(path: Path | str) -> dict:
    """A results file in the shape of the newest schema, or an InputError of one line saying why not."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a cachecheck results file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise InputError(f"{path}: not a cachecheck results file (no results)")
    if doc.get("schema") not in READABLE:
        raise InputError(f"{path}: results schema {doc.get('schema', 1)}, this cachecheck reads schemas "
                         f"{', '.join(map(str, READABLE))} (re-run it with this version)")
    try:
        return {**_expanded(doc), "schema": SCHEMA}
    except (KeyError, IndexError, TypeError, ValueError, zlib.error) as e:  # binascii.Error is a ValueError
        raise InputError(f"{path}: a damaged results file of schema {doc['schema']} ({type(e).__name__}: {e})") \
            from None


def _expanded(doc: dict) -> dict:
    if doc["schema"] == 4:
        return stored.expand(doc)
    for case in doc["results"]:  # schemas 2 and 3: every row in place, a reply named "subject" when identical
        for turn in case.get("turns", []):
            if turn.get("reference") == "subject":
                turn["reference"] = turn["subject"]
            if turn.get("scored_top") in ("subject", "reference"):
                turn["scored_top"] = turn[turn["scored_top"]]["top"]
    return doc
