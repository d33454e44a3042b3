"""Small things users reach for (issue 26, item 6): ``fedlora --version`` and the version in ``fedlora
info``; the one-line warning that a 16-bit base on a CPU without native 16-bit matrix units is slower than
float32 (the CPU's capability faked both ways)."""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import fedlora_ext
from fedlora_ext.app.cli import main
from fedlora_ext.core import device
from fedlora_ext.core.device import SlowBaseWarning, warn_slow_base
from fedtools import fedlora

ROOT = Path(__file__).resolve().parent.parent
SLOW = "a 16-bit base on this CPU (no native {} matrix units) is slower than float32"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_prints_the_package_version_and_exits_0(tmp_path):
    done = fedlora("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"fedlora_ext {project_version()}\n" and done.stderr == ""
    assert fedlora_ext.__version__ == project_version()


def test_info_shows_the_version(tmp_path):
    done = fedlora("info", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["version"] == project_version() and "torch_version" in info


@pytest.fixture
def cpu(monkeypatch):
    """Sets the CPU's flags (and torch's probes, read only when /proc/cpuinfo has no flags)."""
    def fake(flags=(), probes=()):
        monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
            monkeypatch.setattr(torch.cpu, name, lambda name=name: name in probes, raising=False)
    return fake


def warned(device_name: str, dtype: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_slow_base(device_name, dtype)
    assert all(issubclass(w.category, SlowBaseWarning) for w in caught)
    return [str(w.message) for w in caught]


def test_a_16_bit_base_on_a_cpu_without_matrix_units_warns(cpu):
    cpu(flags={"avx2", "fma", "avx512f"})
    assert len(warned("cpu", "bfloat16")) == 1 and warned("cpu", "bfloat16")[0].startswith(SLOW.format("bf16"))
    assert warned("cpu", "float16")[0].startswith(SLOW.format("fp16"))
    if not torch.cuda.is_available():  # auto is the CPU here
        assert warned("auto", "bfloat16") != []
    assert warned("cpu", "float32") == [] and warned("cpu", "auto") == []


@pytest.mark.parametrize("flag, dtype", [("amx_bf16", "bfloat16"), ("avx512_bf16", "bfloat16"),
                                         ("amx_fp16", "float16"), ("avx512_fp16", "float16")])
def test_native_matrix_units_do_not_warn(cpu, flag, dtype):
    cpu(flags={"avx2", flag})
    assert warned("cpu", dtype) == []


def test_without_cpuinfo_flags_torch_is_asked(cpu):
    cpu(flags=(), probes=("_is_avx512_bf16_supported",))
    assert warned("cpu", "bfloat16") == []
    assert warned("cpu", "float16") != []  # bf16 units do not make float16 fast
    cpu(flags=(), probes=())
    assert warned("cpu", "bfloat16") != []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU request refused on a CPU-only machine")
def test_a_gpu_device_is_not_judged_here(cpu):
    cpu(flags={"avx2"})
    assert warned("cuda", "bfloat16") == []  # refused later, in one line, where the run places its model


def test_the_cli_prints_it_as_one_warning_line(cpu, tmp_path, capsys):
    """``fedlora run --dtype bfloat16`` on such a CPU: one ``fedlora: warning:`` line before the run (here
    refused at once for a dataset that does not exist, so nothing trains)."""
    cpu(flags={"avx2"})
    code = main(["run", "--model", "tiny-bert", "--dtype", "bfloat16", "--dataset", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "r"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("fedlora: warning: " + SLOW.format("bf16")), lines
    assert lines[1].startswith("fedlora: error: dataset"), lines
    cpu(flags={"avx2", "amx_bf16"})
    main(["run", "--model", "tiny-bert", "--dtype", "bfloat16", "--dataset", str(tmp_path / "none.csv"),
          "--out", str(tmp_path / "r"), "--quiet"])
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == []
