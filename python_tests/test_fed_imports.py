"""The federated layer imports cleanly from any entry point in a fresh interpreter, and only downwards.

Layers, bottom to top (DESIGN.md): ops -> dp/, data/, core/ (config, adapters, state types) ->
strategies/ -> federated/ (the runtime) -> apps (cli, jobs, flower/). A module imports only its own
layer or layers below it, also under ``TYPE_CHECKING`` and inside functions.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = {"fedit", "fedprox", "ffa_lora", "fedsa_lora", "fedsa_rslora", "fedsa_vera", "flora", "hetlora",
           "lora_a2", "fedex_lora", "centralized", "standalone"}
ENTRY_POINTS = ["fedlora_ext.strategies", "fedlora_ext.strategies.base", "fedlora_ext.strategies.hetlora",
                "fedlora_ext.federated", "fedlora_ext.federated.client"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_import_first(module, tmp_path):
    code = (f"import {module}\n"
            "from fedlora_ext.strategies import strategy_names\n"
            "from fedlora_ext.federated import simulate\n"
            f"assert set(strategy_names()) >= set({sorted(METHODS)!r}), strategy_names()\n")
    # run outside the checkout, so the installed package is imported as in the other tests
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


#: bottom to top; a module's layer is that of its longest prefix here. The application (app/) sits above
#: the library, except its run-folder contract (run_folder, reporting), which Flower's ServerApp writes too.
LAYERS = {"ops": 0, "reference": 0, "errors": 0, "_C": 0, "dp": 1, "data": 1, "core": 2, "strategies": 3,
          "federated": 4, "app.run_folder": 5, "app.reporting": 5, "flower": 6, "app": 7, "__main__": 8}
PACKAGE = Path(__file__).resolve().parents[1] / "fedlora_ext"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(("fedlora_ext",) + parts).removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every fedlora_ext import in ``path``, at any depth (functions, TYPE_CHECKING);
    ``from package import name`` counts as importing the submodule when ``name`` is one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlora_ext"):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the package imports absolutely"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedlora_ext")]
    return found


def _layer(dotted: str) -> str | None:
    """The LAYERS key of a module; None for the package's own __init__ (it re-exports the public API)."""
    inner = dotted.split(".", 1)[1] if "." in dotted else None
    if inner is None:
        return None
    return max((k for k in LAYERS if inner == k or inner.startswith(k + ".")), key=len)


def test_layers_import_downwards_only():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        own = _layer(module)
        if own is None:
            continue
        for line, target in _imports(path, modules):
            theirs = _layer(target)
            if theirs is not None and LAYERS[theirs] > LAYERS[own]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target} ({theirs})")
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules reach each other through imports, also inside one layer (a cycle hides an order in
    which one of them is half initialised)."""
    modules = _modules()
    graph = {m: {t for _, t in _imports(p, modules) if t in modules and t != m} for m, p in modules.items()}
    assert not _cycles(graph), "import cycles: " + "; ".join(" <-> ".join(c) for c in _cycles(graph))


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _layout_rows() -> dict[str, str]:
    """The README's module listing ("Where things are"): each ``fedlora_ext/<folder>/`` row with its
    continuation lines."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Where things are"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    rows: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith(" ") and current is not None:
            rows[current] += " " + line.strip()
        else:
            current = line.split()[0] if line.strip() else None
            if current is not None:
                rows[current] = line[len(current):]
    return rows


def test_the_readme_names_every_folder_and_module():
    rows = _layout_rows()
    missing = []
    for folder in [PACKAGE, *sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))]:
        key = "fedlora_ext/" + ("" if folder == PACKAGE else f"{folder.name}/")
        if key not in rows:
            missing.append(f"{key} (no row)")
            continue
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rows[key]))
        missing += [f"{key}{m.name}" for m in sorted(folder.glob("*.py"))
                    if not m.name.startswith("_") and m.stem not in words]
    assert not missing, "not in the README's module listing: " + ", ".join(missing)
    assert all(Path(PACKAGE.parent, key).exists() for key in rows), [k for k in rows if not Path(PACKAGE.parent, k).exists()]
