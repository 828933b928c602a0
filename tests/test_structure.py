"""Module boundaries: no import cycles inside cdal_fast, and the slide jobs stay apart from scoring/training.

Imports are read from the source with ``ast`` (module level and inside functions alike), so a lazy
import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdal_fast"
WSI_FORBIDDEN = ("cdal_fast.evaluate", "cdal_fast.training", "cdal_fast.data")
COMPAT_SHIMS = {"cdal_fast.data.imageio"}  # re-export a moved module; nothing inside cdal_fast imports them


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
            # `from . import ops` imports the module cdal_fast.ops; `from .config import X` the module config
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
    f.write_text("from ..config import ModelConfig\nfrom . import outputs\nimport cdal_fast.ops\n")
    assert _imports(f, "cdal_fast.wsi.m") == {"cdal_fast.config", "cdal_fast.wsi.outputs", "cdal_fast.ops"}


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_wsi_does_not_import_scoring_training_or_data():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.startswith(WSI_FORBIDDEN) and d not in COMPAT_SHIMS)
           for m, deps in graph.items() if m.startswith("cdal_fast.wsi")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_inference_does_not_import_scoring_training_or_data():
    deps = _graph()["cdal_fast.inference"]
    assert not [d for d in deps if d.startswith(WSI_FORBIDDEN)], deps
