"""``dp_clip_noise_with_sum``: ``dp_clip_noise`` plus the clipped sums, from one read of the gradients.

Its noised outputs and norms must be bitwise those of ``dp_clip_noise`` (same stream, same positions,
same rounding), and its sums those of ``dp_clip_noise`` with the noise off and denominator 1, within the
twin's error budget.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import assert_unchanged, assert_within_budget, max_abs
from fedlora_ext import ops, reference
from strategies import dp_clip_noise_inputs, make_tensor, sample_inputs
from test_dp_clip_noise import _plain


def _check(grads, max_norm, noise_multiplier, denominator, seed, offset):
    """Outputs bitwise ``dp_clip_noise``'s, sums within the twin's budget; inputs untouched."""
    dtype = grads[0].dtype
    before = [g.clone() for g in grads]
    outs, sums, norms = ops.dp_clip_noise_with_sum(grads, max_norm, noise_multiplier, denominator, seed, offset)

    assert len(outs) == len(sums) == len(grads)
    for out, s, g in zip(outs, sums, grads):
        for t in (out, s):
            assert t.shape == g.shape[1:] and t.dtype == dtype and t.device == g.device
            assert t.is_contiguous()
    assert norms.shape == (grads[0].shape[0],) and norms.dtype == torch.float32

    single_outs, single_norms = ops.dp_clip_noise(grads, max_norm, noise_multiplier, denominator, seed, offset)
    assert torch.equal(norms, single_norms)
    for j, (out, single) in enumerate(zip(outs, single_outs)):
        assert torch.equal(out, single), f"outs[{j}] differs from dp_clip_noise's"
    plain_sums, _ = ops.dp_clip_noise(grads, max_norm, 0.0, 1.0, seed, offset)
    for j, (s, plain) in enumerate(zip(sums, plain_sums)):
        assert torch.equal(s, plain), f"sums[{j}] differs from dp_clip_noise's noise-free sum"

    _, ref_sums, ref_norms = reference.dp_clip_noise_with_sum(
        [g.float() for g in grads], max_norm, noise_multiplier, denominator, seed, offset
    )
    width = sum(g.shape[1:].numel() for g in grads)
    z = reference.stream_normals(seed, offset, width, grads[0].device)
    plain_outs = _plain(grads, max_norm, 0.0, 1.0, z, dtype)
    _, abs_sums, _ = reference.dp_clip_noise_with_sum([g.float().abs() for g in grads], max_norm, 0.0, 1.0, 0, 0)
    terms = grads[0].shape[0] + width + 1
    for j, (s, ref, plain, mag) in enumerate(zip(sums, ref_sums, plain_outs, abs_sums)):
        assert_within_budget(s, ref, plain, magnitude=max_abs(mag), terms=terms, what=f"sums[{j}]")
    torch.testing.assert_close(norms, ref_norms, rtol=width * 2e-7 + 1e-6, atol=1e-6)
    assert_unchanged(before, grads)


@given(data=st.data())
def test_matches_dp_clip_noise_and_twin(device, dtype, data):
    """Random batches (B = 0 included), shapes (size 0, 1, odd), layouts, scalars, seeds and offsets."""
    _check(*data.draw(dp_clip_noise_inputs(dtype, device, min_batch=0)))


@pytest.mark.parametrize("index", range(3))
def test_samples(device, index):
    """The fixed opcheck samples: float32 with a sliced view, bfloat16 transposed, float16 with B = 0."""
    _check(*sample_inputs("dp_clip_noise_with_sum", device)[index])


def test_wide_rows_cross_chunks(device, dtype):
    """Per-sample widths above one 4,096-column chunk, non-contiguous, and odd widths between them."""
    grads = [make_tensor([5, 9001], dtype, device, layout="sliced"), make_tensor([5, 5], dtype, device, seed=1),
             make_tensor([5, 4097], dtype, device, layout="transposed", seed=2)]
    _check(grads, 1.0, 1.3, 4.0, 11, 2**33 + 1)


def test_empty_batch_gives_zero_sums_and_pure_noise(device, dtype):
    """B = 0: the sums are zero and the outputs are the noise of dp_clip_noise."""
    grads = [make_tensor([0, 3, 4], dtype, device), make_tensor([0, 5], dtype, device)]
    outs, sums, norms = ops.dp_clip_noise_with_sum(grads, 2.0, 1.5, 8.0, 21, 22)
    assert norms.shape == (0,)
    for s in sums:
        assert torch.equal(s, torch.zeros_like(s))
    single, _ = ops.dp_clip_noise(grads, 2.0, 1.5, 8.0, 21, 22)
    for out, expected in zip(outs, single):
        assert torch.equal(out, expected)


def test_twin_outputs_are_the_noised_sums(device):
    """In the twin, ``outs = (sums + sigma C z) / denominator`` with z the stream, and ``outs`` and the
    norms are those of ``reference.dp_clip_noise``."""
    grads = [make_tensor([3, 4, 2], torch.float32, device), make_tensor([3, 5], torch.float32, device, seed=1)]
    outs, sums, norms = reference.dp_clip_noise_with_sum(grads, 0.7, 1.2, 3.0, 5, 6)
    single, single_norms = reference.dp_clip_noise(grads, 0.7, 1.2, 3.0, 5, 6)
    assert torch.equal(norms, single_norms)
    z = reference.stream_normals(5, 6, 13, device)
    noise = [z[:8].view(4, 2), z[8:]]
    for out, s, expected, n in zip(outs, sums, single, noise):
        assert torch.equal(out, expected)
        torch.testing.assert_close(out, (s + 1.2 * 0.7 * n) / 3.0)


def test_errors_name_this_op(device):
    """Bad scalars are refused with a message naming this op and the argument."""
    grads = [make_tensor([2, 3], torch.float32, device)]
    with pytest.raises(ValueError, match=r"fedlora\.dp_clip_noise_with_sum: max_norm must be > 0"):
        ops.dp_clip_noise_with_sum(grads, 0.0, 1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match=r"fedlora\.dp_clip_noise_with_sum: denominator"):
        ops.dp_clip_noise_with_sum(grads, 1.0, 1.0, -1.0, 0, 0)
    with pytest.raises(ValueError, match=r"dp_clip_noise_with_sum: per_sample_grads"):
        ops.dp_clip_noise_with_sum([], 1.0, 1.0, 1.0, 0, 0)
