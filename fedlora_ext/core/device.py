"""Where a run's tensors live and in which precision: the device and base dtype a ``FedConfig`` asks
for, checked against what torch sees, and the autocast context a forward over a 16-bit base runs in.

Only transport, checkpoints and exported files are CPU tensors; everything that trains, evaluates or
aggregates is on the run's device. A 16-bit base keeps its weights in 16 bits; what trains (adapters, the
head, optimizer state) stays float32, and the forward runs under autocast so the two meet in 16 bits
with float32 gradients for the float32 parameters.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the current GPU when torch sees one, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises:
        ValueError: a GPU was asked for that this torch cannot use (one line: what was asked, what torch sees).
    """
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None \
                else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
            raise ValueError(f"device {name!r}: {build}; use --device cpu (or auto, which falls back to the CPU)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of ``model_dtype``; None for ``"auto"`` (the checkpoint's own)."""
    return None if name == "auto" else DTYPES[name]


class SlowBaseWarning(UserWarning):
    """A 16-bit base on a CPU without native matrix units for that dtype: slower than float32 there."""


#: /proc/cpuinfo flags of native 16-bit matrix units, per dtype (AMX tiles, AVX-512 dot products)
NATIVE_16BIT_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: then torch is asked)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_16bit(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix units for ``dtype`` (the cpuinfo flags, else torch's own probes)."""
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in NATIVE_16BIT_FLAGS[dtype])
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported") if dtype == torch.bfloat16 \
        else ("_is_amx_fp16_supported",)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def warn_slow_base(device: str, model_dtype: str) -> None:
    """One :class:`SlowBaseWarning` when a ``bfloat16``/``float16`` base would run on a CPU without native
    matrix units for it (there torch emulates 16-bit matmuls, slower than float32). ``auto`` is not
    checked: the checkpoint's dtype is not known before it is loaded."""
    dtype = resolve_dtype(model_dtype) if model_dtype in DTYPES else None
    if dtype not in NATIVE_16BIT_FLAGS:
        return
    try:
        where = resolve_device(device)
    except (ValueError, RuntimeError):  # refused later, in one line, where the run places its model
        return
    if where.type == "cpu" and not native_16bit(dtype):
        units = "bf16" if dtype == torch.bfloat16 else "fp16"
        warnings.warn(f"a 16-bit base on this CPU (no native {units} matrix units) is slower than float32; "
                      "--dtype float32 trains faster here", SlowBaseWarning, stacklevel=2)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's base weights (its input embeddings)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.dtype
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(model: nn.Module):
    """Autocast to the base's 16-bit dtype on the model's device (a no-op context over a float32 base)."""
    dtype = base_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def to_device(batch, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (non-blocking from pinned memory; other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
