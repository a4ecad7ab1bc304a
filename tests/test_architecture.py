"""The package's shape: imports only downward, and imports that work in a fresh process."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "curvopt"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """curvopt module -> curvopt modules it imports, at module *and* function level.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module,
    else of ``pkg``; a package's own ``__init__`` running before its submodules is not
    an edge (Python's import system, not the code, orders that).
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = []
                for a in node.names:
                    full = f"{src}.{a.name}"
                    targets.append(full if full in mods else src)
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t.startswith("curvopt") and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    # The check itself can fail: a graph with a cycle is reported.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "curvopt.quantities.base" in graph["curvopt.quantities.first_order"]
    assert "curvopt.rules.layout" in graph["curvopt.rules.linear"]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=PKG.parent)


def test_weight_norm_first_in_a_fresh_process():
    # Regression: the engine read rules.fallback before anything imported it.
    r = _fresh("""
        import torch, curvopt
        from torch.nn.utils.parametrizations import weight_norm
        torch.manual_seed(0)
        model = torch.nn.Sequential(weight_norm(torch.nn.Linear(3, 4)), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 2))
        with curvopt.collect(model, curvopt.BatchGrad()):
            model(torch.randn(5, 3)).sum().backward()
        g = model[0].parametrizations.weight.original1
        assert g.grad_batch.shape == (5, *g.shape)
        torch.testing.assert_close(g.grad_batch.sum(0), g.grad)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
