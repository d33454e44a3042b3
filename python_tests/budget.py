"""Tolerances as an error budget (the flash-attention test recipe).

A kernel output is compared with a high-precision reference (the twin run on float32 copies of the
inputs: float32 accumulation, far more precise than bfloat16 / float16), and its error may be at most
``factor`` times the error that plain PyTorch makes doing the same math in the output dtype, plus a
small floor. The floor has a part relative to the magnitude of the summed terms, which covers rounding
the output once and, for float32 outputs, summing in another order than the twin, and an absolute
part for outputs near zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# The largest |z| of the noise stream: sqrt(-2 ln 2^-24) ~ 5.77 (24-bit uniforms, never 0).
MAX_ABS_NORMAL = 5.8

# Absolute floor per output dtype, about one unit in the last place of a value of size 1.
ABS_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps


def max_abs(x: Tensor) -> float:
    """``max |x|`` in float64, 0 for an empty tensor."""
    return x.double().abs().max().item() if x.numel() else 0.0


def assert_within_budget(
    out: Tensor,
    ref: Tensor,
    plain: Tensor,
    *,
    magnitude: float = 0.0,
    terms: int = 1,
    factor: float = 2.0,
    what: str = "output",
) -> None:
    """Assert ``max|out - ref| <= factor * max|plain - ref| + floor``.

    Args:
        out: the kernel's output, in its dtype.
        ref: the reference, in float32 or float64, same shape.
        plain: plain PyTorch doing the same math in ``out``'s dtype.
        magnitude: ``max`` of the sum of absolute terms (``sum_k |w_k x_k|``), the scale of rounding.
        terms: how many terms each output element sums (reassociation error grows with it).
        factor: how many times plain PyTorch's error the kernel may make.
        what: name for the failure message.
    """
    assert out.shape == ref.shape == plain.shape, (out.shape, ref.shape, plain.shape)
    kernel_err = max_abs(out.double() - ref.double())
    plain_err = max_abs(plain.double() - ref.double())
    # Rounding the output once costs eps/2 of the magnitude; summing `terms` values in another order
    # than the reference costs up to about terms * eps in float32 accumulation.
    floor = ABS_FLOOR[out.dtype] + (eps(out.dtype) + terms * eps(torch.float32)) * magnitude
    budget = factor * plain_err + floor
    assert kernel_err <= budget, (
        f"{what}: kernel error {kernel_err:.3g} exceeds the budget {budget:.3g} "
        f"({factor} x plain {out.dtype} error {plain_err:.3g} + floor {floor:.3g})"
    )


def assert_unchanged(before: list[Tensor], after: list[Tensor], what: str = "input") -> None:
    """Assert that tensors an op must not write are bitwise what they were (``before`` are clones)."""
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(b, a), f"{what}[{i}] was modified"


def guard_outside_view(t: Tensor, what: str = "tensor") -> Callable[[], None]:
    """Snapshot the storage around a view; the returned check asserts nothing outside it was written.

    An in-place op on a strided view (e.g. every other column) must leave the other elements of the
    base tensor alone, even if the kernel works on a contiguous copy and writes it back.
    """
    base = t._base if t._base is not None else t
    inside = torch.zeros_like(base, dtype=torch.bool)
    inside.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset()).fill_(True)
    before = base.clone()

    def check() -> None:
        assert torch.equal(base[~inside], before[~inside]), f"wrote outside {what}'s view"

    return check
