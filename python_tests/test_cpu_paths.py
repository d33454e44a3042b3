"""The CPU kernels' vector paths (AVX-512, AVX2, scalar) give bitwise the same results.

An AVX-512 CPU runs all three, so every path is built and tested on whatever machine CI gets; a CPU
without AVX-512 tests the paths it has. The noise stream in particular must not depend on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fedlora_ext
from fedlora_ext import _C, ops
from strategies import dp_clip_noise_inputs, gaussian_noise_inputs, make_tensor, weighted_sum_inputs

PATHS = fedlora_ext.build_info()["cpu_paths"]  # best first


@pytest.fixture(autouse=True)
def _restore_path():
    yield
    _C.set_cpu_path("auto")


def on_every_path(fn):
    """``fn()``'s tensors on every path this CPU runs, by path name."""
    results = {}
    for path in PATHS:
        _C.set_cpu_path(path)
        assert fedlora_ext.build_info()["cpu_path"] == path
        results[path] = fn()
    return results


def assert_bitwise_equal(results: dict) -> None:
    best, *others = results
    for path in others:
        for i, (a, b) in enumerate(zip(results[best], results[path], strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32)), \
                f"output {i}: {path} differs from {best}"


def test_the_best_path_is_the_default_and_listed_first():
    assert PATHS[-1] == "scalar" and fedlora_ext.build_info()["cpu_path"] == PATHS[0]


def test_noise_stream_is_bitwise_the_same_on_every_path():
    """Long enough for whole 128-normal batches of every width, with tensors starting mid Philox block."""
    sizes = (1, 3, 4097, 100_003, 5)

    def noise():
        xs = [torch.zeros(n) for n in sizes]
        ops.gaussian_noise_(xs, 1.7, 2**40 + 5, 2**33 - 1)
        return xs

    assert_bitwise_equal(on_every_path(noise))


@given(data=st.data())
def test_gaussian_noise_is_bitwise_the_same_on_every_path(dtype, data):
    targets, std, seed, offset = data.draw(gaussian_noise_inputs(dtype, "cpu"))

    def run():
        xs = [t.clone() for t in targets]
        ops.gaussian_noise_(xs, std, seed, offset)
        return xs

    assert_bitwise_equal(on_every_path(run))


@given(data=st.data())
def test_dp_clip_noise_is_bitwise_the_same_on_every_path(dtype, data):
    args = data.draw(dp_clip_noise_inputs(dtype, "cpu", min_batch=0))

    def run():
        outs, sums, norms = ops.dp_clip_noise_with_sum(*args)
        single, _ = ops.dp_clip_noise(*args)
        return [*outs, *sums, norms, *single, ops.per_sample_norms(args[0])]

    assert_bitwise_equal(on_every_path(run))


def test_wide_dp_clip_noise_is_bitwise_the_same_on_every_path(dtype):
    """Batches of 4 and a remainder, chunks of 4,096 columns and a tail: every loop and its tail."""
    grads = [make_tensor([7, 9001], dtype, "cpu", scale=0.05), make_tensor([7, 33], dtype, "cpu", seed=1)]
    assert_bitwise_equal(on_every_path(lambda: [*ops.dp_clip_noise_with_sum(grads, 1.0, 1.1, 7.0, 3, 4)[0]]))


@given(data=st.data())
def test_weighted_sum_is_bitwise_the_same_on_every_path(dtype, data):
    args = data.draw(weighted_sum_inputs(dtype, "cpu"))
    assert_bitwise_equal(on_every_path(lambda: [ops.weighted_sum(*args)]))


def test_an_unknown_path_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"cpu path must be one of auto, .*scalar on this CPU, got 'sse9'"):
        _C.set_cpu_path("sse9")
    assert fedlora_ext.build_info()["cpu_path"] == PATHS[0]


def _import_with(value: str, cwd) -> subprocess.CompletedProcess:
    """A fresh import with FEDLORA_CPU_PATH=value, from ``cwd`` outside the checkout (there the source
    tree's fedlora_ext/, which has no _C, would shadow the installed package)."""
    code = "import warnings, fedlora_ext; print(fedlora_ext.build_info()['cpu_path'])"
    env = {**os.environ, "FEDLORA_CPU_PATH": value}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          check=True, cwd=cwd)


@pytest.mark.parametrize("path", PATHS)
def test_environment_variable_picks_the_path_at_import(path, tmp_path):
    assert _import_with(path, tmp_path).stdout.strip() == path


def test_environment_variable_with_a_bad_value_warns_and_keeps_the_best(tmp_path):
    done = _import_with("avx9000", tmp_path)
    assert done.stdout.strip() == PATHS[0]
    assert "FEDLORA_CPU_PATH ignored" in done.stderr and "avx9000" in done.stderr
