"""``stacked_delta`` and ``stacked_delta_`` against their twins (FLoRA stacking, FedEx-LoRA residual)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import assert_unchanged, assert_within_budget, eps, guard_outside_view, max_abs
from fedlora_ext import ops, reference
from strategies import make_tensor, sample_inputs, stacked_delta_inplace_inputs, stacked_delta_inputs


def _plain_delta(Bs, As, weights, scale, dtype):
    """``scale * sum_k w_k B_k @ A_k`` with plain PyTorch in ``dtype`` (every step rounded)."""
    m, n = Bs[0].shape[0], As[0].shape[1]
    total = torch.zeros(m, n, dtype=dtype, device=Bs[0].device)
    for w, B, A in zip(weights, Bs, As):
        total = total + w.to(dtype) * (B.to(dtype) @ A.to(dtype))
    return total * scale


def _magnitude(Bs, As, weights, scale) -> float:
    """``max |scale| sum_k |w_k| |B_k| @ |A_k|``: the size of the terms each output element sums."""
    if not Bs:
        return 0.0
    abs_Bs, abs_As = [B.float().abs() for B in Bs], [A.float().abs() for A in As]
    return max_abs(reference.stacked_delta(abs_Bs, abs_As, weights.abs(), abs(scale)))


def _check(Bs, As, weights, scale):
    """Out-of-place op vs twin within the error budget; inputs untouched."""
    dtype = Bs[0].dtype
    before = [x.clone() for x in [*Bs, *As, weights]]
    out = ops.stacked_delta(Bs, As, weights, scale)
    assert out.shape == (Bs[0].shape[0], As[0].shape[1]) and out.dtype == dtype
    ref = reference.stacked_delta([B.float() for B in Bs], [A.float() for A in As], weights, scale)
    plain = _plain_delta(Bs, As, weights, scale, dtype)
    rank = sum(B.shape[1] for B in Bs)
    magnitude = _magnitude(Bs, As, weights, scale)
    assert_within_budget(out, ref, plain, magnitude=magnitude, terms=rank + 1, what="stacked_delta")
    assert_unchanged(before, [*Bs, *As, weights])


def _check_inplace(W, Bs, As, weights, scale, transpose):
    """In-place op vs twin: W updated within the budget, only inside its view; factors untouched."""
    dtype = W.dtype
    before = [x.clone() for x in [*Bs, *As, weights]]
    W_before = W.clone()
    check_outside = guard_outside_view(W, "W")  # e.g. the other columns of a sliced W

    ops.stacked_delta_(W, Bs, As, weights, scale, transpose)

    ref = W_before.float()
    reference.stacked_delta_(ref, [B.float() for B in Bs], [A.float() for A in As], weights, scale, transpose)
    if Bs:
        delta = _plain_delta(Bs, As, weights, scale, dtype)
        plain = W_before + (delta.T if transpose else delta)
    else:
        plain = W_before
    magnitude = max_abs(W_before) + _magnitude(Bs, As, weights, scale)
    rank = sum(B.shape[1] for B in Bs)
    assert_within_budget(W, ref, plain, magnitude=magnitude, terms=rank + 2, what="stacked_delta_ W")
    check_outside()
    assert_unchanged(before, [*Bs, *As, weights])


@given(data=st.data())
def test_stacked_delta_matches_twin(device, dtype, data):
    """Random m, n (including 0 and 1), K >= 1, ranks (including 0), layouts, weights and scale."""
    _check(*data.draw(stacked_delta_inputs(dtype, device)))


@given(data=st.data())
def test_stacked_delta_inplace_matches_twin(device, dtype, data):
    """Random in-place calls, K = 0 and transpose=True included."""
    _check_inplace(*data.draw(stacked_delta_inplace_inputs(dtype, device)))


@pytest.mark.parametrize("index", range(3))
def test_stacked_delta_matches_twin_on_samples(device, index):
    """The fixed opcheck samples also agree with the twin."""
    _check(*sample_inputs("stacked_delta", device)[index])


@pytest.mark.parametrize("index", range(3))
def test_stacked_delta_inplace_matches_twin_on_samples(device, index):
    """The fixed opcheck samples (K = 0 included) also agree with the twin."""
    _check_inplace(*sample_inputs("stacked_delta_", device)[index])


def test_empty_factor_lists_leave_w_alone(device, dtype):
    """K = 0: nothing to add, W is bitwise unchanged."""
    W = make_tensor([4, 3], dtype, device)
    W_before = W.clone()
    ops.stacked_delta_(W, [], [], torch.zeros(0, device=device), 2.0)
    assert torch.equal(W, W_before)


def test_inplace_equals_out_of_place(device, dtype):
    """``W += stacked_delta(...)`` and ``stacked_delta_(W, ...)`` agree; transpose adds the transpose."""
    Bs = [make_tensor([6, 2], dtype, device, seed=1), make_tensor([6, 3], dtype, device, seed=2)]
    As = [make_tensor([2, 5], dtype, device, seed=3), make_tensor([3, 5], dtype, device, seed=4)]
    weights = torch.tensor([0.7, -0.3], device=device)
    delta = ops.stacked_delta(Bs, As, weights, 0.5)
    W = torch.zeros(5, 6, dtype=dtype, device=device)
    ops.stacked_delta_(W, Bs, As, weights, 0.5, transpose=True)
    # From a zero W the in-place result is the delta rounded once; allow for a different sum order and,
    # where a bfloat16 W takes a bfloat16 GEMM (CUDA; a CPU with AVX512-BF16), for the factors w_k scale B_k
    # rounded to bfloat16 before it: a couple of ulps of the largest element.
    if dtype == torch.bfloat16:
        torch.testing.assert_close(W, delta.T, rtol=0.0, atol=4 * eps(dtype) * max_abs(delta))
    else:
        torch.testing.assert_close(W, delta.T)


def test_fedex_residual_cancels(device):
    """FedEx-LoRA: adding ``B @ A`` and then the same pair with weight -1 restores W (float32)."""
    W = make_tensor([8, 7], torch.float32, device)
    W_before = W.clone()
    B, A = make_tensor([8, 3], torch.float32, device, seed=1), make_tensor([3, 7], torch.float32, device, seed=2)
    ops.stacked_delta_(W, [B, B], [A, A], torch.tensor([1.0, -1.0], device=device), 1.0)
    torch.testing.assert_close(W, W_before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_low_precision_row_blocks(device, transpose):
    """bfloat16 W taller than one 256-row block of the CPU kernel, non-contiguous, both orientations."""
    m, n = 300, 600
    Bs = [make_tensor([m, 4], torch.bfloat16, device, seed=1)]
    As = [make_tensor([4, n], torch.bfloat16, device, seed=2)]
    W = make_tensor([n, m] if transpose else [m, n], torch.bfloat16, device, layout="transposed", seed=3)
    _check_inplace(W, Bs, As, torch.tensor([0.8], device=device), 0.25, transpose)


@pytest.mark.parametrize("threads", [1, 2])
def test_stacking_split_across_threads(device, dtype, threads):
    """Factors big enough that the CPU kernel stacks them in several tasks (each a share of B_s's and of
    A_s's rows), with the ranks that take the fixed-width copies (8, 16, 32) and one that does not (5)."""
    m, n, ranks = 300, 260, [8, 16, 5, 32, 8]
    Bs = [make_tensor([m, r], dtype, device, seed=10 + k) for k, r in enumerate(ranks)]
    As = [make_tensor([r, n], dtype, device, layout="transposed" if k == 1 else "contiguous", seed=20 + k)
          for k, r in enumerate(ranks)]
    weights = torch.tensor([0.4, -0.2, 0.15, 0.25, 0.4], device=device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(Bs, As, weights, 1.5)
        _check_inplace(make_tensor([m, n], dtype, device, seed=3), Bs, As, weights, 1.5, transpose=False)
        _check_inplace(make_tensor([n, m], dtype, device, seed=4), Bs, As, weights, 1.5, transpose=True)
    finally:
        torch.set_num_threads(previous)
