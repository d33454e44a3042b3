"""A fast subset of opacus 1.6.0's own test suite, run plain and with every DPOptimizer through ``fuse``
(``benchmarks/opacus_suite.py``): the randomness, gradient-accumulation and scheduler tests (about 40
tests per mode; ~1-2 min on a 2-core machine, most of it two pytest start-ups and the conv-net tests of
gradient_accumulation). The full suite: ``python benchmarks/opacus_suite.py``.

Needs the opacus sdist (it ships the tests): fetched from PyPI once into the script's cache
(``~/.cache/fedlora_ext/opacus_suite`` or ``$FEDLORA_OPACUS_SUITE_CACHE``); skipped when PyPI cannot be
reached and nothing is cached.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opacus")
pytest.importorskip("hypothesis")  # opacus's tests use it

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "opacus_suite.py"


def _script():
    spec = importlib.util.spec_from_file_location("opacus_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sdist():
    suite = _script()
    version = suite.installed_opacus_version()
    try:
        return suite.fetch_sdist(version, suite.DEFAULT_CACHE, timeout=240)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"the opacus {version} sdist (its test suite) is not cached and PyPI is not reachable: "
                    f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")


@pytest.mark.slow
def test_opacus_suite_subset_passes_with_fuse(sdist, tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--modules", "randomness", "gradient_accumulation", "schedulers",
         "--json", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert result["unexpected"] == [], report
    assert proc.returncode == 0, report
    plain, fused = result["counts"]["plain"]["total"], result["counts"]["fused"]["total"]
    assert plain["failed"] == 0 and plain["passed"] >= 30, report
    assert result["counts"]["fused"]["fused_optimizers"] > 0, "the conftest did not fuse any optimizer"
    # the only fused-only failure here is the documented global-seed test, which passes with the opt-in
    expected = {d["test"] for d in result["differences"]}
    assert all("test_global_seed" in t for t in expected), expected
    assert fused["passed"] + len(expected) == plain["passed"], report
    if expected:
        assert result["global_rng_rerun"]["counts"]["failed"] == 0, report
        assert result["global_rng_rerun"]["counts"]["passed"] == len(expected), report
