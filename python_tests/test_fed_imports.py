"""The federated layer imports cleanly from any entry point in a fresh interpreter.

``fedlora_ext.strategies`` and ``fedlora_ext.federated`` import each other (strategies use the adapter
helpers, the simulator uses the strategies); whichever a user imports first must work, and every
method must be registered afterwards. In-process tests cannot see this: by then both are imported.
"""

from __future__ import annotations

import subprocess
import sys

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
