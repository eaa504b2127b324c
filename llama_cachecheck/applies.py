"""Whether a scenario can be played on an engine and a model, and if not the reason the report shows:
its memory kinds, the fault, the vocabulary, the chat template's features, a memory that cannot shift.
One place decides, for run, pytest, repro and the library's checks alike.
"""

from __future__ import annotations

from . import faults
from .engines.base import Unsupported
from .models import shifts_of
from .scenario import Scenario


def skip_reason(sc: Scenario, memory: str, fault: str | None) -> str:
    """Why a scenario is not played on a model of this memory kind ('' when it is): run and pytest alike."""
    if not sc.applies_to(memory):
        return f"needs {'/'.join(sc.requires)} memory"
    if not faults.applies(fault)(memory):
        return f"fault {fault} does not apply to {memory} memory"
    return ""


def ascii_check(sc: Scenario) -> None:
    """llama.cpp aborts on a character a fixture's vocabulary has no byte for: say so instead."""
    texts = [sc.tools] + [t for step in sc.steps for t in (
        getattr(step, "content", None), getattr(step, "text", None), getattr(step, "reasoning", None),
        getattr(step, "values", None), *(c.arguments for c in getattr(step, "tool_calls", ())))]
    for text in texts:
        if text and not text.isascii():
            bad = next(ch for ch in text if not ch.isascii())
            raise Unsupported(f"fixture vocabularies are ASCII-only (so every reply is valid UTF-8); the scenario "
                              f"has {bad!r} in {text[:40]!r}")


def template_gap(sc: Scenario, info) -> str:  # an engines.base.EngineInfo
    """What a scenario needs of the model's chat template that it does not render ('' when nothing)."""
    missing = [n.replace("var:", "variable ") for n in sc.template_needs if n not in info.template_features]
    if not missing:
        return ""
    template = f"llama.cpp's built-in {info.builtin_template!r} template" if info.builtin_template else \
        "the model's chat template"
    return f"{template} renders no {', '.join(missing)} (the scenario needs it)"


def shift_gap(sc: Scenario, info) -> str:  # an engines.base.EngineInfo
    """Why a scenario's cache_reuse cannot act on the model ('' when it can): its memory cannot shift."""
    if not sc.settings.cache_reuse or not info.path:  # a served model of no file of ours: the server says
        return ""
    shifts = shifts_of(info.path)
    if shifts == "always" or (shifts == "with swa_full" and sc.settings.swa_full):
        return ""
    how = "without swa_full" if shifts == "with swa_full" else "(llama_memory_can_shift is false, e.g. M-RoPE)"
    return f"cache_reuse needs memory that shifts cached positions; {info.memory} memory of {info.arch} " \
           f"cannot {how}: the server turns cache_reuse off"
