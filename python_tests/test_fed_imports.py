"""The federated layer imports cleanly from any entry point in a fresh interpreter, and only downwards.

Layers, bottom to top (DESIGN.md): ops -> dp/, data/, core/ (config, adapters, state types) ->
strategies/ -> federated/ (the runtime) -> apps (cli, jobs, flower/). A module imports only its own
layer or layers below it, also under ``TYPE_CHECKING`` and inside functions.
"""

from __future__ import annotations

import ast
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


LAYERS = {"ops": 0, "reference": 0, "errors": 0, "_C": 0, "dp": 1, "data": 1, "core": 2, "strategies": 3,
          "federated": 4, "reporting": 5, "run_folder": 5, "selfcheck": 5, "flower": 6, "jobs": 6, "export": 6, "cli": 7,
          "__main__": 8}
PACKAGE = Path(__file__).resolve().parents[1] / "fedlora_ext"


def _layer(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_layers_import_downwards_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "fedlora_ext." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = _layer(module)
        if own == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlora_ext"):
                targets = [node.module] if node.module != "fedlora_ext" else [f"fedlora_ext.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("fedlora_ext.")]
            else:
                continue
            for target in targets:
                theirs = _layer(target)
                if theirs != "__init__" and LAYERS[theirs] > LAYERS[own]:
                    upward.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ({own}) imports {target} ({theirs})")
    assert not upward, "\n".join(upward)
