"""``dp_clip_noise`` against its twin: clip per sample, sum, add the noise stream, divide."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import MAX_ABS_NORMAL, assert_unchanged, assert_within_budget, max_abs
from fedlora_ext import ops, reference
from strategies import dp_clip_noise_inputs, make_tensor, sample_inputs


def _plain(grads, max_norm, noise_multiplier, denominator, z, dtype):
    """The same step with plain PyTorch in ``dtype`` (opacus with low-precision parameters)."""
    norms = reference.per_sample_norms(grads)
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0).to(dtype)
    outs, start = [], 0
    for g in grads:
        summed = torch.einsum("i,i...->...", clip, g.to(dtype))
        size = summed.numel()
        noise = (noise_multiplier * max_norm * z[start : start + size].view(summed.shape)).to(dtype)
        outs.append((summed + noise) / denominator)
        start += size
    return outs


def _check(grads, max_norm, noise_multiplier, denominator, seed, offset):
    """Outputs and norms within the budget of the twin; inputs untouched."""
    dtype = grads[0].dtype
    before = [g.clone() for g in grads]
    outs, norms = ops.dp_clip_noise(grads, max_norm, noise_multiplier, denominator, seed, offset)

    assert len(outs) == len(grads)
    for out, g in zip(outs, grads):
        assert out.shape == g.shape[1:] and out.dtype == dtype and out.device == g.device
    assert norms.shape == (grads[0].shape[0],) and norms.dtype == torch.float32

    ref_outs, ref_norms = reference.dp_clip_noise(
        [g.float() for g in grads], max_norm, noise_multiplier, denominator, seed, offset
    )
    width = sum(g.shape[1:].numel() for g in grads)
    z = reference.stream_normals(seed, offset, width, grads[0].device)
    plain_outs = _plain(grads, max_norm, noise_multiplier, denominator, z, dtype)
    # Scale of each output element: the clipped |g| summed over the batch, plus the largest noise.
    abs_outs, _ = reference.dp_clip_noise([g.float().abs() for g in grads], max_norm, 0.0, denominator, 0, 0)
    noise_bound = noise_multiplier * max_norm * MAX_ABS_NORMAL / denominator
    # Clip factors inherit the norms' rounding, which grows with the per-sample width.
    terms = grads[0].shape[0] + width + 1
    for j, (out, ref, plain, mag) in enumerate(zip(outs, ref_outs, plain_outs, abs_outs)):
        assert_within_budget(out, ref, plain, magnitude=max_abs(mag) + noise_bound, terms=terms, what=f"outs[{j}]")
    torch.testing.assert_close(norms, ref_norms, rtol=width * 2e-7 + 1e-6, atol=1e-6)
    assert_unchanged(before, grads)


@given(data=st.data())
def test_dp_clip_noise_matches_twin(device, dtype, data):
    """Random batches (B >= 1), shapes, layouts, clip bounds, noise levels, seeds and offsets."""
    _check(*data.draw(dp_clip_noise_inputs(dtype, device)))


@pytest.mark.parametrize("index", range(2))
def test_dp_clip_noise_matches_twin_on_samples(device, index):
    """The fixed opcheck samples with B >= 1 agree with the twin (B = 0 is tested below)."""
    _check(*sample_inputs("dp_clip_noise", device)[index])


def test_empty_batch_is_pure_noise(device, dtype):
    """B = 0: norms are empty and each output is ``noise_multiplier * max_norm * z / denominator``."""
    grads = [make_tensor([0, 3, 4], dtype, device), make_tensor([0, 5], dtype, device)]
    outs, norms = ops.dp_clip_noise(grads, 2.0, 1.5, 8.0, 21, 22)
    assert norms.shape == (0,)
    z = reference.stream_normals(21, 22, 17, device)
    expected = [(1.5 * 2.0 * z[:12].view(3, 4) / 8.0), (1.5 * 2.0 * z[12:] / 8.0)]
    for out, exp in zip(outs, expected):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), exp.to(dtype).float(), rtol=0, atol=2e-5 + 2 * torch.finfo(dtype).eps)


def test_empty_batch_without_noise_is_zero(device, dtype):
    """B = 0 and noise_multiplier = 0: all-zero outputs of the per-sample shapes."""
    outs, _ = ops.dp_clip_noise([make_tensor([0, 2, 3], dtype, device)], 1.0, 0.0, 4.0, 0, 0)
    assert torch.equal(outs[0], torch.zeros(2, 3, dtype=dtype, device=device))


def test_twin_accepts_empty_batch(device):
    """The twin, like the op, must accept B = 0 and return pure noise (DESIGN.md: B = 0 is valid)."""
    outs, norms = reference.dp_clip_noise([make_tensor([0, 4], torch.float32, device)], 1.0, 1.0, 2.0, 3, 4)
    assert norms.shape == (0,)
    torch.testing.assert_close(outs[0], reference.stream_normals(3, 4, 4, device) / 2.0)


def test_clipping_only_shrinks_large_samples(device):
    """Samples below ``max_norm`` pass unscaled; samples above are scaled to norm ``max_norm``."""
    small = torch.full((1, 4), 0.1, device=device)  # norm 0.2
    large = torch.full((1, 4), 10.0, device=device)  # norm 20
    grads = [torch.cat([small, large])]
    outs, norms = ops.dp_clip_noise(grads, 1.0, 0.0, 1.0, 0, 0)
    torch.testing.assert_close(norms, torch.tensor([0.2, 20.0], device=device))
    expected = small[0] + large[0] * (1.0 / (20.0 + 1e-6))
    torch.testing.assert_close(outs[0], expected)


def test_noise_multiplier_zero_adds_nothing(device, dtype):
    """noise_multiplier = 0 gives the clipped mean only, the same for every seed and offset."""
    grads = [make_tensor([5, 3, 2], dtype, device), make_tensor([5, 7], dtype, device, seed=1)]
    first, _ = ops.dp_clip_noise(grads, 0.5, 0.0, 5.0, 1, 2)
    second, _ = ops.dp_clip_noise(grads, 0.5, 0.0, 5.0, 2**63 - 1, 2**40)
    ref, _ = reference.dp_clip_noise(grads, 0.5, 0.0, 5.0, 1, 2)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r)


def test_wide_rows_cross_chunks(device, dtype):
    """Per-sample widths above one 4,096-column chunk: each chunk draws its own slice of the stream."""
    grads = [make_tensor([3, 9001], dtype, device, layout="sliced"), make_tensor([3, 5], dtype, device, seed=1),
             make_tensor([3, 4097], dtype, device, layout="transposed", seed=2)]
    _check(grads, 1.0, 1.3, 4.0, 11, 2**33 + 1)
