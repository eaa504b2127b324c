#!/usr/bin/env python3
"""A cachecheck finding, reproduced with nothing but a llama-server binary and Python's standard library.

    python3 repro.py [LLAMA_SERVER] [--tries N]   (default: $LLAMA_SERVER, else llama-server on the PATH)
    python3 repro.py                              (a llama-cpp-python case: the llama_cpp this python imports)

`cachecheck repro` copies this file as repro.py beside case.json (what the server was started with and
sent, in order, and what shows the bug) and the model. It starts the server as the case's subject ran,
sends the same requests (a parallel block at once, from threads; slot saves and restores in a
directory of its own), and decides: a crash is the server dying (its abort line is printed); a wrong
answer is the judged reply against a second server of the same build with every cache off, fed the
same token ids, compared token by token and then by top-k logprobs (the thresholds the case was judged
with); lost reuse is `timings.cache_n` against what the checkpoint design promises, with the reason.
It prints one line and exits 1 when the bug shows, 0 when it does not, 2 when it cannot tell. A case
whose requests go at once may need the server to take them up in one order: it is tried up to N times
(case.json says how many by default), each on a fresh server.

Inside cachecheck this module is also the home of the distance rule (compare.py imports it) and of what
an aborted llama.cpp said (abort_line: the engines import it), so the reproducer and the harness cannot
judge a reply or name a crash differently, and of how a llama-cpp-python `Llama` is asked and read
(lcp_ask: engines/lcp.py calls it), so the reproducer asks it as the engine did.

A llama-cpp-python case (case.json's engine) needs that package instead of a server: the subject is a
`Llama` with the case's prompt cache, the reference a second one that forgets its context before the
judged prompt.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TopK = list  # [(token, logprob), ...] best first


def topk_distance(sub: TopK, ref: TopK) -> tuple[float, float]:
    """max |Δlogprob| over the union of both top-k lists, and KL(ref || sub) over ref's top-k.

    A token missing from one side's top-k has at most that side's k-th logprob there, so it
    counts only by how far it stands above that bound on the other side: the distance is
    never overstated (on a flat distribution the lists differ in membership by noise alone).
    """
    if sub == ref:  # the usual case in exact mode: same tokens, same logprobs, same order
        return 0.0, 0.0
    s, r = dict(sub), dict(ref)
    if not s or not r:  # the engine gave no logprobs for this position
        return 0.0, 0.0
    fs, fr = min(s.values()), min(r.values())

    def gap(t: int) -> float:
        if t in s and t in r:
            return abs(s[t] - r[t])
        return max(s[t] - fr, 0.0) if t in s else max(r[t] - fs, 0.0)

    dmax = max(gap(t) for t in s.keys() | r.keys())
    ids = list(r)
    p = [math.exp(r[t]) for t in ids]
    q = [math.exp(s.get(t, fs)) for t in ids]
    zp, zq = sum(p), sum(q)
    kl = sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q, strict=True) if pi > 0)
    return dmax, max(kl, 0.0)


def preference(top: TopK, mine: int, other: int) -> float:
    """How much this side prefers `mine` over `other`: exact when both are in its top-k, else a
    lower bound (a token outside the list has at most the list's last logprob)."""
    lp = dict(top)
    if mine not in lp:  # no logprobs at all, or an engine list that skipped it: nothing to go by
        return math.inf
    return lp[mine] - lp.get(other, min(lp.values()))


# ggml_abort prints "FILE:LINE: MESSAGE" (GGML_ASSERT's is "FILE:LINE: GGML_ASSERT(cond) failed"); a C++
# exception that nobody caught ends in "terminate called after throwing an instance of 'T'" and "  what():  ..."
_ABORT = re.compile(r"(?:^|[\s/])([\w.+\-]+\.(?:cpp|cc|c|h|cu|m)):(\d+): (\S.*)$")
_TERMINATE = re.compile(r"terminate called after throwing an instance of '([^']+)'")
_WHAT = re.compile(r"what\(\):\s*(.*)$")


def abort_line(log: str) -> str | None:
    """What a llama.cpp process that aborted said of why: its first abort line, the source file (without its
    directory) and line with the message, or the uncaught exception and its what(); None if it said neither."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if (m := _ABORT.search(line.strip())) is not None:
            return f"{m.group(1)}:{m.group(2)}: {m.group(3).strip()}"
        if (m := _TERMINATE.search(line)) is not None:
            what = next((w.group(1).strip() for w in map(_WHAT.search, lines[i + 1:i + 3]) if w), "")
            return f"uncaught {m.group(1)}" + (f": {what}" if what else "")
    return None


# the script ------------------------------------------------------------------------------------

def lcp_ask(ll, llm, step: dict, top_of) -> dict:
    """One request to a llama-cpp-python `Llama` as its users send it (create_completion for token ids,
    create_chat_completion for messages), read where `generate` decides: what it kept of its context (its
    first eval starts after it), the ids it sampled and, at each, the top-k of the logits it sampled from
    (`top_of(logits pointer, n_vocab)`)."""
    ids: list[int] = []
    tops: list[TopK] = []
    seen: dict = {}
    eval_, sample = llm.eval, llm.sample
    n_vocab = llm.n_vocab()

    def first_eval(tokens):
        if not seen:
            seen.update(reused=llm.n_tokens, prompt=[int(t) for t in llm._input_ids[:llm.n_tokens]] +
                        [int(t) for t in tokens])
        return eval_(tokens)

    def sampled(*args, **kwargs):
        top = top_of(ll.llama_get_logits_ith(llm._ctx.ctx, -1), n_vocab)
        token = sample(*args, **kwargs)
        ids.append(int(token))
        tops.append(top)
        return token

    llm.eval, llm.sample = first_eval, sampled
    try:
        if step.get("tokens") is not None:
            said = llm.create_completion(prompt=list(step["tokens"]), max_tokens=step["max_tokens"], temperature=0.0)
            text = said["choices"][0]["text"]
        else:
            options = {"tools": step["tools"]} if step.get("tools") else {}
            said = llm.create_chat_completion(messages=step["messages"], max_tokens=step["max_tokens"],
                                              temperature=0.0, **options)
            text = said["choices"][0]["message"].get("content") or ""
    finally:
        del llm.eval, llm.sample  # the class's own again
    return {"ids": ids, "tops": tops, "text": text, "reused": seen.get("reused", 0), "prompt": seen.get("prompt", []),
            "finish": said["choices"][0].get("finish_reason")}


def _top_of(logits, n_vocab: int, k: int = 10) -> TopK:
    """The k best of a logits row in pure Python (the fixtures' vocabularies are small)."""
    row = [logits[i] for i in range(n_vocab)]
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    best = sorted(range(n_vocab), key=lambda i: (-row[i], i))[:k]
    return [(i, row[i] - log_z) for i in best]


def split(st: list[int], stop: list[TopK], rt: list[int], rtop: list[TopK], *, who: str) -> str:
    """Why a cached reply is not the full re-process's ('' where it is, within the case's thresholds)."""
    th = CASE["thresholds"]
    d = next((i for i, (a, b) in enumerate(zip(st, rt, strict=False)) if a != b), min(len(st), len(rt)))
    if d < min(len(st), len(rt)):
        margin = max(preference(rtop[d], rt[d], st[d]), preference(stop[d], st[d], rt[d]))
        if margin > th["tie"]:
            return (f"the replies split at token {d} of {len(rt)}: the cached {who} says {st[d]}, a full re-process "
                    f"says {rt[d]} (preferred by {margin:.3g} nats; near-ties up to {th['tie']:.3g} count as noise)")
    elif len(st) != len(rt):
        return f"one reply ends at token {d}: the cached {who}'s has {len(st)} tokens, a full re-process's {len(rt)}"
    dist = [topk_distance(a, b) for a, b in zip(stop[:d + 1], rtop[:d + 1], strict=False)]
    dmax, kl = max((x for x, _ in dist), default=0.0), max((y for _, y in dist), default=0.0)
    if dmax > th["max_dlogprob"] or kl > th["max_kl"]:
        return (f"the logprobs differ by {dmax:.3g} nats (KL {kl:.3g}) from a full re-process's; thresholds "
                f"{th['max_dlogprob']:.3g} / {th['max_kl']:.3g}")
    return ""


def play_lcp() -> None:
    """A llama-cpp-python case: the subject Llama with its prompt cache, every request in order."""
    try:
        import llama_cpp
    except ImportError:
        say("CANNOT TELL", "this python cannot import llama_cpp (pip install llama-cpp-python=="
            f"{CASE['lcp']['version']})", 2)
    lcp = CASE["lcp"]

    def made():
        import inspect

        known = inspect.signature(llama_cpp.Llama.__init__).parameters  # an older release takes fewer settings
        return llama_cpp.Llama(model_path=str(HERE / CASE["model"]), verbose=False,
                               **{k: v for k, v in lcp["settings"].items() if k in known})

    version = getattr(llama_cpp, "__version__", "?")
    subject, reference = made(), None
    if lcp["cache"] == "ram":
        subject.set_cache(llama_cpp.LlamaRAMCache())
    elif lcp["cache"] == "disk":
        subject.set_cache(llama_cpp.LlamaDiskCache(cache_dir=str(HERE / "lcp-cache")))
    for i, step in enumerate(CASE["steps"], 1):
        judge = step.get("judge")
        try:
            got = lcp_ask(llama_cpp, subject, step, _top_of)
        except Exception as e:  # noqa: BLE001 - what the library raised is the finding where the case is an error
            if judge is None and CASE["status"] != "ERROR":
                say("CANNOT TELL", f"request {i}: llama-cpp-python {version} raised {type(e).__name__}: {e}", 2)
            reference = reference or made()
            reference.reset()
            try:
                lcp_ask(llama_cpp, reference, step, _top_of)  # a full re-process of the same request answers
            except Exception as again:  # noqa: BLE001
                say("CANNOT TELL", f"request {i}: a full re-process raised too ({type(again).__name__}: {again})", 2)
            say("BUG", f"request {i}: llama-cpp-python {version} raised {type(e).__name__}: {e}, where a full "
                "re-process of the same request answers", 1)
        if judge is None:
            continue
        if judge["kind"] == "reuse":
            if got["reused"] < judge["promised"]:
                say("BUG", f"lost reuse at request {i}: llama-cpp-python {version} reused {got['reused']} prompt "
                    f"tokens where the design promises at least {judge['promised']}"
                    + (f" ({judge['why']})" if judge.get("why") else ""), 1)
            continue
        reference = reference or made()
        reference.reset()  # nothing of the last prompt is matched: a full re-process
        want = lcp_ask(llama_cpp, reference, step, _top_of)
        why = split(got["ids"], got["tops"], want["ids"], want["tops"], who=f"llama-cpp-python {version}")
        if why:
            say("BUG", f"wrong answer at request {i}: {why}", 1)
    say("NOT REPRODUCED", f"{CASE['title']}: every request answered as the design says on llama-cpp-python "
        f"{version}", 0)


HERE = Path(__file__).resolve().parent


TRY = [""]  # which try this is, where there are several


def say(verdict: str, text: str, code: int) -> None:
    print(f"{verdict}{TRY[0] if code == 1 else ''}: {text}")
    sys.exit(code)


class Server:
    """One llama-server of ours: a free loopback port, its log in this directory, always stopped."""

    def __init__(self, binary: str, args: list[str], name: str):
        self.name, self.log = name, HERE / f"{name}.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [str(HERE / a) if a.endswith(".gguf") and (HERE / a).is_file() else a for a in args]  # a draft model
        cmd = [binary, "-m", str(HERE / CASE["model"]), "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.02)
        self.stop()
        say("CANNOT TELL", f"the {name} llama-server did not start: {self.said() or 'see ' + str(self.log)}", 2)

    def said(self) -> str:
        """Its abort line (abort_line), or the argument it refused (another build's flags), or its last line."""
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        refused = [ln.strip() for ln in log.splitlines() if re.search(r"error while handling argument|"
                                                                       r"invalid argument|unknown argument", ln)]
        return abort_line(log) or (refused or log.strip().splitlines() or [""])[0 if refused else -1].strip()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"error": e.code, "text": e.read().decode(errors="replace")[:300]}
        except (OSError, urllib.error.URLError) as e:  # it died under the request, or will in a moment
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
            return {"error": type(e).__name__, "path": path}

    def check_alive(self, path: str) -> None:
        code = self.proc.poll()
        if code is not None:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            say("BUG", f"the server died ({how}) during {path}: {self.said() or 'no abort line'}"
                + (f" (the case's: {CASE['abort']})" if CASE.get("abort") else ""), 1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def reply(body: dict) -> tuple[list[int], list[TopK], int]:
    """(tokens, top-k per token, prompt tokens reused) of a /completion or a chat completion answer."""
    if "choices" in body:
        probs = (body["choices"][0].get("logprobs") or {}).get("content") or []
        tokens = [p["id"] for p in probs]
    else:
        probs = body.get("completion_probabilities", [])
        tokens = body.get("tokens") or [p["id"] for p in probs]
    by_id = {p["id"]: p for p in probs}
    top = [[(t["id"], float(t["logprob"])) for t in by_id[tok]["top_logprobs"]] if tok in by_id else []
           for tok in tokens]
    return tokens, top, int(body.get("timings", {}).get("cache_n", 0))


def wrong_answer(step: dict, got: dict, binary: str) -> str:
    """Why the subject's reply is not the full re-process's ('' where it is, within the case's thresholds)."""
    ref = Server(binary, CASE["reference_args"], "reference")
    try:
        body = step["body"]
        n = body.get("n_predict", body.get("max_tokens"))
        k = body.get("n_probs", body.get("top_logprobs", 10))
        want = ref.post("/completion", {"prompt": step["tokens"], "n_predict": n, "n_probs": k, "cache_prompt": False,
                                        "temperature": 0.0, "seed": 0, "id_slot": 0, "return_tokens": True})
    finally:
        ref.stop()
    (st, stop, _), (rt, rtop, _) = reply(got), reply(want)
    return split(st, stop, rt, rtop, who="server")


def play(subject: Server, binary: str) -> None:
    steps, i = CASE["steps"], 0
    while i < len(steps):
        step = steps[i]
        if "damage" in step:  # a slot file cut to half its size, as a crash mid-save leaves it
            f = HERE / "slots" / step["damage"]
            with f.open("r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
            i += 1
            continue
        block = [step]
        while step.get("block") is not None and i + len(block) < len(steps) and \
                steps[i + len(block)].get("block") == step["block"]:
            block.append(steps[i + len(block)])
        with ThreadPoolExecutor(max_workers=len(block)) as pool:  # a parallel block goes at once
            answers = list(pool.map(subject.post, [s["path"] for s in block], [s["body"] for s in block]))
        subject.check_alive(block[0]["path"])
        for s, got in zip(block, answers, strict=True):
            code = got.get("error") if "timings" not in got else None
            if isinstance(code, int) and code >= 500:  # it lived, and could not answer: the case's 5xx class
                say("BUG", f"the server answered {code} on {s['path']} and lived: {got.get('text', '')[:200]}", 1)
            if code is not None and not isinstance(code, int):
                say("CANNOT TELL", f"{s['path']}: {code}", 2)
            if code is not None:  # a 4xx: refused, as a damaged slot file is
                continue
            judge = s.get("judge")
            if judge is None:
                continue
            if judge["kind"] == "reuse":
                reused = reply(got)[2]
                if reused < judge["promised"]:
                    say("BUG", f"lost reuse at request {i + block.index(s) + 1}: the server reused {reused} prompt "
                        f"tokens where the design promises at least {judge['promised']}"
                        + (f" ({judge['why']})" if judge.get("why") else ""), 1)
            elif (why := wrong_answer(s, got, binary)):
                say("BUG", f"wrong answer at request {i + block.index(s) + 1}: {why}", 1)
        i += len(block)


def main() -> None:
    if CASE.get("engine") == "llama-cpp-python":
        play_lcp()
    args = sys.argv[1:]
    tries = CASE.get("tries", 1)
    if "--tries" in args:
        at = args.index("--tries")
        try:
            tries = int(args[at + 1])
        except (IndexError, ValueError):
            say("CANNOT TELL", "--tries takes a whole number", 2)
        del args[at:at + 2]
    binary = args[0] if args else os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not binary:
        say("CANNOT TELL", "no llama-server: give its path (python3 repro.py PATH) or set LLAMA_SERVER", 2)
    for n in range(1, max(1, tries) + 1):
        slots = HERE / "slots"
        shutil.rmtree(slots, ignore_errors=True)
        slots.mkdir()
        subject = Server(binary, [*CASE["subject_args"], "--slot-save-path", str(slots)], "subject")
        TRY[0] = f" (try {n} of {tries})" if tries > 1 else ""
        try:
            play(subject, binary)
        finally:
            subject.stop()
    say("NOT REPRODUCED", f"{CASE['title']}: every request answered as the design says on this build"
        + (f", in {tries} tries" if tries > 1 else ""), 0)


CASE: dict = {}

if __name__ == "__main__":
    try:
        CASE = json.loads((HERE / "case.json").read_text())
    except (OSError, ValueError) as e:
        say("CANNOT TELL", f"{HERE / 'case.json'}: {e}", 2)
    main()
