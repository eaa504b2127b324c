"""The pytest plugin (entry point `pytest11`): each bundled scenario is one test item per model.

    pytest --gguf ~/models/jamba.gguf -k regenerate     # from any directory
    pytest --fault no-restore -k seed                    # in a checkout: watch it catch a known bug
    pytest -n auto --report-dir report                   # pytest-xdist: items in parallel, one report

Registered as an entry point, not a conftest.py, so its options are known before pytest picks
its rootdir: `--gguf PATH` works from anywhere. Given --gguf or --server-bin and no paths, it
collects the bundled library. A failing item prints the divergence summary and the command
that replays it; with --report-dir the session's results are written there (under xdist, by
the controller, from what every worker sends back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# light modules only: every pytest session of an environment with cachecheck installed loads this
# plugin, also in projects that never use it; numpy, gguf and llama.cpp come with the first item
from . import faults, rundir
from .engines.base import EngineError, event_text
from .engines.capabilities import PROFILES
from .library import check_flags, make_engine
from .scenario import BUNDLED, ScenarioError
from .scenario import load as load_scenario
from .status import FAILING, InputError, Status

if TYPE_CHECKING:
    from .models import ModelRef
    from .outcomes import ScenarioResult

_RESULTS = pytest.StashKey[list]()
_ENGINES = pytest.StashKey[object]()  # a campaign.Engines once an item runs, else None
_MODELS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cachecheck")
    g.addoption("--gguf", action="append", default=[], metavar="PATH",
                help="run the bundled scenarios on this GGUF model (repeatable; default: every fixture)")
    g.addoption("--fault", metavar="NAME", help="inject a known cache bug into the in-process engine")
    g.addoption("--report-dir", metavar="DIR", help="write the session's results (JSON) here")
    g.addoption("--cachecheck-threads", type=int, metavar="N", help="llama.cpp threads per engine")
    g.addoption("--server-bin", metavar="PATH",
                help="run the scenarios against this llama-server (a PR's build) instead of in-process")
    g.addoption("--server-profile", choices=PROFILES, default="deployed",
                help="with --server-bin: deployed (the build's defaults, as its users run it) or isolated (one slot)")
    g.addoption("--server-args", default="", metavar="'FLAGS'",
                help="with --server-bin: your own flags for the subject llama-server, checked against its --help")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    config.stash[_ENGINES] = None
    for path in sorted(BUNDLED.glob("*.yaml")):  # scenario tags become markers: -m regenerate
        try:
            for tag in load_scenario(path).tags:
                config.addinivalue_line("markers", f"{tag.replace('-', '_')}: scenario tag")
        except ScenarioError:
            pass  # reported when the file is collected
    fault = config.getoption("--fault")
    try:
        faults.check(fault)
    except faults.UnknownFault as e:
        raise pytest.UsageError(str(e)) from None
    if fault and config.getoption("--server-bin"):
        raise pytest.UsageError("--fault changes the in-process policy; it cannot be used with --server-bin")
    if config.getoption("--server-args"):  # checked against the binary's --help before any item runs
        if not config.getoption("--server-bin"):
            raise pytest.UsageError("--server-args are flags for the subject llama-server: they need --server-bin")
        try:
            check_flags(config.getoption("--server-bin"), config.getoption("--server-args"))
        except InputError as e:
            raise pytest.UsageError(str(e)) from None
    if config.getoption("--gguf"):  # a bad path is one usage error now, not one per scenario file later
        _models(config)
    if (config.getoption("--gguf") or config.getoption("--server-bin")) and \
            config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(BUNDLED)]  # `pytest --gguf m.gguf` anywhere: the bundled library on that model


def _models(config: pytest.Config) -> list[ModelRef]:
    if _MODELS not in config.stash:
        from . import models

        try:
            config.stash[_MODELS] = models.resolve(config.getoption("--gguf") or ["all"])
        except models.ModelError as e:
            raise pytest.UsageError(str(e)) from None
    return config.stash[_MODELS]


def pytest_collect_file(parent: pytest.Collector, file_path: Path):  # pytest hook
    if file_path.suffix == ".yaml" and file_path.parent == BUNDLED:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self):  # pytest API
        try:
            sc = load_scenario(self.path)
        except ScenarioError as e:
            raise self.CollectError(str(e)) from None
        for m in _models(self.config):
            yield ScenarioItem.from_parent(self, name=f"{sc.name}[{m.name}]", scenario=sc, model=m)


class CaseFailed(Exception):
    def __init__(self, result: ScenarioResult):
        self.result = result


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario, model: ModelRef, **kw) -> None:
        super().__init__(**kw)
        self.scenario = scenario
        self.model = model
        for tag in scenario.tags:
            self.add_marker(tag.replace("-", "_"))

    def _engines(self):  # a campaign.Engines: one engine per model, renewed after an ERROR
        config = self.config
        if config.stash[_ENGINES] is None:
            from .campaign import Engines  # numpy and the rest, only once an item runs

            opt = config.getoption
            server = {"profile": opt("--server-profile"), "server_args": opt("--server-args")} \
                if opt("--server-bin") else {}
            config.stash[_ENGINES] = Engines(lambda m: make_engine(m.path, m.name, opt("--fault"),
                                                                   opt("--server-bin"), **server))
        return config.stash[_ENGINES]

    def runtest(self) -> None:
        from .applies import skip_reason
        from .results import result_dict

        fault = self.config.getoption("--fault")
        engines = self._engines()
        try:
            engine = engines.engine(self.model)
        except EngineError as e:
            pytest.fail(str(e), pytrace=False)
        memory = engine.info.memory
        why = skip_reason(self.scenario, memory, fault)
        if why:
            pytest.skip(f"{why}, {self.model.name} is {memory}")
        sc = self.scenario
        threads = self.config.getoption("--cachecheck-threads")
        if threads:
            sc = sc.with_settings(threads=threads)
        res = engines.play(sc, self.model, fault)  # after an ERROR the next item starts a fresh engine
        self.config.stash[_RESULTS].append(json.loads(json.dumps(result_dict(res))))  # plain data: xdist sends it
        if res.status == Status.SKIP:
            pytest.skip(res.reason)
        if res.status in FAILING:
            raise CaseFailed(res)

    def repr_failure(self, excinfo, style=None):  # pytest API
        if not isinstance(excinfo.value, CaseFailed):
            return super().repr_failure(excinfo, style)
        r = excinfo.value.result
        lines = [f"{r.status}: {r.reason}"]
        bad = r.first_bad
        if bad is not None and bad.verdict.divergence is not None:
            lines.append(f"first divergence ({bad.step}): {bad.divergence_text()}")
            lines.append(f"subject:   {bad.subject.text!r}")
            lines.append(f"reference: {bad.reference.text!r}")
        if bad is not None:
            events = ", ".join(event_text(e) for e in bad.subject.events)
            lines.append(f"cache events of that turn: {events or 'none'}")
        lines.append(f"replay: {r.replay}")
        return "\n".join(lines)

    def reportinfo(self):  # pytest API
        return self.path, None, f"{self.name}"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist hook (controller side)
    # each worker plays its share of the items; their results come back here for the one report
    node.config.stash[_RESULTS].extend(getattr(node, "workeroutput", {}).get("cachecheck_results", []))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    engines = config.stash.get(_ENGINES, None)
    if engines is not None:
        engines.close()
    rundir.finish()
    cases = config.stash.get(_RESULTS, [])
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller writes the report
        config.workeroutput["cachecheck_results"] = cases
        return
    report_dir = config.getoption("--report-dir")
    if report_dir and cases:
        from .report import write_report
        from .results import document_of

        engine = "server" if config.getoption("--server-bin") else "inproc"
        cases.sort(key=lambda c: (c["model"], c["scenario"]))  # workers finish in any order
        doc = document_of(cases, {"engine": engine, "fault": config.getoption("--fault"),
                                  "command": "pytest " + " ".join(config.invocation_params.args)})
        path = write_report(doc, Path(report_dir))
        config.pluginmanager.get_plugin("terminalreporter").write_line(f"cachecheck report: {path}")
