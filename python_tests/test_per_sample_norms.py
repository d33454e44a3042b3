"""``per_sample_norms`` against its twin: flat per-sample L2 norms over a list of ``[B, ...]`` tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import assert_unchanged, assert_within_budget
from fedlora_ext import ops, reference
from strategies import make_tensor, per_sample_norms_inputs, sample_inputs


def _plain(grads, dtype):
    """The norms with plain PyTorch in ``dtype``: one norm per tensor, then the norm of the norms."""
    per_tensor = [g.to(dtype).reshape(g.shape[0], g.shape[1:].numel()).norm(2, dim=1) for g in grads]
    return torch.stack(per_tensor, dim=1).norm(2, dim=1).float()


def _check(grads):
    """float32 ``[B]`` norms within the budget of the twin; inputs untouched."""
    before = [g.clone() for g in grads]
    out = ops.per_sample_norms(grads)
    batch = grads[0].shape[0]
    assert out.shape == (batch,) and out.dtype == torch.float32 and out.device == grads[0].device
    ref = reference.per_sample_norms(grads)
    terms = sum(g.shape[1:].numel() for g in grads)
    magnitude = ref.max().item() if batch else 0.0
    assert_within_budget(out, ref, _plain(grads, grads[0].dtype), magnitude=magnitude, terms=terms, what="norms")
    assert_unchanged(before, grads)


@given(data=st.data())
def test_per_sample_norms_matches_twin(device, dtype, data):
    """Random batch sizes (B >= 1; B = 0 has its own test), tensor counts, shapes and layouts."""
    _check(*data.draw(per_sample_norms_inputs(dtype, device)))


@pytest.mark.parametrize("index", range(3))
def test_per_sample_norms_on_samples(device, index):
    """The fixed opcheck samples (B = 0 included) give the right shape and values."""
    (grads,) = sample_inputs("per_sample_norms", device)[index]
    out = ops.per_sample_norms(grads)
    batch = grads[0].shape[0]
    expected = torch.stack([g.double().reshape(batch, g.shape[1:].numel()).pow(2).sum(dim=1) for g in grads])
    expected = expected.sum(dim=0).sqrt()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_empty_batch_gives_empty_norms(device, dtype):
    """B = 0 (an empty Poisson batch) is valid: float32 norms of shape [0]."""
    out = ops.per_sample_norms([make_tensor([0, 3, 4], dtype, device), make_tensor([0], dtype, device)])
    assert out.shape == (0,) and out.dtype == torch.float32


def test_twin_accepts_empty_batch(device):
    """The twin, like the op, must accept B = 0 (DESIGN.md: B = 0 is valid)."""
    out = reference.per_sample_norms([make_tensor([0, 3, 4], torch.float32, device)])
    assert out.shape == (0,)


def test_zero_width_tensors_contribute_nothing(device, dtype):
    """A ``[B, 0]`` gradient adds 0 to every norm."""
    g = make_tensor([3, 5], dtype, device)
    out = ops.per_sample_norms([g, make_tensor([3, 0], dtype, device)])
    torch.testing.assert_close(out, ops.per_sample_norms([g]), rtol=0, atol=0)


def test_wide_rows_cross_chunks(device, dtype):
    """Per-sample widths above one 4,096-column chunk, in several tensors, summed across chunks."""
    grads = [make_tensor([3, 9001], dtype, device, layout="sliced"), make_tensor([3, 4097], dtype, device, seed=1)]
    _check(grads)
