"""``dp_clip_noise`` equals opacus 1.6 ``DPOptimizer`` (flat clipping, ``loss_reduction="mean"``).

Without noise the outputs must match opacus's ``clip_and_accumulate(); add_noise(); scale_grad()`` to
float rounding; with noise only the distribution can match (opacus draws from torch's generator, the
op from the fedlora Philox stream), so means and standard deviations are compared.
"""

from __future__ import annotations

import math

import pytest
import torch

opacus_optimizers = pytest.importorskip("opacus.optimizers")

from fedlora_ext import ops  # noqa: E402

# Parameter shapes of a small LoRA-adapted layer: B [m, r], A [r, n], a bias, a scalar.
PARAM_SHAPES = [(6, 2), (2, 5), (5,), (1,)]


def _opacus_step(grad_samples, max_norm, noise_multiplier, expected_batch_size, device, seed=0):
    """``p.grad`` of every parameter after opacus's clip / noise / scale on the given per-sample grads."""
    params = [torch.nn.Parameter(torch.zeros(g.shape[1:], device=device)) for g in grad_samples]
    optimizer = opacus_optimizers.DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    for p, g in zip(params, grad_samples):
        p.grad_sample = g.clone()
    optimizer.clip_and_accumulate()
    optimizer.add_noise()
    optimizer.scale_grad()
    return [p.grad for p in params]


def _opacus_norms(grad_samples):
    """Per-sample norms exactly as opacus 1.6 ``DPOptimizer.clip_and_accumulate`` computes them."""
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def _grad_samples(batch, device, seed):
    """Per-sample grads whose norms straddle 1: half the samples small (unclipped), half large."""
    gen = torch.Generator().manual_seed(seed)
    sample_scale = torch.where(torch.arange(batch) % 2 == 0, 0.05, 3.0)  # norms ~0.2 and ~12
    grads = []
    for shape in PARAM_SHAPES:
        g = torch.randn((batch, *shape), generator=gen) * sample_scale.view(-1, *([1] * len(shape)))
        grads.append(g.to(device))
    return grads


@pytest.mark.parametrize("batch", [0, 1, 2, 7, 32])
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 50.0])
def test_matches_opacus_without_noise(device, batch, max_norm):
    """Clipped, summed, mean-reduced grads and the per-sample norms equal opacus's to float rounding."""
    grads = _grad_samples(batch, device, seed=batch)
    expected_batch_size = max(batch, 4)
    expected = _opacus_step(grads, max_norm, 0.0, expected_batch_size, device)
    outs, norms = ops.dp_clip_noise(grads, max_norm, 0.0, float(expected_batch_size), 1, 2)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)
    if batch:
        torch.testing.assert_close(norms, _opacus_norms(grads), rtol=1e-5, atol=1e-6)
        if batch >= 2 and max_norm == 1.0:  # the inputs really mix clipped and unclipped samples
            assert (norms < max_norm).any() and (norms > max_norm).any()
    else:
        assert norms.shape == (0,)


def test_norms_match_opacus(device):
    """per_sample_norms is opacus's flat per-sample norm."""
    grads = _grad_samples(16, device, seed=3)
    torch.testing.assert_close(ops.per_sample_norms(grads), _opacus_norms(grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise_multiplier, max_norm, batch", [(1.0, 1.0, 8), (0.6, 2.0, 32)])
def test_noise_statistics_match_opacus(device, noise_multiplier, max_norm, batch):
    """With noise on, the noise parts of the op and of opacus have the same mean (0) and std
    (``noise_multiplier * max_norm / expected_batch_size``), within 5 standard errors."""
    gen = torch.Generator().manual_seed(7)
    grads = [(torch.randn(batch, 400, 500, generator=gen) * 0.01).to(device)]
    clean = _opacus_step(grads, max_norm, 0.0, batch, device)[0]
    opacus_noise = (_opacus_step(grads, max_norm, noise_multiplier, batch, device, seed=1)[0] - clean).double()
    ours, _ = ops.dp_clip_noise(grads, max_norm, noise_multiplier, float(batch), 123, 456)
    our_noise = (ours[0] - clean).double()

    target = noise_multiplier * max_norm / batch
    n = our_noise.numel()
    for noise in (opacus_noise, our_noise):
        assert abs(noise.mean().item()) < 5 * target / math.sqrt(n)
        assert abs(noise.std().item() / target - 1.0) < 5 / math.sqrt(2 * n) + 1e-4
    # The two generators agree with each other, not just with the formula.
    assert abs(our_noise.std().item() / opacus_noise.std().item() - 1.0) < 10 / math.sqrt(2 * n) + 2e-4
