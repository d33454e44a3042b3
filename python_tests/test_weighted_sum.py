"""``weighted_sum`` against its twin: FedAvg, HetLoRA zero-padding and LoRA-A2 per-rank weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from budget import assert_unchanged, assert_within_budget, max_abs
from fedlora_ext import ops, reference
from strategies import make_tensor, sample_inputs, weighted_sum_inputs


def _pad(x, dim: int, out_rank: int):
    """``x`` zero-padded to ``out_rank`` at the end of ``dim`` (HetLoRA's padding)."""
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, out_rank - x.shape[dim]])


def _plain(xs, weights, rank_dim, out_rank, dtype):
    """The same math in ``dtype`` with plain PyTorch: every product and sum rounded to ``dtype``."""
    dim = rank_dim % xs[0].dim()
    total = None
    for k, x in enumerate(xs):
        w = weights[k].to(dtype)
        if weights.dim() == 2:  # per-rank weights broadcast along rank_dim
            shape = [1] * x.dim()
            shape[dim] = out_rank
            w = w.view(shape)
        term = w * _pad(x.to(dtype), dim, out_rank)
        total = term if total is None else total + term
    return total


def _check(xs, weights, rank_dim, out_rank):
    """Run the op and compare with the twin (float32) within the error budget."""
    dtype = xs[0].dtype
    before = [x.clone() for x in xs] + [weights.clone()]
    out = ops.weighted_sum(xs, weights, rank_dim, out_rank)

    expected_shape = list(xs[0].shape)
    expected_shape[rank_dim] = out_rank
    assert out.shape == tuple(expected_shape)
    assert out.dtype == dtype and out.device == xs[0].device

    ref = reference.weighted_sum([x.float() for x in xs], weights, rank_dim, out_rank)
    magnitude = max_abs(reference.weighted_sum([x.float().abs() for x in xs], weights.abs(), rank_dim, out_rank))
    plain = _plain(xs, weights, rank_dim, out_rank, dtype)
    assert_within_budget(out, ref, plain, magnitude=magnitude, terms=len(xs), what="weighted_sum")
    assert_unchanged(before, list(xs) + [weights])


@given(data=st.data())
def test_weighted_sum_matches_twin(device, dtype, data):
    """Random shapes, layouts, ranks (including 0), K, rank_dim (including negative), weights."""
    _check(*data.draw(weighted_sum_inputs(dtype, device)))


@pytest.mark.parametrize("index", range(3))
def test_weighted_sum_matches_twin_on_samples(device, index):
    """The fixed opcheck samples also agree with the twin."""
    _check(*sample_inputs("weighted_sum", device)[index])


@given(data=st.data())
def test_one_hot_weights_pad_exactly(device, dtype, data):
    """Weights that pick one client make the op pure data movement: bitwise equal to zero-padding."""
    xs, _, rank_dim, out_rank = data.draw(weighted_sum_inputs(dtype, device))
    pick = data.draw(st.integers(0, len(xs) - 1))
    weights = torch.zeros(len(xs), device=device)
    weights[pick] = 1.0
    out = ops.weighted_sum(xs, weights, rank_dim, out_rank)
    assert torch.equal(out, _pad(xs[pick], rank_dim % xs[0].dim(), out_rank))


@given(data=st.data())
def test_one_hot_per_rank_weights_select_exactly(device, dtype, data):
    """``[K, out_rank]`` one-hot weights (LoRA-A2 masks) copy rank ``j`` of the chosen client, or 0."""
    xs, _, rank_dim, out_rank = data.draw(weighted_sum_inputs(dtype, device))
    dim = rank_dim % xs[0].dim()
    # For each rank component: the client it comes from, or None for a masked (all-zero) rank.
    owner = st.one_of(st.none(), st.integers(0, len(xs) - 1))
    owners = data.draw(st.lists(owner, min_size=out_rank, max_size=out_rank))
    weights = torch.zeros(len(xs), out_rank, device=device)
    expected_shape = list(xs[0].shape)
    expected_shape[dim] = out_rank
    expected = torch.zeros(expected_shape, dtype=dtype, device=device)
    for j, k in enumerate(owners):
        if k is not None:
            weights[k, j] = 1.0
            expected.select(dim, j).copy_(_pad(xs[k], dim, out_rank).select(dim, j))
    out = ops.weighted_sum(xs, weights, rank_dim, out_rank)
    assert torch.equal(out, expected)


def test_fedavg_equal_ranks(device, dtype):
    """FedAvg: ``[K]`` weights summing to 1 over clients of the same rank average them."""
    xs = [make_tensor([7, 4], dtype, device, seed=k) for k in range(3)]
    weights = torch.tensor([0.5, 0.25, 0.25], device=device)
    _check(xs, weights, 1, 4)


def test_rank_zero_clients_and_out_rank_zero(device, dtype):
    """Clients of rank 0 contribute nothing; out_rank = 0 gives an empty output of the right shape."""
    xs = [make_tensor([5, 0], dtype, device), make_tensor([5, 2], dtype, device, seed=1)]
    out = ops.weighted_sum(xs, torch.tensor([3.0, 1.0], device=device), 1, 3)
    assert torch.equal(out, _pad(xs[1], 1, 3))
    empty = ops.weighted_sum([make_tensor([5, 0], dtype, device)], torch.ones(1, device=device), -1, 0)
    assert empty.shape == (5, 0)


@pytest.mark.parametrize("per_rank", [False, True], ids=["per_client", "per_rank"])
def test_wide_rows_cross_tiles(device, dtype, per_rank):
    """Rows wider than one tile of the CPU kernel (2,048 columns) and many rows (> 1 tile of rows)."""
    xs = [
        make_tensor([3, 4, 1001], dtype, device, layout="sliced"),
        make_tensor([3, 2, 1001], dtype, device, seed=1),
        make_tensor([3, 5, 1001], dtype, device, layout="transposed", seed=2),
    ]
    weights = make_tensor([3, 5] if per_rank else [3], torch.float32, device, seed=3)
    _check(xs, weights, 1, 5)
    tall = [make_tensor([9000, 3], dtype, device, seed=4), make_tensor([9000, 1], dtype, device, seed=5)]
    _check(tall, make_tensor([2, 3] if per_rank else [2], torch.float32, device, seed=6), -1, 3)
