"""The shape a results document is stored in (schema 4), and back.

A clean run repeats itself: the same reply on both sides, in every scenario that asks the same
prompt, the same system message in every turn of a conversation on every model, the same cache
events and settings. So the file holds each reply, message, event and settings block once, in a
table at its top, and the cases name them by their index. The top-k lists, most of the bytes,
are packed: the ids and the logprobs (in 1e-5 nats, the rounding of schema 3) as little-endian
int32 columns, each logprob after a position's first as its distance below the one before it
(small, and never negative), the bytes of all those numbers split into four planes (the high
ones are nearly all zero), deflated and in base64 after the mark "2:". Strings without the mark
(the first schema-4 files) are the columns alone. Nothing is lost: `expand(pack(doc)) == doc` for a document
whose logprobs are already rounded (tested), and `results.read` gives every reader the full shape.
"""

from __future__ import annotations

import base64
import json
import math
import zlib

import numpy as np

LOGPROB_DIGITS = 5  # 1e-5 nats: a hundredth of the tightest threshold; the distances are kept as computed
LOGPROB_UNIT = 10.0 ** -LOGPROB_DIGITS
TABLES = ("replies", "messages", "events", "settings", "thresholds")


class _Interned:
    """A table that hands out the index of a value, adding it the first time it is seen."""

    def __init__(self) -> None:
        self.rows: list = []
        self._index: dict[str, int] = {}

    def __call__(self, value) -> int:
        key = json.dumps(value, sort_keys=True, ensure_ascii=False)
        if key not in self._index:
            self._index[key] = len(self.rows)
            self.rows.append(value)
        return self._index[key]


def rounded(top: list | None) -> list | None:
    if top is None:
        return None
    return [[[tid, round(lp, LOGPROB_DIGITS)] for tid, lp in position] for position in top]


def pack_top(top: list | None) -> list | str | None:
    """Top-k lists as one packed string; a ragged or non-finite list stays a list (rare, small)."""
    if not top or len({len(p) for p in top}) != 1 or not top[0]:
        return rounded(top)
    lps = [lp for position in top for _, lp in position]
    if not all(math.isfinite(lp) and abs(lp) < 2e4 for lp in lps):
        return rounded(top)
    n, k = len(top), len(top[0])
    ids = np.array([[tid for tid, _ in position] for position in top], dtype="<i4")
    units = np.rint(np.array(lps) / LOGPROB_UNIT).astype("<i4").reshape(n, k)
    units[:, 1:] = units[:, :-1] - units[:, 1:]  # a list is sorted: each one below the one before
    numbers = np.concatenate([ids.T.ravel(), units.T.ravel()]).astype("<i4")  # columns deflate better
    planes = numbers.view(np.uint8).reshape(-1, 4).T.tobytes()
    return PLANES + base64.b64encode(zlib.compress(np.array([n, k], dtype="<i4").tobytes() + planes, 9)).decode()


PLANES = "2:"  # the mark of a packed list in byte planes (base64 has no colon)


def unpack_top(packed: list | str | None) -> list | None:
    if not isinstance(packed, str):
        return packed
    planar = packed.startswith(PLANES)
    body = zlib.decompress(base64.b64decode(packed.removeprefix(PLANES)))
    n, k = np.frombuffer(body[:8], dtype="<i4")
    if planar:
        numbers = np.frombuffer(body[8:], dtype=np.uint8).reshape(4, -1).T.copy().view("<i4").ravel()
        columns = numbers.reshape(2, k, n).copy()
        columns[1] = np.cumsum(np.concatenate([columns[1][:1], -columns[1][1:]]), axis=0)
    else:
        columns = np.frombuffer(body[8:], dtype="<i4").reshape(2, k, n)
    ids, units = columns[0].T.tolist(), columns[1].T.tolist()
    return [[[tid, round(u * LOGPROB_UNIT, LOGPROB_DIGITS)] for tid, u in zip(i, u_, strict=True)]
            for i, u_ in zip(ids, units, strict=True)]


def pack(doc: dict) -> dict:
    """The document as stored: tables first, then the cases naming their rows."""
    tables = {name: _Interned() for name in TABLES}
    results = [_pack_case(case, tables) for case in doc["results"]]
    return {**{k: v for k, v in doc.items() if k != "results"},
            **{name: t.rows for name, t in tables.items()}, "results": results}


def _pack_case(case: dict, tables: dict[str, _Interned]) -> dict:
    return {**case, **{field: tables[field](case[field]) for field in ("settings", "thresholds")},
            "turns": [_pack_turn(t, tables) for t in case["turns"]]}


def _pack_turn(turn: dict, tables: dict[str, _Interned]) -> dict:
    subject = tables["replies"]({**turn["subject"], "top": pack_top(turn["subject"]["top"])})
    same = turn["reference"] == turn["subject"]  # a clean run's every reply: packed (deflated) once
    sides = {"subject": subject, "reference": subject if same else
             tables["replies"]({**turn["reference"], "top": pack_top(turn["reference"]["top"])})}
    scored = turn["scored_top"]
    named = next((sides[s] for s in sides if scored and scored == turn[s]["top"]), None)
    return {**turn, **sides, "scored_top": pack_top(scored) if named is None else named,
            **{field: None if turn[field] is None else [tables[field](row) for row in turn[field]]
               for field in ("messages", "events")},
            **{field: _zeros(turn[field]) for field in ("distances", "kls")}}


def _zeros(values: list[float]) -> int | list[float]:
    """A reply judged identical has a distance of 0 at every position: stored as how many; else 0.0 as 0."""
    return len(values) if not any(values) else [0 if x == 0 else x for x in values]


def expand(doc: dict) -> dict:
    """A stored schema-4 document in the shape the code works with (every row in its place)."""
    tables = {name: doc.get(name) or [] for name in TABLES}
    replies = [{**r, "top": unpack_top(r["top"])} for r in tables["replies"]]
    cases = []
    for case in doc["results"]:
        turns = []
        for t in case.get("turns", []):
            scored = t["scored_top"]
            turns.append({**t, "subject": replies[t["subject"]], "reference": replies[t["reference"]],
                          "scored_top": replies[scored]["top"] if isinstance(scored, int) else unpack_top(scored),
                          **{field: None if t[field] is None else [tables[field][i] for i in t[field]]
                             for field in ("messages", "events")},
                          **{field: [0.0] * t[field] if isinstance(t[field], int) else [float(x) for x in t[field]]
                             for field in ("distances", "kls")}})
        cases.append({**case, **{field: tables[field][case[field]] for field in ("settings", "thresholds")},
                      "turns": turns})
    return {**{k: v for k, v in doc.items() if k not in TABLES}, "results": cases}
