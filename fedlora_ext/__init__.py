"""fedlora_ext: private, communication-efficient federated LoRA fine-tuning with fused torch ops.

Importing the package loads the native library, which registers the ``torch.ops.fedlora`` operators.
A missing or broken native library warns instead of failing the import, so the pure-PyTorch twins in
:mod:`fedlora_ext.reference` stay usable; :func:`native_available` tells which case you are in.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before our library)

__version__ = "0.1.0"

try:
    from fedlora_ext import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    _C = None
    warnings.warn(
        f"fedlora_ext: the native library could not be loaded ({error}); torch.ops.fedlora is "
        f"unavailable. Imported from {__file__}: if that is a source checkout, run from another "
        "directory or install with `pip install --no-build-isolation -e .`; otherwise reinstall with "
        "`pip install --no-build-isolation .` against the torch you use.",
        RuntimeWarning,
        stacklevel=2,
    )

from fedlora_ext import ops, reference  # noqa: E402


def native_available() -> bool:
    """Whether the compiled library is loaded and the ``torch.ops.fedlora`` ops are registered."""
    return _C is not None


def build_info() -> dict:
    """How the native library was built.

    Returns:
        A dict with ``torch_version`` (the torch it was compiled against), ``cuda`` (whether CUDA
        kernels are compiled in), ``cuda_archs`` (their architectures, e.g. ``["90-real"]``),
        ``openmp``, ``num_threads`` (the intra-op thread count now in effect), ``cpu_path`` (the vector
        path the CPU kernels take now: ``"avx512"``, ``"avx2"`` or ``"scalar"``; the best this CPU runs
        unless ``FEDLORA_CPU_PATH`` at import or ``fedlora_ext._C.set_cpu_path`` picked another) and
        ``cpu_paths`` (those this CPU runs, best first; every one gives bitwise the same results).
    """
    if _C is None:
        raise RuntimeError("fedlora_ext: the native library is not loaded; see the import warning")
    return dict(_C.build_info())


__all__ = ["build_info", "native_available", "ops", "reference", "__version__"]
