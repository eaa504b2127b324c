"""The code's shape, checked: imports flow one way down the layers, and no function outgrows a screen.

commands -> runner -> results -> engines -> policy/compare -> status. A module may import its own
layer or a lower one, never a higher one, also inside a function (a lazy import is still a
dependency). A new module names its layer here; one that does not fails the test.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llama_cachecheck"

LAYERS = {  # lowest first
    "status": {"status", "pins", "rundir", "processes", "shipped", "reproducer", "server_defaults"},
    "policy/compare": {"compare", "invariants", "noise", "policy", "slots", "faults", "speculation"},
    "engines": {"engines", "scenario", "models", "builds", "fixtures"},
    "results": {"outcomes", "results", "stored"},
    "runner": {"runner", "campaign", "conversation", "applies", "promise"},
    "commands": {"cli", "arguments", "library", "bisect", "calibrate", "conformance", "diff", "findings", "flaky",
                 "footprint", "grammar", "minimize", "pytest_plugin", "registry", "replay_findings", "report", "repro",
                 "selftest", "soak"},
}
RANK = {top: i for i, tops in enumerate(LAYERS.values()) for top in tops}
LONGEST = 80  # lines of one function


def modules() -> dict[str, Path]:
    found = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                if target in known and target != name:
                    out.add(target)
    return out


def layer(module: str) -> int:
    top = module.split(".")[1] if module != "llama_cachecheck" else ""
    return RANK.get(top, -1)


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "llama_cachecheck" and layer(m) < 0] == []


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    names = list(LAYERS)
    upward = [f"{m} ({names[layer(m)]}) imports {t} ({names[layer(t)]})"
              for m, p in sorted(known.items()) for t in sorted(imported(m, p, known))
              if m != "llama_cachecheck" and t != "llama_cachecheck" and layer(t) > layer(m)]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    # the check itself can fail: a policy module that asks the runner is caught
    (tmp_path / "policy.py").write_text("def f():\n    from .runner import play\n")
    known = {"llama_cachecheck.policy": tmp_path / "policy.py", "llama_cachecheck.runner": tmp_path / "runner.py"}
    assert imported("llama_cachecheck.policy", known["llama_cachecheck.policy"], known) == {"llama_cachecheck.runner"}
    assert layer("llama_cachecheck.runner") > layer("llama_cachecheck.policy")


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_top_level_data_is_real_directories_found_from_anywhere(tmp_path):
    # scenarios/ and fixtures/ of the design card: no symlink (git may check one out as a file); this
    # environment's install (editable in a checkout) finds them from another directory
    top = PACKAGE.parent
    for d in ("scenarios", "fixtures"):
        assert (top / d).is_dir() and not (top / d).is_symlink()
    said = subprocess.run([sys.executable, "-c", "from llama_cachecheck.scenario import BUNDLED; "
                           "from llama_cachecheck.fixtures import SPEC_FILE; print(BUNDLED); print(SPEC_FILE)"],
                          capture_output=True, text=True,
                          cwd=tmp_path, check=True).stdout.split()
    assert said == [str(top / "scenarios"), str(top / "fixtures" / "models.yaml")]
    assert len(list((top / "scenarios").glob("*.yaml"))) >= 50
