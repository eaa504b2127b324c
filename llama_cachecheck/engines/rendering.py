"""Whether a subject that renders chats itself (an attached server, another --reference-bin) renders what the
scenario means: the reference processes the subject's tokens either way, and this says where they differ."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


class Rendering:
    """Whether a subject that renders chats itself renders what the scenario means: the model's template (as our
    reference renders it), and one prompt per conversation. Said once per run on stderr (an engine made again
    after an ERROR says nothing new), and with every reply it judges (its rule text); the comparison still holds,
    since the reference processes the subject's tokens."""

    said: set[str] = set()  # what this process printed already

    def __init__(self, template: str | None):
        self.template = f"the built-in {template!r} template" if template else "the GGUF's own template"
        self.seen: dict[tuple[int, ...], str] = {}  # a rendering -> the chat it came from
        self.note = ""
        self.checked = False

    def check(self, chat: dict, tokens: list[int], ours: Callable[[], list[int]]) -> str:
        key, prompt = json.dumps(chat.get("messages"), sort_keys=True), tuple(tokens)
        if len(self.seen) > 256:  # a soak's worth of prompts: the latest say as much
            self.seen.clear()
        if self.seen.setdefault(prompt, key) != key and "same prompt" not in self.note:
            self._say("the subject renders different conversations as the same prompt (its template leaves the "
                      "messages out)")
        if not self.checked:
            self.checked = True
            mine = ours()
            if mine != tokens:
                at = next((i for i, (a, b) in enumerate(zip(mine, tokens, strict=False)) if a != b),
                          min(len(mine), len(tokens)))
                self._say(f"the subject renders chats otherwise than {self.template} ({len(tokens)} tokens against "
                          f"{len(mine)}, first difference at token {at})")
        return self.note

    def _say(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text
        if text not in Rendering.said:
            Rendering.said.add(text)
            print(f"cachecheck: warning: {text}", file=sys.stderr)
