"""Token streams and logprobs in, a verdict out: PASS / NOISE / LOST-REUSE / FAIL.

Where the reference replayed the subject's decode calls (in-process), the rule is `EXACT`: any
difference at all is a FAIL. Elsewhere (llama-server, `--tolerance calibrated`, the one named
sliding-window case) the rule is vLLM's `check_logprobs_close`, sharpened by teacher forcing: walk both greedy
streams; at the first divergence it is NOISE only if each side preferred its own token over
the other's by no more than what float noise can flip (the tie margin); else FAIL. Where a
token is not in a side's top-k its logprob there is at most the k-th, which bounds that
side's preference from below: vLLM's "each token in the other's top-k", without calling a
flip on a flat distribution (a real model on a random prompt) a failure for its list's cut.
With the reference's scores of the subject's own tokens we also have a distance at every
position, and a distance above the calibrated threshold is a FAIL even when the greedy
tokens happen to agree. Pure functions: no engine, no I/O beyond reading thresholds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .reproducer import preference, topk_distance  # the distance rule's home: a reproducer carries it as is
from .status import Status

TopK = list[tuple[int, float]]
THRESHOLDS_FILE = Path(__file__).with_name("thresholds.json")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Thresholds:
    max_dlogprob: float  # largest per-position |Δlogprob| that is still float noise
    max_kl: float
    tie: float | None = None  # largest reference top-1/top-2 margin a clean run was seen to flip
    source: str = field(default="", compare=False)  # the calibration entry: attention, server-deployed/hybrid, ...
    # measured per way a reference's numbers may be arranged otherwise than the subject's (engines/noise_floor.py:
    # batches, cells, window); the fields above are the largest of them
    arrangements: dict[str, Thresholds] | None = field(default=None, compare=False)

    @property
    def tie_margin(self) -> float:
        # measured where clean runs flipped; else: a perturbation of size d flips tokens closer than 2d
        return self.tie if self.tie is not None else 2 * self.max_dlogprob

    def within(self, arrangements: tuple[str, ...]) -> Thresholds:
        """The thresholds for a reply whose reference differs from the subject in just these ways; all of them
        where that is not known, or not measured."""
        if not arrangements or not self.arrangements or any(a not in self.arrangements for a in arrangements):
            return self
        each = [self.arrangements[a] for a in arrangements]
        return Thresholds(max(t.max_dlogprob for t in each), max(t.max_kl for t in each),
                          max(t.tie_margin for t in each), f"{self.source} ({' and '.join(arrangements)})")


DEFAULT_THRESHOLDS = Thresholds(max_dlogprob=0.05, max_kl=0.01)
EXACT = Thresholds(max_dlogprob=0.0, max_kl=0.0, tie=0.0)  # a reference that replayed the subject's decode calls


def thresholds_for(table: dict[str, Thresholds], model: str, memory: str, profile: str = "") -> Thresholds:
    """The engine profile's own calibration first (a server profile's kernels have noise of their own,
    e.g. flash attention), then a real model's, else its memory kind's (from the fixtures)."""
    keys = ([f"{profile}/{model}", f"{profile}/{memory}"] if profile else []) + [model, memory]
    return next((table[k] for k in keys if k in table), DEFAULT_THRESHOLDS)


def load_thresholds(path: Path = THRESHOLDS_FILE) -> dict[str, Thresholds]:
    """Per memory kind (fixtures) and per real model, as written by `cachecheck calibrate`."""
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())

    def made(v: dict, source: str) -> Thresholds:
        each = {a: made(t, a) for a, t in v.get("arrangements", {}).items()} or None
        return Thresholds(v["max_dlogprob"], v["max_kl"], v.get("tie"), source, each)
    return {kind: made(v, kind) for kind, v in doc["thresholds"].items()}


@dataclass
class Divergence:
    position: int
    subject: tuple[int, float] | None  # (token, its logprob) on the subject side; None: stopped
    reference: tuple[int, float] | None
    reference_margin: float  # how much the reference prefers its token over the subject's (at least)
    noise: bool
    subject_margin: float = math.inf  # how much the subject prefers its token over the reference's (at least)
    subject_blind: bool = False  # the subject reported no probabilities there (a drafted token, speculation)


@dataclass
class Verdict:
    status: str
    reason: str
    divergence: Divergence | None
    distances: list[float] = field(default_factory=list)  # max |Δlogprob| per position
    kls: list[float] = field(default_factory=list)
    teacher_forced: bool = True
    n_reused: int = 0
    promised_reuse: int = 0
    rule: str = ""  # "exact", or the calibrated tolerance and why exactness could not hold

    @property
    def max_distance(self) -> float:
        return max(self.distances, default=0.0)

    @property
    def max_kl(self) -> float:
        return max(self.kls, default=0.0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["max_distance"] = self.max_distance
        d["max_kl"] = self.max_kl
        return d


def _first_divergence(sub_tokens: list[int], sub_top: list[TopK], ref_tokens: list[int],
                      ref_top: list[TopK], th: Thresholds) -> Divergence | None:
    d = common_prefix(sub_tokens, ref_tokens)
    if d == len(sub_tokens) == len(ref_tokens):
        return None
    s = (sub_tokens[d], dict(sub_top[d]).get(sub_tokens[d], math.nan)) if d < len(sub_tokens) else None
    r = (ref_tokens[d], dict(ref_top[d]).get(ref_tokens[d], math.nan)) if d < len(ref_tokens) else None
    if s is None or r is None:  # one side ended its reply where the other went on
        return Divergence(d, s, r, math.inf, False)
    ref_pref = preference(ref_top[d], r[0], s[0])
    if d < len(sub_top) and not sub_top[d] and ref_top[d]:
        # nothing to weigh on the subject's side (a server that reports no probabilities for speculated
        # tokens): the reference's own margin is all there is; said so in the verdict
        return Divergence(d, s, r, ref_pref, ref_pref <= th.tie_margin, math.inf, subject_blind=True)
    sub_pref = preference(sub_top[d], s[0], r[0])
    noise = max(ref_pref, sub_pref) <= th.tie_margin
    return Divergence(d, s, r, ref_pref, noise, sub_pref)


def compare(sub_tokens: list[int], sub_top: list[TopK], ref_tokens: list[int], ref_top: list[TopK], *,
            scored: list[TopK] | None, thresholds: Thresholds) -> Verdict:
    """The verdict on one generated reply's answer: subject vs the full re-process of the same prompt.

    Reuse is judged apart (`judge_reuse`): it can only turn a right answer into LOST-REUSE.
    """
    th = thresholds
    div = _first_divergence(sub_tokens, sub_top, ref_tokens, ref_top, th)
    if scored is not None:  # teacher forcing: same context at every subject position
        pairs = list(zip(sub_top, scored, strict=False))
    else:  # only positions where both sides have seen the same tokens
        upto = div.position + 1 if div else len(sub_top)
        pairs = list(zip(sub_top[:upto], ref_top[:upto], strict=False))
    dist = [topk_distance(a, b) for a, b in pairs]
    v = Verdict(Status.PASS, "", div, [d for d, _ in dist], [k for _, k in dist], scored is not None)
    worst_pos = max(range(len(v.distances)), key=v.distances.__getitem__, default=0)
    if div is not None and not div.noise:
        v.status = Status.FAIL
        v.reason = (f"tokens diverge at position {div.position}: subject {_tok(div.subject)} vs "
                    f"reference {_tok(div.reference)} ({_prefs(div)}; tie margin {th.tie_margin:.3g})")
    elif th == EXACT and (v.max_distance > 0 or v.max_kl > 0):
        first = next(i for i, (d, k) in enumerate(dist) if d > 0 or k > 0)
        sub, ref = pairs[first]
        v.status = Status.FAIL
        v.reason = (f"logprobs differ at position {first} by {v.distances[first]:.3g} (exact comparison: the reference "
                    f"made the subject's decode calls); subject top {_topk(sub)} vs reference top {_topk(ref)}")
    elif v.max_distance > th.max_dlogprob or v.max_kl > th.max_kl:
        v.status = Status.FAIL
        v.reason = (f"logprobs differ by {v.max_distance:.3g} (KL {v.max_kl:.3g}) at position {worst_pos}; "
                    f"thresholds {th.max_dlogprob:.3g} / {th.max_kl:.3g}")
        if div is not None:
            v.reason += (f"; the tokens split at position {div.position} (subject {_tok(div.subject)} vs "
                         f"reference {_tok(div.reference)})")
    elif div is not None:
        v.status = Status.NOISE
        v.reason = (f"near-tie at position {div.position}: {_prefs(div)}, "
                    f"{'its margin' if div.subject_blind else 'both'} within the tie margin {th.tie_margin:.3g}")
    return v


def judge_reuse(v: Verdict, n_reused: int, promised: int, why: str = "") -> None:
    """A right answer (PASS or NOISE) from fewer reused tokens than the policy promises is LOST-REUSE
    (`why`: what the promise stands on, promise.Pledge)."""
    v.n_reused, v.promised_reuse = n_reused, promised
    if v.status in (Status.PASS, Status.NOISE) and n_reused < promised:
        v.status = Status.LOST_REUSE
        v.reason = f"reused {n_reused} prompt tokens, the policy promises at least {promised}" + \
            (f" ({why})" if why else "")


def judge_engagement(v: Verdict, n_reused: int, promised: int, why: str = "") -> None:
    """judge_reuse for a server whose design is unknown: any reuse keeps the promise (promise.py)."""
    judge_reuse(v, n_reused, promised, why)
    if v.status == Status.LOST_REUSE:
        v.reason = NOT_ENGAGED


def judge_invariants(v: Verdict, broken: list[str]) -> None:
    """A cache step that broke the checkpoint design is a FAIL, even where this reply came out right."""
    if broken:
        said = "cache invariant broken: " + "; ".join(broken)
        v.reason = f"{said}; {v.reason}" if v.reason else said
        v.status = Status.FAIL


def _topk(top: TopK, n: int = 3) -> str:
    """Every digit: an exact comparison's difference may sit in the last one."""
    return "[" + ", ".join(f"{t}: {lp!r}" for t, lp in top[:n]) + "]"


def _prefs(d: Divergence) -> str:
    if d.subject_blind:
        return (f"the reference prefers its token by {_nats(d.reference_margin)}, the subject reported no "
                f"probabilities there")
    return (f"the reference prefers its token by {_nats(d.reference_margin)}, "
            f"the subject its own by {_nats(d.subject_margin)}")


def _nats(x: float) -> str:
    return "more than its top-k shows" if math.isinf(x) else f"{x:.3g}"


def _tok(t: tuple[int, float] | None) -> str:
    return "end of reply" if t is None else f"{t[0]} (logprob {t[1]:.3f})"


NEAR_END = 4  # llama.cpp PR 20288: a prompt's checkpoints 4 and 4 + n_ubatch tokens before its end


def near_end_points(total: int, n_batch: int, n_ubatch: int) -> list[int]:
    """Where the server ends a batch near the end of a `total`-token prompt to save checkpoints there.

    One definition for the policy (where it stops) and for the promise judged here."""
    return [total - min(n_batch, off) for off in (NEAR_END + n_ubatch, NEAR_END)]


def shifts_chunks(memory: str) -> bool:
    """--cache-reuse's design: attention cells (and an SWA cache as large as the full one) move to their new
    positions; recurrent state cannot drop a chunk from its middle, so there nothing shifts and the truth stays
    a full re-process."""
    return memory in ("attention", "swa")


def reused_chunks(held: list[int], prompt: list[int], n_min: int) -> list[tuple[int, int, int]]:
    """The chunks --cache-reuse shifts into place, as (from, to, length): after the common prefix, each run of
    at least `n_min` tokens of `held` that the prompt continues with at its head, in order (the pinned server's
    loop, server-context.cpp: "reusing chunk with size")."""
    out = []
    head_c = head_p = common_prefix(held, prompt)
    while head_c < len(held) and head_p < len(prompt):
        run = 0
        while head_c + run < len(held) and head_p + run < len(prompt) and held[head_c + run] == prompt[head_p + run]:
            run += 1
        if run >= n_min:
            out.append((head_c, head_p, run))
            head_c, head_p = head_c + run, head_p + run
        else:
            head_c += 1
    return out


NOT_ENGAGED = "cache not engaged: the server reports 0 cached tokens for a prompt that continues the last one"
