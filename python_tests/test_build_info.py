"""``fedlora_ext.build_info()`` and ``native_available()``: how the native library was built."""

from __future__ import annotations

import torch

import fedlora_ext


def test_native_library_is_loaded():
    """The compiled library imported and registered the ops (no fallback-to-twins warning case)."""
    assert fedlora_ext.native_available() is True
    ops = ("per_sample_norms", "dp_clip_noise", "gaussian_noise_", "weighted_sum", "stacked_delta", "stacked_delta_")
    for op in ops:
        assert hasattr(torch.ops.fedlora, op)


def test_build_info_keys_and_types():
    """The documented keys with the documented types."""
    info = fedlora_ext.build_info()
    assert {"torch_version", "cuda", "cuda_archs", "openmp", "num_threads"} <= set(info)
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_build_info_torch_version_is_the_running_torch():
    """Built against the torch that runs it (ABI), compared without the local ``+cpu``/``+cu12x`` suffix."""
    assert fedlora_ext.build_info()["torch_version"] == torch.__version__.split("+")[0]


def test_cuda_archs_only_with_cuda():
    """A build without CUDA kernels lists no CUDA architectures; one with them lists some."""
    info = fedlora_ext.build_info()
    assert bool(info["cuda_archs"]) == info["cuda"]


def test_num_threads_follows_torch(restore_num_threads):
    """``num_threads`` is the intra-op thread count in effect now, not the one at import."""
    torch.set_num_threads(1)
    assert fedlora_ext.build_info()["num_threads"] == 1
