"""`cachecheck soak`: random scenarios from a seed, clean, on every fixture, for N minutes.

The bundled library is a fixed set of conversations someone thought of. A soak draws new ones from the
scenario grammar (messages, generate, regenerate, edits, truncations, raw token runs, batch
and checkpoint settings) and plays them on a correct engine, where every reply must PASS. It
also watches what a long run does to the machine: the memory, open files and processes of
cachecheck and its engines must stay flat, and nothing may be left behind when it ends.
Any finding is saved as a scenario file that replays it.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from . import scenario as scn
from .engines.base import SessionSettings
from .scenario import Scenario, Step

WORDS = ("the cache restores a checkpoint when the prompt shares a prefix with what it holds but a window "
         "or a recurrent state cannot be trimmed back so the server keeps copies of the state at a few "
         "positions and a regeneration or an edit takes the nearest one before the change").split()


def _text(rng: random.Random) -> str:
    n = rng.choice((1, 2, 5, 12, 30, 60))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(("?", ".", "!"))


def _settings(rng: random.Random) -> SessionSettings:
    s = SessionSettings()
    n_batch = rng.choice((64, 64, 32, 17, 128))
    return replace(s, n_batch=n_batch, n_ubatch=rng.choice([u for u in (n_batch, 16, 8) if u <= n_batch]),
                   ctx_checkpoints=rng.choice((32, 32, 3, 1)), checkpoint_min_step=rng.choice((8192, 8192, 16, 64)))


def random_scenario(seed: int, index: int) -> Scenario:
    """One conversation drawn from the grammar; the same (seed, index) always gives the same one."""
    rng = random.Random(f"{seed}:{index}")
    steps: list[Step] = []
    if rng.random() < 0.25:  # raw token runs (long prompts, truncations by token count)
        steps += [scn.Tokens(random_length=rng.randint(5, 300), seed=rng.randint(0, 999)), scn.Generate()]
        for _ in range(rng.randint(1, 5)):
            pick = rng.random()
            if pick < 0.4:
                steps += [scn.Tokens(random_length=rng.randint(1, 120), seed=rng.randint(0, 999)), scn.Generate()]
            elif pick < 0.7:
                steps.append(scn.Regenerate())
            else:
                steps += [scn.Truncate(tokens=rng.randint(1, 250)), scn.Generate()]
    else:
        turns = 1
        steps += [scn.Message("user", _text(rng)), scn.Generate()]
        for _ in range(rng.randint(1, 6)):
            pick = rng.random()
            if pick < 0.4:
                steps += [scn.Message("user", _text(rng)), scn.Generate()]
                turns += 1
            elif pick < 0.65:
                steps.append(scn.Regenerate())
            elif pick < 0.85:
                k = rng.randint(1, turns)
                steps += [scn.Edit(k, _text(rng)), scn.Generate()]
                turns = k
            elif turns > 1:
                k = rng.randint(1, turns - 1)
                steps += [scn.Truncate(turns=k), scn.Message("user", _text(rng)), scn.Generate()]
                turns = k + 1
    return Scenario(name=f"soak-{seed}-{index}", purpose=f"cachecheck soak --seed {seed}: scenario {index}",
                    path=Path(f"soak-{seed}-{index}.yaml"), steps=tuple(steps), settings=_settings(rng),
                    sampling=scn.Sampling(n_predict=rng.choice((4, 16, 32))), tags=("soak",))


def checked(sc: Scenario, scratch: Path) -> Scenario:
    """Through the loader and back, as its saved file will replay it (the grammar must hold what it draws)."""
    from .scenario import reload

    loaded = reload(sc, scratch / f"{sc.name}.yaml")
    if loaded is None:
        raise AssertionError(f"the soak drew a scenario the loader refuses: {sc}")
    return replace(loaded, path=sc.path)


# what a long run does to the machine ------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    rss_mb: float  # cachecheck and every process under it
    fds: int  # cachecheck's open file descriptors
    processes: int  # processes under cachecheck
    temp_files: int  # worker logs and server logs of ours in the (soak's own) temp directory

    def __str__(self) -> str:
        return (f"RSS {self.rss_mb:.0f} MB, {self.fds} open files, {self.processes} child processes, "
                f"{self.temp_files} temp files")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def footprint() -> Footprint:
    """Linux /proc figures for this process and everything it started."""
    me = os.getpid()
    kids = _descendants(me)
    temp = [p for p in Path(tempfile.gettempdir()).rglob("*") if p.is_file()]
    return Footprint(sum(_rss_mb(p) for p in [me, *kids]), len(os.listdir(f"/proc/{me}/fd")), len(kids), len(temp))


@contextlib.contextmanager
def own_temp_dir() -> Iterator[Path]:
    """A temp directory for this run and every process it starts, so that what is left there is ours."""
    multiprocessing.util.get_temp_dir()  # its own (the fork server's socket) stays where it was, for the process
    path = Path(tempfile.mkdtemp(prefix="cachecheck-soak-"))
    old_env, old_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(path), str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_default
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(path, ignore_errors=True)


# the command ----------------------------------------------------------------------------------

def main(args) -> int:  # argparse's namespace
    scratch = Path(tempfile.mkdtemp(prefix="cachecheck-soak-scenarios-"))  # outside the temp dir it watches
    try:
        with own_temp_dir():
            return _soak(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _soak(args, scratch: Path) -> int:
    from . import models
    from .library import make_engine
    from .report import console
    from .runner import Engines
    from .scenario import dump
    from .status import FAILING

    refs = models.resolve(args.model or ["all"])
    out_dir = Path(args.report_dir)
    before = footprint()
    engines = Engines(lambda m: make_engine(m.path, m.name))
    counts: Counter = Counter()
    findings: list[str] = []
    replies = played = 0
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    warm: Footprint | None = None
    index = 0
    try:
        while time.monotonic() < deadline:
            sc = checked(random_scenario(args.seed, index), scratch)
            if args.threads:
                sc = sc.with_settings(threads=args.threads)
            for ref in refs:
                if time.monotonic() >= deadline:
                    break
                res = engines.play(sc, ref, None)
                counts[str(res.status)] += 1
                played += 1
                replies += len(res.turns)
                if res.status in FAILING:
                    path = out_dir / f"{sc.name}.yaml"
                    out_dir.mkdir(parents=True, exist_ok=True)
                    path.write_text(dump(sc, f"{sc.purpose}; {res.status} on {ref.name}: {res.reason}"))
                    findings.append(f"{res.status} {sc.name} [{ref.name}]: {res.reason}  (replay: cachecheck run "
                                    f"{path} --model {ref.name})")
                    console.say(findings[-1])
            index += 1
            # the baseline to stay flat against: engines up, and contexts of most batch shapes made once (the
            # allocator keeps what the largest needed: measured, a worker grows 14 MB over its first 100
            # random scenarios, 2 MB over the next 400)
            if warm is None and time.monotonic() - t0 >= 0.2 * (deadline - t0):
                warm = footprint()
            if index % 20 == 0:
                console.say(f"  {time.monotonic() - t0:5.0f} s: {index} scenarios, {played} runs, "
                            f"{replies} replies, {dict(counts)}; {footprint()}")
        end = footprint()
    finally:
        engines.close()
    after = footprint()
    warm = warm or end
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    console.say(f"soak: seed {args.seed}, {time.monotonic() - t0:.0f} s, {index} scenarios x {len(refs)} models = "
                f"{played} runs, {replies} replies compared; {statuses}")
    console.say(f"  start {before}\n  warm  {warm}\n  end   {end}\n  after {after}")
    leaks = []
    if end.rss_mb > warm.rss_mb * 1.10 + 20:
        leaks.append(f"memory grew from {warm.rss_mb:.0f} to {end.rss_mb:.0f} MB")
    if end.fds > warm.fds:
        leaks.append(f"open files grew from {warm.fds} to {end.fds}")
    if end.processes > warm.processes:
        leaks.append(f"processes grew from {warm.processes} to {end.processes}")
    if after.temp_files > before.temp_files:
        leaks.append(f"{after.temp_files - before.temp_files} temp files left behind")
    for leak in leaks:
        console.say(f"leak: {leak}")
    if findings or leaks:
        console.say(f"soak: {len(findings)} finding(s), {len(leaks)} leak(s)")
        return 1
    console.say("soak: zero FAIL, footprint flat, nothing left behind")
    return 0
