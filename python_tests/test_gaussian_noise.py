"""``gaussian_noise_`` against its twin: ``x += std * z`` in place over a list of tensors.

The stream itself (Philox, splitting, determinism, statistics) is tested in ``test_noise*.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import MAX_ABS_NORMAL, assert_within_budget, guard_outside_view, max_abs
from fedlora_ext import ops, reference
from strategies import gaussian_noise_inputs, make_tensor, sample_inputs


def _check(targets, std, seed, offset):
    """Every tensor moved by ``std * z`` within the budget of the twin, and nothing outside it."""
    dtype = targets[0].dtype
    before = [t.clone() for t in targets]
    guards = [guard_outside_view(t, f"tensors[{j}]") for j, t in enumerate(targets)]

    ops.gaussian_noise_(targets, std, seed, offset)

    refs = [b.float() for b in before]
    reference.gaussian_noise_(refs, std, seed, offset)
    z = reference.stream_normals(seed, offset, sum(t.numel() for t in targets), targets[0].device)
    start = 0
    for j, (t, b, ref) in enumerate(zip(targets, before, refs)):
        assert t.dtype == dtype and t.shape == b.shape
        # Plain PyTorch in dtype rounds the noise and then the sum.
        plain = b + (std * z[start : start + b.numel()].view(b.shape)).to(dtype)
        magnitude = max_abs(b) + std * MAX_ABS_NORMAL
        assert_within_budget(t, ref, plain, magnitude=magnitude, terms=2, what=f"tensors[{j}]")
        start += b.numel()
    for check in guards:
        check()


@given(data=st.data())
def test_gaussian_noise_matches_twin(device, dtype, data):
    """Random lists of 1 to 4 tensors (0 to 3 dims, odd and empty sizes, strided views), std, seed, offset."""
    _check(*data.draw(gaussian_noise_inputs(dtype, device)))


@pytest.mark.parametrize("index", range(3))
def test_gaussian_noise_matches_twin_on_samples(device, index):
    """The fixed opcheck samples agree with the twin."""
    _check(*sample_inputs("gaussian_noise_", device)[index])


def test_empty_list_is_a_noop(device):
    """An empty list is valid (DESIGN.md: empty lists where the math is defined) and does nothing."""
    ops.gaussian_noise_([], 1.0, 0, 0)


def test_zero_std_leaves_tensors_bitwise(device, dtype):
    """std = 0 adds exactly nothing."""
    x = make_tensor([4, 5], dtype, device, layout="transposed")
    before = x.clone()
    ops.gaussian_noise_([x], 0.0, 3, 4)
    assert torch.equal(x, before)


def test_empty_tensors_take_no_stream_elements(device):
    """A 0-element tensor in the list consumes no stream indices: later tensors are unaffected."""
    with_empty = [torch.zeros(5, device=device), torch.zeros(0, 3, device=device), torch.zeros(6, device=device)]
    without = [torch.zeros(5, device=device), torch.zeros(6, device=device)]
    ops.gaussian_noise_(with_empty, 1.0, 9, 10)
    ops.gaussian_noise_(without, 1.0, 9, 10)
    assert torch.equal(with_empty[0], without[0]) and torch.equal(with_empty[2], without[1])
