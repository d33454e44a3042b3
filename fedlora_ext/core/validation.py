"""Checks on a client's upload before it may enter an aggregate.

A reply that crossed a network is untrusted input: the server compares it with a template of what the
method uploads at that client's rank (names, shapes, dtypes, as meta tensors) and refuses anything
else, non-finite values included, with a reason that names the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class RejectedUpdate(ValueError):
    """An upload that must not enter the aggregate; the message says which tensor and why."""


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _preview(names) -> str:
    names = sorted(names)
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_tensor(name: str, tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """One uploaded tensor: a dense CPU-or-any-device tensor of ``shape`` and ``dtype``, finite."""
    if not isinstance(tensor, Tensor):
        raise RejectedUpdate(f"tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
    if tensor.layout != torch.strided:
        raise RejectedUpdate(f"tensor {name!r} has layout {tensor.layout}, expected a dense tensor")
    if tensor.dtype != dtype:
        raise RejectedUpdate(f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
    if _shape(tensor) != tuple(shape):
        raise RejectedUpdate(f"tensor {name!r} has shape {_shape(tensor)}, expected {tuple(shape)}")
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise RejectedUpdate(f"tensor {name!r} has {bad} non-finite values (NaN or Inf)")


def check_names(got, expected) -> None:
    """Exactly the expected names: none missing, none extra."""
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing:
        raise RejectedUpdate(f"missing tensors {_preview(missing)}")
    if extra:
        raise RejectedUpdate(f"unexpected tensors {_preview(extra)}")


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """``tensors`` has exactly the names of ``expected`` (templates, e.g. meta tensors) with their shapes
    and dtypes, and only finite values; raises :class:`RejectedUpdate` otherwise."""
    check_names(tensors, expected)
    for name, template in expected.items():
        check_tensor(name, tensors[name], _shape(template), template.dtype)
