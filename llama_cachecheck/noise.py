"""How far clean numbers stray, and the tolerance a safe factor above it: one rule for the thresholds
`cachecheck calibrate` writes and for those measured on the spot (engines/noise_floor.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from . import compare
from .reproducer import TopK

FACTOR = 5.0  # threshold = FACTOR x the largest clean distance ...
FLOOR = {"max_dlogprob": 0.01, "max_kl": 1e-4}  # ... but never below these
TIE_FACTOR = 2.0  # tie margin = TIE_FACTOR x the most a clean reply moved a preference between two tokens
LIKELY = -4.0  # logprob: tokens a greedy choice can split between (a flip needs two of them near each other)
RULE = f"threshold = max({FACTOR} x largest clean distance, floor {FLOOR})"
UNCALIBRATED = compare.Thresholds(1e9, 1e9)  # while measuring: only a token split can make a verdict


@dataclass
class Noise:
    """The largest distances of clean replies: only noise can have made them."""

    max_dlogprob: float = 0.0
    max_kl: float = 0.0
    replies: int = 0
    flips: int = 0
    max_flipped_margin: float = 0.0
    # the most a preference between two likely tokens moved: what tips a near-tie; the tail of a peaked
    # distribution moves further (max_dlogprob), but no greedy choice splits there
    max_preference_shift: float = 0.0

    def add(self, v: compare.Verdict, sub_top: list[TopK], ref_top: list[TopK]) -> None:
        self.max_dlogprob = max(self.max_dlogprob, v.max_distance)
        self.max_kl = max(self.max_kl, v.max_kl)
        self.replies += 1
        d = v.divergence
        if d is not None and d.subject is not None and d.reference is not None:
            self.flips += 1  # a clean reply's tokens split: a near-tie the noise tipped
            self.max_flipped_margin = max(self.max_flipped_margin, d.reference_margin, d.subject_margin)
        upto = d.position + 1 if d is not None else len(ref_top)  # past a split the contexts differ
        for a, b in zip(sub_top[:upto], ref_top[:upto], strict=False):
            self.max_preference_shift = max(self.max_preference_shift, preference_shift(a, b))

    def merge(self, other: Noise) -> None:
        self.max_dlogprob, self.max_kl = max(self.max_dlogprob, other.max_dlogprob), max(self.max_kl, other.max_kl)
        self.replies, self.flips = self.replies + other.replies, self.flips + other.flips
        self.max_flipped_margin = max(self.max_flipped_margin, other.max_flipped_margin)
        self.max_preference_shift = max(self.max_preference_shift, other.max_preference_shift)

    def limits(self) -> dict[str, float]:
        """The thresholds as thresholds.json holds them. The tie margin: what moved a preference (a flip, or
        two likely tokens), never below what the Δlogprob floor allows (Thresholds' own rule, twice it)."""
        th = {k: max(FACTOR * getattr(self, k), floor) for k, floor in FLOOR.items()}
        th["tie"] = max(TIE_FACTOR * max(self.max_flipped_margin, self.max_preference_shift),
                        2 * FLOOR["max_dlogprob"])
        return th

    def thresholds(self, source: str) -> compare.Thresholds:
        th = self.limits()
        return compare.Thresholds(th["max_dlogprob"], th["max_kl"], th.get("tie"), source)

    def said(self) -> str:
        return (f"{self.replies} replies, largest Δlogprob {self.max_dlogprob:.3g}, KL {self.max_kl:.3g}, "
                f"preference moved {self.max_preference_shift:.3g}, {self.flips} flipped near-ties"
                + (f" (margin up to {self.max_flipped_margin:.3g})" if self.flips else ""))

    def as_dict(self) -> dict:
        return asdict(self)


def merged(measured: dict[str, Noise]) -> Noise:
    """Every arrangement's noise as one (engines/noise_floor.py): for a reply that may stand on any."""
    every = Noise()
    for n in measured.values():
        every.merge(n)
    return every


def thresholds(measured: dict[str, Noise], source: str) -> compare.Thresholds:
    every = merged(measured).thresholds(source)
    return replace(every, arrangements={a: n.thresholds(a) for a, n in measured.items()})


def limits(measured: dict[str, Noise]) -> dict:
    """As thresholds.json holds them: the largest, then each arrangement's."""
    return {**merged(measured).limits(), "arrangements": {a: n.limits() for a, n in measured.items()}}


def preference_shift(a: TopK, b: TopK) -> float:
    """How far one side moved the preference between two tokens both sides list and `b` finds likely: the
    spread of their logprob differences."""
    da, db = dict(a), dict(b)
    moved = [da[t] - lp for t, lp in db.items() if lp >= LIKELY and t in da]
    return max(moved) - min(moved) if len(moved) > 1 else 0.0
