"""Pure-PyTorch twins of the ``torch.ops.fedlora`` operators: the test oracle and benchmark baseline.

Each twin has the name and signature of its op (see :mod:`fedlora_ext.ops`) and is written to be read,
not to be fast. The noise stream (DESIGN.md) is here too, in integer tensor ops: Philox4x32-10 on
int64 tensors holding uint32 values, then Box-Muller in float64 rounded to float32 once, which is the
value the CPU and CUDA kernels approximate to a few float32 ulps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dp_clip_noise",
    "dp_clip_noise_with_sum",
    "gaussian_noise_",
    "per_sample_norms",
    "philox4x32_10",
    "stacked_delta",
    "stacked_delta_",
    "stream_normals",
    "weighted_sum",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_BUMP = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of the 64-bit product ``a * b``, with ``b`` an int64 tensor of uint32.

    int64 cannot hold the product, so multiply by the 16-bit halves of ``a``:
    ``a * b = p_lo + 2^16 p_hi`` with ``p_lo = b * (a & 0xFFFF)``, ``p_hi = b * (a >> 16)`` (< 2^48).
    """
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    mid = p_hi + (p_lo >> 16)  # the product >> 16
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(counter: Sequence[Tensor], key: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors of uint32 words, as ``at::Philox4_32``.

    Args:
        counter: four int64 tensors ``(c0, c1, c2, c3)`` with values in ``[0, 2^32)``.
        key: ``(k0, k1)`` in ``[0, 2^32)``.

    Returns:
        The four output words ``(x0, x1, x2, x3)``, int64 tensors with values in ``[0, 2^32)``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_KEY_BUMP[0]) & _MASK32
        k1 = (k1 + _PHILOX_KEY_BUMP[1]) & _MASK32
    return c0, c1, c2, c3


def stream_normals(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """The first ``numel`` normals ``z_0 .. z_{numel-1}`` of the stream ``(seed, offset)``, float32.

    Element ``e`` uses the Philox block with key ``(lo32(seed), hi32(seed))`` and counter
    ``(lo32(e // 4), hi32(e // 4), lo32(offset), hi32(offset))``; its words ``x_t`` give uniforms
    ``u_t = ((x_t >> 8) + 1) * 2^-24`` in ``(0, 1]`` and Box-Muller gives
    ``z = rho cos(theta), rho sin(theta)`` from ``(u0, u1)`` for ``e % 4 in {0, 1}`` and from ``(u2, u3)``
    for ``e % 4 in {2, 3}``, with ``rho = sqrt(-2 ln u)`` and ``theta = 2 pi u'``.
    """
    if not (0 <= seed < 2**63 and 0 <= offset < 2**63):
        raise ValueError(f"seed and offset must be in [0, 2^63), got seed={seed}, offset={offset}")
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    counter = (
        groups & _MASK32,
        groups >> 32,
        torch.full_like(groups, offset & _MASK32),
        torch.full_like(groups, offset >> 32),
    )
    words = philox4x32_10(counter, (seed & _MASK32, seed >> 32))
    u0, u1, u2, u3 = (((x >> 8) + 1).to(torch.float64) * 2.0**-24 for x in words)
    rho01, theta01 = torch.sqrt(-2.0 * torch.log(u0)), 2.0 * math.pi * u1
    rho23, theta23 = torch.sqrt(-2.0 * torch.log(u2)), 2.0 * math.pi * u3
    z = torch.stack(
        [rho01 * torch.cos(theta01), rho01 * torch.sin(theta01), rho23 * torch.cos(theta23), rho23 * torch.sin(theta23)],
        dim=1,
    )
    return z.reshape(-1)[:numel].to(torch.float32)


def per_sample_norms(per_sample_grads: Sequence[Tensor]) -> Tensor:
    """Twin of :func:`fedlora_ext.ops.per_sample_norms`: float32 ``[B]``, ``sqrt(sum_j ||g_j[i]||^2)``."""
    if len(per_sample_grads) == 0:
        raise ValueError("per_sample_grads must hold at least one tensor [B, ...]")
    squares = [g.reshape(g.shape[0], g.shape[1:].numel()).float().pow(2).sum(dim=1) for g in per_sample_grads]
    return torch.stack(squares).sum(dim=0).sqrt()


def _clipped_sums(per_sample_grads: Sequence[Tensor], max_norm: float) -> tuple[list[Tensor], Tensor]:
    """float32 ``sum_i c_i g_j[i]`` per tensor, ``c_i = min(1, C / (n_i + 1e-6))``, and the norms ``n``."""
    norms = per_sample_norms(per_sample_grads)
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", clip, g.float()) for g in per_sample_grads], norms


def _noised(sums: list[Tensor], per_sample_grads: Sequence[Tensor], max_norm: float, noise_multiplier: float,
            denominator: float, seed: int, offset: int) -> list[Tensor]:
    """``(sums_j + sigma C z_j) / denominator`` in each ``g_j``'s dtype, z the stream over the flattened list."""
    z = stream_normals(seed, offset, sum(s.numel() for s in sums), per_sample_grads[0].device)
    outs, start = [], 0
    for summed, g in zip(sums, per_sample_grads):
        size = summed.numel()
        if noise_multiplier > 0:
            summed = summed + noise_multiplier * max_norm * z[start : start + size].view(summed.shape)
        outs.append((summed / denominator).to(g.dtype))
        start += size
    return outs


def dp_clip_noise(
    per_sample_grads: Sequence[Tensor],
    max_norm: float,
    noise_multiplier: float,
    denominator: float,
    seed: int,
    offset: int,
) -> tuple[list[Tensor], Tensor]:
    """Twin of :func:`fedlora_ext.ops.dp_clip_noise`: clip, sum over the batch, add noise, divide."""
    sums, norms = _clipped_sums(per_sample_grads, max_norm)
    return _noised(sums, per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset), norms


def dp_clip_noise_with_sum(
    per_sample_grads: Sequence[Tensor],
    max_norm: float,
    noise_multiplier: float,
    denominator: float,
    seed: int,
    offset: int,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Twin of :func:`fedlora_ext.ops.dp_clip_noise_with_sum`: :func:`dp_clip_noise` plus the clipped sums."""
    sums, norms = _clipped_sums(per_sample_grads, max_norm)
    outs = _noised(sums, per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset)
    return outs, [s.to(g.dtype) for s, g in zip(sums, per_sample_grads)], norms


def gaussian_noise_(tensors: Sequence[Tensor], std: float, seed: int, offset: int) -> None:
    """Twin of :func:`fedlora_ext.ops.gaussian_noise_`: ``x += std * z`` over the flattened list."""
    z = stream_normals(seed, offset, sum(t.numel() for t in tensors), tensors[0].device if tensors else "cpu")
    start = 0
    for t in tensors:
        noise = z[start : start + t.numel()].view(t.shape)
        t.copy_((t.float() + std * noise).to(t.dtype))
        start += t.numel()


def weighted_sum(xs: Sequence[Tensor], weights: Tensor, rank_dim: int, out_rank: int) -> Tensor:
    """Twin of :func:`fedlora_ext.ops.weighted_sum`: zero-pad every ``x_k`` to ``out_rank``, then sum."""
    dim = rank_dim % xs[0].dim()
    padded = []
    for x in xs:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, out_rank - x.shape[dim]]  # F.pad counts from the last dim
        padded.append(F.pad(x.float(), pad))
    stacked = torch.stack(padded)  # [K, ...]
    shape = [len(xs)] + [1] * xs[0].dim()
    if weights.dim() == 2:  # per-rank weights [K, out_rank] broadcast along rank_dim
        shape[1 + dim] = out_rank
    return (weights.view(shape) * stacked).sum(dim=0).to(xs[0].dtype)


def stacked_delta(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, scale: float) -> Tensor:
    """Twin of :func:`fedlora_ext.ops.stacked_delta`: ``scale * sum_k w_k B_k @ A_k``.

    Computed as FLoRA does: stack ``[w_1 B_1, ..., w_K B_K] @ [A_1; ...; A_K]``, which equals the sum.
    """
    B_stacked = torch.cat([w * B.float() for w, B in zip(weights, Bs)], dim=1)
    A_stacked = torch.cat([A.float() for A in As], dim=0)
    return (scale * (B_stacked @ A_stacked)).to(Bs[0].dtype)


def stacked_delta_(
    W: Tensor, Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, scale: float, transpose: bool = False
) -> None:
    """Twin of :func:`fedlora_ext.ops.stacked_delta_`: ``W += delta`` (``delta.T`` with ``transpose``)."""
    if len(Bs) == 0:
        return
    delta = stacked_delta([B.float() for B in Bs], [A.float() for A in As], weights, scale)
    W.copy_((W.float() + (delta.T if transpose else delta)).to(W.dtype))
