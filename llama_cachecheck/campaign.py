"""Many scenarios on many models: one engine per model kept across its scenarios (renewed after an ERROR),
the thresholds each model is judged by (measured on the spot where nobody calibrated it), and models in
parallel with every engine stopped on Ctrl-C. One scenario's play is runner.py's."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from . import compare, noise
from .applies import skip_reason
from .engines.base import Engine, EngineError, Unsupported
from .models import ModelRef
from .outcomes import ScenarioResult
from .runner import play, replay_command
from .scenario import Scenario
from .status import Status

Progress = Callable[[ScenarioResult], None]


class Engines:
    """One engine per model, made on first use and kept: for everything that plays scenarios (run's
    threads, minimize, soak, the pytest plugin). After an ERROR the engine may be gone; the next play
    makes a fresh one."""

    def __init__(self, make_engine: Callable[[ModelRef], Engine],
                 thresholds: dict[str, compare.Thresholds] | None = None):
        self.make_engine = make_engine
        self.live: dict[str, Engine] = {}
        self.thresholds = compare.load_thresholds() if thresholds is None else thresholds
        self.replay_args: dict[str, list[str]] = {}  # per model, kept after its engine is gone
        self.measured: dict[str, compare.Thresholds] = {}  # noise floors measured on the spot, by profile/model

    def engine(self, model: ModelRef) -> Engine:
        """The model's engine, made now if it has none (EngineError when it cannot start)."""
        if model.name not in self.live:
            self.live[model.name] = self.make_engine(model)
            self.replay_args[model.name] = self.live[model.name].replay_args()
        return self.live[model.name]

    def play(self, sc: Scenario, model: ModelRef, fault: str | None) -> ScenarioResult:
        engine = self.engine(model)
        res = play(sc, engine, model.name, fault, thresholds=self._thresholds(engine, model))
        if res.status == Status.ERROR:
            self.live.pop(model.name).close()
        return res

    def _thresholds(self, engine: Engine, model: ModelRef) -> compare.Thresholds:
        """The calibration for the model and the engine's profile; for a real model on a llama-server that has
        none of its own (a user's GGUF), or on a server someone else started (kernels unknown), its noise floor
        measured on the spot, once per run (engines/noise_floor.py): a memory kind's thresholds, calibrated
        on random weights, say nothing of a trained model's noise."""
        info = engine.info
        th = compare.thresholds_for(self.thresholds, model.name, info.memory, info.profile)
        key = f"{info.profile}/{model.name}"
        measure = getattr(engine, "noise_floor", None)
        attached = getattr(engine, "server_url", None)
        if measure is None or model.name.startswith("fixture:") or (th.source == key and not attached):
            return th
        if key not in self.measured:
            where = f"the server at {attached}" if attached else info.profile
            print(f"measuring the noise floor of {model.name} on {where} (no calibration of its own: uncached "
                  "repeats, the reference against twins that arrange its numbers otherwise)...", file=sys.stderr,
                  flush=True)
            try:
                measured = measure()
            except (EngineError, Unsupported) as e:  # the scenario meets the same and reports it as its own
                print(f"  not measured ({e}); judged by {th.source or 'the default thresholds'}", file=sys.stderr,
                      flush=True)
                self.measured[key] = th
                return th
            self.measured[key] = noise.thresholds(measured, f"{key}, measured on the spot")
            for a, t in self.measured[key].arrangements.items():
                print(f"  {a}: {measured[a].said()}: thresholds Δlogprob {t.max_dlogprob:.3g}, KL {t.max_kl:.3g}, "
                      f"tie {t.tie_margin:.3g}", file=sys.stderr, flush=True)
        return self.measured[key]

    def close(self) -> None:
        for engine in self.live.values():
            engine.close()
        self.live.clear()


def run_model(model: ModelRef, scenarios: list[Scenario], make_engine: Callable[[ModelRef], Engine], *,
              fault: str | None = None, thresholds: dict[str, compare.Thresholds], threads: int | None = None,
              progress: Progress = lambda _: None, stop: threading.Event | None = None) -> list[ScenarioResult]:
    """All scenarios on one model, one engine process; a crashed engine is restarted."""
    results: list[ScenarioResult] = []
    engines = Engines(make_engine, thresholds)
    gone: str | None = None  # why this model's engine cannot run at all: the rest is skipped, once said
    try:
        for sc in scenarios:
            if stop is not None and stop.is_set():
                break
            if threads:
                sc = sc.with_settings(threads=threads)
            if gone:
                res = ScenarioResult(sc, model.name, "?", "?", fault, Status.SKIP, gone)
            else:
                try:
                    engine = engines.engine(model)
                except EngineError as e:  # the model cannot be loaded at all: say it once, skip the rest
                    res = ScenarioResult(sc, model.name, "?", "?", fault, Status.ERROR, str(e),
                                         replay=replay_command(sc, model.name, fault))
                    gone = f"the engine could not start for this model (see {sc.name})"
                else:
                    why = skip_reason(sc, engine.info.memory, fault)
                    res = ScenarioResult(sc, model.name, engine.info.engine, engine.info.memory, fault, Status.SKIP,
                                         why) if why else engines.play(sc, model, fault)
                    if res.start_failed:
                        gone = res.reason if res.status == Status.SKIP else \
                            f"server did not start for this model (see {sc.name})"
            results.append(res)
            progress(res)
    finally:
        engines.close()
    return results


def run_all(models: list[ModelRef], scenarios: list[Scenario], make_engine: Callable[[ModelRef], Engine], *,
            fault: str | None = None, threads: int | None = None, jobs: int = 1,
            progress: Progress = lambda _: None) -> list[ScenarioResult]:
    """Models in parallel (one worker process each), scenarios in order within a model.

    On Ctrl-C every engine is closed at once (server process groups killed, workers stopped),
    so no process of ours outlives the run.
    """
    thresholds = compare.load_thresholds()
    stop = threading.Event()
    live: list[Engine] = []

    def tracked(m: ModelRef) -> Engine:
        engine = make_engine(m)
        live.append(engine)
        if stop.is_set():
            engine.close()
        return engine

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_model, m, scenarios, tracked, fault=fault, thresholds=thresholds, threads=threads,
                               progress=progress, stop=stop) for m in models]
        try:
            return [r for f in futures for r in f.result()]
        except KeyboardInterrupt:
            stop.set()
            for engine in list(live):
                try:
                    engine.close()
                except Exception as e:  # the signal's exit code stands; the pool thread closes it again
                    print(f"cachecheck: while stopping an engine: {type(e).__name__}: {e}", file=sys.stderr)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
