"""Robust aggregation for settings with untrusted clients: coordinate-wise statistics of the clients'
updates instead of their weighted mean (Yin et al. 2018, arXiv 1803.01498).

Each coordinate of the new global tensor is the global value plus the median, or the mean after
dropping the ``trim`` largest and smallest, of the clients' deltas. Clients count equally: a weight
n_k would let one client claim a large share by claiming many examples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def coordinate_median(deltas: Tensor) -> Tensor:
    """The median over dim 0 of ``[K, ...]``, the mean of the two middle values when K is even."""
    ordered = deltas.sort(dim=0).values
    k = deltas.shape[0]
    return ordered[k // 2] if k % 2 else 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])


def trimmed_mean(deltas: Tensor, trim: float) -> Tensor:
    """The mean over dim 0 of ``[K, ...]`` without the ``floor(trim K)`` largest and smallest values."""
    k = deltas.shape[0]
    cut = math.floor(trim * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trimmed mean: trim_fraction {trim} leaves no client of {k}")
    return deltas.sort(dim=0).values[cut:k - cut].mean(dim=0)


def robust_update(start: Tensor, uploads: list[Tensor], how: str, trim: float) -> Tensor:
    """``start`` plus the coordinate-wise median or trimmed mean of ``uploads - start`` (float32 math)."""
    deltas = torch.stack([u.float() - start.float() for u in uploads])
    step = coordinate_median(deltas) if how == "median" else trimmed_mean(deltas, trim)
    return (start.float() + step).to(start.dtype)


def update_norm(upload: dict[str, Tensor], sent: dict[str, Tensor]) -> float:
    """The L2 norm of a client's update over all its floating tensors: the upload minus what it
    downloaded under the same name (a fresh factor, a delta, counts whole)."""
    total = 0.0
    for name, tensor in upload.items():
        if not tensor.is_floating_point():
            continue
        delta = tensor.double() - sent[name].double() if name in sent and sent[name].shape == tensor.shape else tensor.double()
        total += float((delta * delta).sum())
    return math.sqrt(total)
