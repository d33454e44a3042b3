"""Statistics of the noise stream on 10^6 draws: moments, normality, independence, scaling.

Bounds are 5 to 6 standard errors (or a KS critical value at p ~ 1e-6), so a correct generator fails
about once in a million runs; the draws are deterministic (fixed seeds), so a pass is reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora_ext import ops

N = 1_000_000
SIGMAS = 5.0


def _normals(seed: int, offset: int, n: int = N, std: float = 1.0) -> torch.Tensor:
    """``n`` draws of ``std * z`` from the op, in float64 for the statistics."""
    x = torch.zeros(n)
    ops.gaussian_noise_([x], std, seed, offset)
    return x.double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally long samples."""
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("seed, offset", [(0, 0), (987654321, 2**40), (2**63 - 1, 2**63 - 1)])
def test_mean_and_std(seed, offset):
    """Mean within 5 standard errors of 0; std within 5 standard errors (1/sqrt(2N)) of 1."""
    z = _normals(seed, offset)
    assert abs(z.mean().item()) < SIGMAS / math.sqrt(N)
    assert abs(z.std().item() - 1.0) < SIGMAS / math.sqrt(2 * N)


def test_higher_moments():
    """Skewness ~ 0 (se sqrt(6/N)) and excess kurtosis ~ 0 (se sqrt(24/N)) of a normal."""
    z = _normals(3, 4)
    z = (z - z.mean()) / z.std()
    assert abs(z.pow(3).mean().item()) < SIGMAS * math.sqrt(6 / N)
    assert abs(z.pow(4).mean().item() - 3.0) < SIGMAS * math.sqrt(24 / N)


def test_kolmogorov_smirnov_against_normal_cdf():
    """Largest gap between the empirical CDF and Phi below the KS critical value at p = 1e-6."""
    z, _ = _normals(11, 12).sort()
    cdf = torch.special.ndtr(z)
    steps = torch.arange(1, N + 1, dtype=torch.float64) / N
    gap = torch.maximum(steps - cdf, cdf - (steps - 1.0 / N)).max().item()
    critical = math.sqrt(-0.5 * math.log(1e-6 / 2)) / math.sqrt(N)  # ~2.7e-3
    assert gap < critical


def test_chi_square_on_normal_deciles_and_tails():
    """Counts in 12 bins (the deciles, with 1e-3 tails split off the end ones) fit the normal."""
    z = _normals(21, 22)
    # Edges at the normal quantiles of these cumulative probabilities; the end bins hold 1e-3 each.
    cumulative = torch.tensor([1e-3] + [0.1 * k for k in range(1, 10)] + [1 - 1e-3], dtype=torch.float64)
    edges = math.sqrt(2) * torch.special.erfinv(2 * cumulative - 1)
    expected = torch.tensor([1e-3, 0.1 - 1e-3] + [0.1] * 8 + [0.1 - 1e-3, 1e-3], dtype=torch.float64) * N
    counts = torch.bincount(torch.bucketize(z, edges), minlength=len(expected)).double()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 11 degrees of freedom: P(chi2 > 45) ~ 5e-6.
    assert chi2 < 45.0


@pytest.mark.parametrize(
    "other",
    [(7, 9), (7 + 1, 8), (7 + 2**32, 8), (7, 8 + 2**32), (8, 7)],
    ids=["offset+1", "seed+1", "seed_hi", "offset_hi", "swapped"],
)
def test_different_streams_are_uncorrelated(other):
    """Streams of neighbouring offsets / seeds (and with swapped roles) have |corr| < 5 / sqrt(N)."""
    assert abs(_corr(_normals(7, 8), _normals(*other))) < SIGMAS / math.sqrt(N)


@pytest.mark.parametrize("lag", [1, 2, 4])
def test_no_autocorrelation_within_a_stream(lag):
    """Neighbouring elements (same and adjacent Philox blocks, Box-Muller pairs) are uncorrelated."""
    z = _normals(5, 5)
    assert abs(_corr(z[:-lag], z[lag:])) < SIGMAS / math.sqrt(N)


@pytest.mark.parametrize("std", [0.01, 0.7, 3.0])
def test_std_scaling(std):
    """gaussian_noise_ with std s on zeros has sample std s and is exactly-ish s times the unit stream."""
    scaled = _normals(41, 42, std=std)
    assert abs(scaled.std().item() / std - 1.0) < SIGMAS / math.sqrt(2 * N)
    torch.testing.assert_close(scaled, std * _normals(41, 42), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "noise_multiplier, max_norm, denominator", [(1.0, 1.0, 1.0), (1.3, 0.5, 64.0), (0.7, 4.0, 3.0)]
)
def test_dp_clip_noise_noise_std(noise_multiplier, max_norm, denominator):
    """The noise part of dp_clip_noise (output minus the noise-free output) has std
    ``noise_multiplier * max_norm / denominator`` and mean 0."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 500, 500, generator=gen), torch.randn(4, 7, generator=gen)]
    noisy, _ = ops.dp_clip_noise(grads, max_norm, noise_multiplier, denominator, 51, 52)
    clean, _ = ops.dp_clip_noise(grads, max_norm, 0.0, denominator, 51, 52)
    noise = torch.cat([(a - b).reshape(-1) for a, b in zip(noisy, clean)]).double()
    target = noise_multiplier * max_norm / denominator
    n = noise.numel()
    # Subtracting two rounded float32 outputs adds ~1 ulp of the clean part, far below 5 standard errors.
    assert abs(noise.std().item() / target - 1.0) < SIGMAS / math.sqrt(2 * n) + 1e-5
    assert abs(noise.mean().item()) / target < SIGMAS / math.sqrt(n)


def test_noise_multiplier_zero_adds_nothing():
    """noise_multiplier = 0 gives exactly the clipped sum over the denominator, for any seed."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 33, generator=gen)]
    a, _ = ops.dp_clip_noise(grads, 1.0, 0.0, 6.0, 1, 1)
    b, _ = ops.dp_clip_noise(grads, 1.0, 0.0, 6.0, 99, 2**62)
    assert torch.equal(a[0], b[0])
    norms = grads[0].norm(dim=1)
    clip = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(a[0], (clip[:, None] * grads[0]).sum(0) / 6.0)
