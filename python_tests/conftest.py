"""Shared pytest configuration: hypothesis profiles and the device parametrisation.

Profiles (select with the environment variable ``HYPOTHESIS_PROFILE``):

* ``ci`` (default): few examples per property, so the whole suite runs in a few minutes on 2 cores.
* ``dev``: many more examples, for a local fuzzing session.

Every op test takes a ``device`` argument from :data:`DEVICES`: ``"cpu"`` always, ``"cuda"`` marked with
the ``cuda`` marker and skipped unless a GPU is present *and* the CUDA kernels are registered, so a
CPU-only torch or a build without ``.cu`` files skips cleanly instead of failing.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import fedlora_ext  # noqa: F401  (registers torch.ops.fedlora before any test module imports ops)

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,  # first calls pay for lazy init (OpenMP pool, dispatcher caches)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def cuda_kernels_available() -> bool:
    """Whether a GPU is visible and this build registered the fedlora CUDA kernels."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fedlora::weighted_sum", "CUDA"
    )


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not cuda_kernels_available(), reason="no GPU or no fedlora CUDA kernels"),
        ],
    ),
]

# The dtypes every op accepts (DESIGN.md, "Op contracts").
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, id="float16"),
]


def pytest_configure(config):
    """Silence a deprecation that torch's own opcheck internals raise (not ours to fix)."""
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_generate_tests(metafunc):
    """Parametrise every test that takes ``device`` or ``dtype`` over :data:`DEVICES` / :data:`DTYPES`.

    Plain parameters, not fixtures: hypothesis rejects function-scoped fixtures in ``@given`` tests.
    A test that parametrises the name itself keeps its own values.
    """
    own = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = names.split(",")
        own.update(name.strip() for name in names)
    if "device" in metafunc.fixturenames and "device" not in own:
        metafunc.parametrize("device", DEVICES)
    if "dtype" in metafunc.fixturenames and "dtype" not in own:
        metafunc.parametrize("dtype", DTYPES)


@pytest.fixture
def restore_num_threads():
    """Give back the intra-op thread count a test changes."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)
