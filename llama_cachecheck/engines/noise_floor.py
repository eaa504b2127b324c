"""A model's noise floor on llama-server, measured on the spot from uncached repeats: the thresholds for a
model that has no calibration of its own for the profile judging it (a user's GGUF), and for a server someone
else started (its kernels and batch sizes cannot be read from outside).

The same prompts are processed in full, nothing cached, by the reference and by twins of it that hold the same
numbers otherwise: cut into other micro-batches; its cells after another slot's in a shared cache; a window
model's whole window kept (as the matched reference keeps it); and, for an attached server, that server itself,
uncached. Those are the differences a reply judged by the tolerance may stand on when nothing is wrong (its
prefix computed in other batches, beside other slots, in a ring the reference does not wrap); what they
disagree by is the noise. Measured through no cache at all, so that a cache bug of the build under test
cannot pass for noise."""

from __future__ import annotations

from .. import compare
from ..noise import UNCALIBRATED, Noise
from .base import Prompt, SessionSettings
from .capabilities import without_overridden
from .server_process import ServerProcess

# plain prose, ours: what a chat model reads, not a flat distribution over random ids
PASSAGES = (
    "The harbour was quiet in the early morning, and the fishing boats rocked gently against the pier while the "
    "gulls waited on the roofs of the sheds.",
    "To bake bread at home you need flour, water, salt and yeast; the dough must rest until it has doubled, and "
    "the oven should be as hot as it will go.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen, which is why forests and the "
    "plankton of the oceans matter so much to the air we breathe.",
    "She opened the old map on the kitchen table, weighed its corners down with two cups and a book, and traced "
    "the river north with her finger until it vanished into the hills.",
    "A good unit test checks one behaviour, runs in a fraction of a second, and fails with a message that tells "
    "the reader what went wrong without opening the code.",
    "In the winter of that year the snow came early, the roads to the village closed for a week, and the baker "
    "sold out of everything by nine each morning.",
)
LENGTHS = (80, 300, 600)  # tokens: within one micro-batch, across several, across the deployed default's 512
N_PREDICT = 24
TOP_K = 10  # as the scenarios' default sampling


def prompts(tokenize) -> list[list[int]]:  # tokenize: text -> ids
    """Two per length, the passages in two orders; every one starts as a conversation would (BOS)."""
    out = []
    for start in (0, 3):
        order = PASSAGES[start:] + PASSAGES[:start]
        ids = tokenize(" ".join(order * 8))
        out += [ids[:n] for n in LENGTHS]
    return out


def twins(caps, flags: list[str], n_ubatch: int, n_swa: int) -> list[tuple[str, list[str], int]]:  # caps: Capabilities
    """Each other arrangement: its name, the reference's command line for it, and the slot its prompts go to
    (with two slots, slot 0 holds a prompt first and they go to slot 1)."""
    n = n_ubatch // 3 + 1  # not a divisor of its own
    other = [("batches", ["-b", str(n), "-ub", str(n)])]
    unified = caps.first("--kv-unified", "-kvu")
    if unified:
        other.append(("cells", ["-np", "2", unified]))
    if n_swa and "--swa-full" in caps.options:
        other.append(("window", ["--swa-full"]))
    return [(name, without_overridden(caps, flags, o) + o, 1 if name == "cells" else 0) for name, o in other]


def measure(engine, settings: SessionSettings | None = None) -> dict[str, Noise]:  # engine: ServerEngine
    """The noise between the reference and each twin (and an attached subject, "server") over `prompts`."""
    started = engine.start_session(settings or SessionSettings())
    ids = prompts(lambda text: engine.tokenize(text, True))
    measured: dict[str, Noise] = {}

    def against(name: str, side, id_slot: int) -> None:
        noise = measured.setdefault(name, Noise())
        for p, ref in zip(ids, refs, strict=True):
            o = engine._request(side, Prompt(tokens=tuple(p)), N_PREDICT, TOP_K, cache=False, id_slot=id_slot)
            v = compare.compare(o.tokens, o.top, ref.tokens, ref.top, scored=None, thresholds=UNCALIBRATED)
            noise.add(v, o.top, ref.top)

    refs = [engine._request(engine.ref, Prompt(tokens=tuple(p)), N_PREDICT, TOP_K, cache=False) for p in ids]
    if engine.server_url:
        against("server", engine.subject, 0)
    for name, flags, slot in twins(engine.ref_caps, engine.ref_flags, started.n_ubatch, engine.info.n_swa):
        twin = ServerProcess(engine.reference_bin or engine.binary, engine.path, flags,
                             f"{engine.name} twin reference server", clock=engine.clock)
        try:
            twin.start()
            if slot:  # another conversation's cells first, at the start of the shared cache
                engine._request(twin, Prompt(tokens=tuple(ids[1])), 1, 0, cache=True, id_slot=0)
            against(name, twin, slot)
        finally:
            twin.close()
    return measured
