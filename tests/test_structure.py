"""Module and package boundaries of cdal_fast (docs/architecture.md draws them).

Imports are read from the source with ``ast`` (module level and inside functions alike), so a lazy
import that closes a cycle or crosses a boundary is caught too.

* no import cycles between modules;
* each sub-package imports only the layers below it: ``network`` (maths) nothing of the package,
  ``sampling`` only ``network``, ``runtime`` only ``network`` / ``sampling`` and the file utilities;
* the slide jobs (``wsi``) never import scoring, training, the labelled-dataset layout or the runtimes:
  they get a sampler from the job layer, which is the one place (besides ``runtime`` itself) that
  builds samplers by backend name;
* the CLI is imported by nobody.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdal_fast"


# modules every layer may use: they import nothing of the package (checked below)
UTILITIES = ("cdal_fast.atomic", "cdal_fast.hashing", "cdal_fast.cache", "cdal_fast.extras")
# package -> what it may import besides itself and the utilities (prefixes)
LAYERS = {
    "cdal_fast.network": (),
    "cdal_fast.sampling": ("cdal_fast.network",),
    "cdal_fast.runtime": ("cdal_fast.network", "cdal_fast.sampling"),
}
WSI_FORBIDDEN = ("cdal_fast.evaluate", "cdal_fast.training", "cdal_fast.datasets", "cdal_fast.runtime",
                 "cdal_fast.cli")
SAMPLER_BUILDERS = ("cdal_fast.job", "cdal_fast.runtime")  # who may import runtime.backends


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """A .py file, a package folder or a compiled extension (``_C.cpython-*.so``) of that name."""
    where = PACKAGE.parent.joinpath(*name.split("."))
    return where.is_dir() or any(where.parent.glob(where.name + ".*"))


def _imports(path: Path, name: str) -> set[str]:
    """Absolute names of the cdal_fast modules ``path`` imports (a package import counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cdal_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("cdal_fast"):
                continue
            # `from . import ops` imports the module cdal_fast.network.ops; `from .config import X` the module config
            subs = {f"{mod}.{a.name}" for a in node.names}
            found |= subs if all(_is_module(m) for m in subs) else {mod}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {d for d in _imports(path, name) if d in files and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve_to_modules(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ..network.config import ModelConfig\nfrom . import outputs\nimport cdal_fast.network.ops\n")
    assert _imports(f, "cdal_fast.wsi.m") == {"cdal_fast.network.config", "cdal_fast.wsi.outputs",
                                              "cdal_fast.network.ops"}


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _violations(graph: dict[str, set[str]], inside: str, forbidden) -> dict[str, list[str]]:
    bad = {m: sorted(d for d in deps if forbidden(d)) for m, deps in graph.items()
           if m == inside or m.startswith(inside + ".")}
    return {m: d for m, d in bad.items() if d}


def test_packages_import_only_the_layers_below():
    graph = _graph()
    for package, allowed in LAYERS.items():
        bad = _violations(graph, package, lambda d, p=package, a=allowed: not d.startswith((p, *a, *UTILITIES)))
        assert not bad, f"{package} may import only {allowed or 'itself'} and the utilities: {bad}"


def test_utilities_import_nothing_of_the_package():
    graph = _graph()
    assert not {m: sorted(graph[m]) for m in UTILITIES if graph[m]}


def test_wsi_does_not_import_scoring_training_datasets_or_runtimes():
    bad = _violations(_graph(), "cdal_fast.wsi", lambda d: d.startswith(WSI_FORBIDDEN))
    assert not bad, bad


def test_only_the_job_layer_builds_samplers_by_backend_name():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "cdal_fast.runtime.backends" in deps
                   and not m.startswith(SAMPLER_BUILDERS))
    assert not users, users


def test_nothing_imports_the_cli():
    assert not [m for m, deps in _graph().items() if "cdal_fast.cli" in deps]


def test_layer_rule_sees_a_violation():
    graph = {"cdal_fast.network.x": {"cdal_fast.sampling.sampler"}, "cdal_fast.network.y": {"cdal_fast.network.x"}}
    assert _violations(graph, "cdal_fast.network", lambda d: not d.startswith("cdal_fast.network")) == {
        "cdal_fast.network.x": ["cdal_fast.sampling.sampler"]}


def test_inference_does_not_import_scoring_training_or_data():
    deps = _graph()["cdal_fast.sampling.inference"]
    assert not [d for d in deps if d.startswith(WSI_FORBIDDEN)], deps


MAX_FUNCTION_LINES = 80  # a function longer than a screen is doing more than one job


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_every_task_is_looked_up_in_the_registry():
    """No module restates the task list: the registry names every task's functions, and they resolve."""
    from cdal_fast.tasks import TASKS

    for task in TASKS.values():
        for field in ("segment", "done", "training_data", "evaluate"):
            assert callable(task.function(field)), (task.name, field)
    restated = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path.name != "tasks.py" and ('"monuseg", "cxr", "hippocampus"' in text or 'task == "' in text):
            restated.append(str(path.relative_to(PACKAGE)))
    assert not restated, restated
