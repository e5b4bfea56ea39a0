"""The package's shape: no import cycle, imports point down the layer order, no private names across
packages, and the light subpackages do not pull in the runtime's heavy dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxlab"

# Layer of each top-level part of jaxlab (DESIGN: nm, losses <- transforms <- nn <- models <- training,
# distributed <- cli). A module may import only from its own part or a lower layer.
LAYERS = {
    "paths": 0, "nm": 0, "losses": 0, "metrics": 0, "data": 0, "kernels": 0,
    "transforms": 1,
    "nn": 2,
    "models": 3, "distributed": 3,
    "training": 4,
    "cli": 5, "__init__": 6,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every jaxlab import in ``path`` (function-level ones too)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "jaxlab"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxlab":  # `from jaxlab import nm, transforms as T`: the subpackages
                out += [(f"jaxlab.{a.name}", [], node.lineno) for a in node.names]
            elif node.module.split(".")[0] == "jaxlab":
                out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names, _ in _imports(path):
            # `from pkg import sub` imports the submodule when `sub` is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            graph[m].update(subs or [target] if target in mods else subs)
            if target in mods and len(subs) < len(names):
                graph[m].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if v == u:
                continue
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_find_cycle_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_jaxlab():
    graph = _graph()
    # a package __init__ importing its own submodules is how re-exports work, not a cycle; drop the
    # implicit edge submodule -> parent package that `from jaxlab.pkg import x` would otherwise add
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    bad = []
    for m, path in _modules().items():
        src = _part(m)
        for target, _, line in _imports(path):
            dst = _part(target)
            if dst not in LAYERS or src not in LAYERS:
                bad.append(f"{path.relative_to(ROOT)}:{line}: unknown part {src!r} or {dst!r} (add it to LAYERS)")
            elif src != dst and LAYERS[dst] > LAYERS[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {m} (layer {LAYERS[src]}) imports {target} "
                           f"(layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("where", ["jaxlab", "experiments", "benchmarks", "tpu_configs", "tests"])
def test_no_private_names_across_packages(where):
    bad = []
    for path in (ROOT / where).rglob("*.py"):
        here = _module_name(path)
        for target, names, line in _imports(path):
            private_mod = [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            private_names = [n for n in names if n.startswith("_")]
            if not (private_mod or private_names):
                continue
            # a private module/name may be used inside the subpackage that owns it
            owner = ".".join(target.split(".")[:2])
            if where == "jaxlab" and here.startswith(owner + ".") or here == owner:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(names)}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["jaxlab.transforms", "jaxlab.losses", "jaxlab.nm"])
def test_light_subpackages_do_not_import_orbax_or_matplotlib(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'matplotlib', 'tensorstore'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"
