"""Typed wrappers of the ``torch.ops.fedlora`` operators, each beside its fake (meta) implementation.

The kernels live in ``csrc/`` (CPU: C++, CUDA: ``.cu``); the schemas are declared once in
``csrc/registration.cpp``. Every op has a pure-PyTorch twin of the same name in
:mod:`fedlora_ext.reference`. Dtypes: float32, bfloat16 and float16 in, float32 accumulation, outputs
in the input dtype unless stated. All tensors of one call live on one device.

The noise of :func:`dp_clip_noise` and :func:`gaussian_noise_` is the counter-based Philox stream of
DESIGN.md: it depends only on ``(seed, offset, element index)``, so it is identical on CPU and CUDA and
for any thread count. Use a fresh ``offset`` (a step counter) for every call, and draw ``seed`` from
the OS CSPRNG (``secrets.randbits(63)``); the seed is a secret that must never leave its owner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "dp_clip_noise",
    "dp_clip_noise_with_sum",
    "gaussian_noise_",
    "per_sample_norms",
    "stacked_delta",
    "stacked_delta_",
    "weighted_sum",
]


def _check_seed_offset(op: str, seed: int, offset: int) -> None:
    # Python ints are unbounded; say what the schema's int64 cannot hold before the dispatcher does.
    for name, value in (("seed", seed), ("offset", offset)):
        if not 0 <= int(value) < 2**63:
            raise ValueError(f"fedlora.{op}: {name} must be in [0, 2^63), got {value}")


def _check_non_empty(op: str, name: str, tensors: Sequence[Tensor], expected: str) -> None:
    # The dispatcher picks a kernel from the tensor arguments, so an empty list never reaches one.
    if len(tensors) == 0:
        raise ValueError(f"fedlora.{op}: {name} must hold at least one tensor {expected}, got an empty list")


def per_sample_norms(per_sample_grads: Sequence[Tensor]) -> Tensor:
    """Per-sample L2 norms over all tensors (DP-SGD's flat clipping, Abadi et al. 2016).

    Args:
        per_sample_grads: tensors ``g_j`` of shape ``[B, ...]`` sharing the batch size ``B``.

    Returns:
        float32 ``[B]``: ``n_i = sqrt(sum_j ||g_j[i]||^2)``.
    """
    _check_non_empty("per_sample_norms", "per_sample_grads", per_sample_grads, "[B, ...]")
    return torch.ops.fedlora.per_sample_norms.default(list(per_sample_grads))


def dp_clip_noise(
    per_sample_grads: Sequence[Tensor],
    max_norm: float,
    noise_multiplier: float,
    denominator: float,
    seed: int,
    offset: int,
) -> tuple[list[Tensor], Tensor]:
    """Fused DP-SGD gradient: clip per sample, sum over the batch, add Gaussian noise, scale.

    ``c_i = min(1, max_norm / (n_i + 1e-6))`` and
    ``out_j = (sum_i c_i g_j[i] + noise_multiplier * max_norm * z_j) / denominator``, which is opacus 1.6
    ``DPOptimizer`` (flat clipping, mean reduction, ``expected_batch_size = denominator``) with the
    noise drawn from the fedlora stream instead of torch's generator. Serves FFA-LoRA's private
    training (arXiv 2403.12313) and every method run under sample-level DP.

    Args:
        per_sample_grads: tensors ``g_j`` of shape ``[B, ...]``; ``B = 0`` (an empty Poisson batch)
            gives pure noise.
        max_norm: clipping bound ``C > 0``.
        noise_multiplier: ``sigma >= 0``; 0 adds nothing.
        denominator: ``> 0``, the expected batch size for mean reduction (1 for sum reduction).
        seed: noise key in ``[0, 2^63)``; a client secret.
        offset: noise counter in ``[0, 2^63)``; a fresh value per call.

    Returns:
        ``(outs, norms)``: ``outs[j]`` of shape ``g_j.shape[1:]`` in ``g_j``'s dtype, and the float32
        per-sample norms ``[B]`` before clipping.
    """
    _check_non_empty("dp_clip_noise", "per_sample_grads", per_sample_grads, "[B, ...]")
    _check_seed_offset("dp_clip_noise", seed, offset)
    outs, norms = torch.ops.fedlora.dp_clip_noise.default(
        list(per_sample_grads), float(max_norm), float(noise_multiplier), float(denominator), int(seed), int(offset)
    )
    return list(outs), norms


def dp_clip_noise_with_sum(
    per_sample_grads: Sequence[Tensor],
    max_norm: float,
    noise_multiplier: float,
    denominator: float,
    seed: int,
    offset: int,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """:func:`dp_clip_noise` that also returns the clipped sums, from the same read of the gradients.

    opacus keeps ``sum_i c_i g_j[i]`` in ``p.summed_grad`` besides the noised gradient; this gives both
    without a second pass over the per-sample gradients. ``outs`` and ``norms`` are bitwise those of
    :func:`dp_clip_noise` with the same arguments (the same noise stream and positions).

    Args are those of :func:`dp_clip_noise` (``B = 0`` gives zero sums).

    Returns:
        ``(outs, sums, norms)``: ``outs[j] = (sums[j] + noise_multiplier * max_norm * z_j) / denominator``
        (computed from the float32 sum) and ``sums[j] = sum_i c_i g_j[i]``, both of shape ``g_j.shape[1:]``
        in ``g_j``'s dtype, and the float32 per-sample norms ``[B]`` before clipping.
    """
    _check_non_empty("dp_clip_noise_with_sum", "per_sample_grads", per_sample_grads, "[B, ...]")
    _check_seed_offset("dp_clip_noise_with_sum", seed, offset)
    outs, sums, norms = torch.ops.fedlora.dp_clip_noise_with_sum.default(
        list(per_sample_grads), float(max_norm), float(noise_multiplier), float(denominator), int(seed), int(offset)
    )
    return list(outs), list(sums), norms


def gaussian_noise_(tensors: Sequence[Tensor], std: float, seed: int, offset: int) -> None:
    """In place ``x += std * z`` for every tensor of the list (DP noise for client-level DP-FedAvg).

    Element ``e`` of the flattened list (tensor ``j`` starts at the sum of the earlier numels, each in
    row-major order) receives normal ``z_e`` of the stream ``(seed, offset)``.

    Args:
        tensors: tensors to perturb in place, one dtype, one device, not overlapping.
        std: standard deviation ``>= 0``.
        seed: noise key in ``[0, 2^63)``; a secret.
        offset: noise counter in ``[0, 2^63)``; a fresh value per call.
    """
    _check_seed_offset("gaussian_noise_", seed, offset)
    if len(tensors) == 0:  # nothing to perturb; the dispatcher cannot route a call without tensors
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"fedlora.gaussian_noise_: std must be finite and >= 0, got {std}")
        return
    torch.ops.fedlora.gaussian_noise_.default(list(tensors), float(std), int(seed), int(offset))


def weighted_sum(xs: Sequence[Tensor], weights: Tensor, rank_dim: int, out_rank: int) -> Tensor:
    """Weighted sum of zero-padded LoRA factors: ``sum_k w_k * zero_pad(x_k, out_rank)``.

    FedAvg / FedIT (arXiv 2305.05644) with ``[K]`` weights and equal ranks; HetLoRA (arXiv 2401.06432)
    with ranks ``r_k <= out_rank`` padded with zeros; LoRA-A2 (arXiv 2410.22815) with ``[K, out_rank]``
    per-rank (masked) weights, applied to rank component ``j`` along ``rank_dim``.

    Args:
        xs: ``K >= 1`` tensors, equal in every size but ``rank_dim``, where ``x_k`` has ``r_k <= out_rank``.
        weights: float32 ``[K]`` or ``[K, out_rank]``.
        rank_dim: the rank dimension (``1`` for B ``[m, r]``, ``0`` for A ``[r, n]``; negative counts back).
        out_rank: the output's size along ``rank_dim``.

    Returns:
        Tensor of ``xs[0]``'s shape with ``out_rank`` along ``rank_dim``, in ``xs[0]``'s dtype.
    """
    _check_non_empty("weighted_sum", "xs", xs, "(K >= 1)")
    return torch.ops.fedlora.weighted_sum.default(list(xs), weights, int(rank_dim), int(out_rank))


def stacked_delta(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, scale: float) -> Tensor:
    """``scale * sum_k w_k B_k @ A_k``: FLoRA's stacked product (arXiv 2409.05976), FedEx-LoRA's exact
    average (arXiv 2410.09432).

    Args:
        Bs: ``K >= 1`` factors ``[m, r_k]``.
        As: ``K`` factors ``[r_k, n]``.
        weights: float32 ``[K]``.
        scale: LoRA scaling ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).

    Returns:
        ``[m, n]`` in the factors' dtype.
    """
    return torch.ops.fedlora.stacked_delta.default(list(Bs), list(As), weights, float(scale))


def stacked_delta_(
    W: Tensor, Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, scale: float, transpose: bool = False
) -> None:
    """In place ``W += scale * sum_k w_k B_k @ A_k`` without building the ``[m, n]`` delta.

    Merges FLoRA's stacked adapters into the frozen base and folds FedEx-LoRA's residual into it (the
    residual is one more factor pair with weight -1). ``transpose=True`` targets a ``fan_in_fan_out``
    weight ``W [n, m]`` (GPT-2's Conv1D), adding the transposed delta.

    Args:
        W: ``[m, n]`` (``[n, m]`` with ``transpose``), the factors' dtype; updated in place.
        Bs: ``K >= 0`` factors ``[m, r_k]``.
        As: ``K`` factors ``[r_k, n]``.
        weights: float32 ``[K]``.
        scale: LoRA scaling.
        transpose: add the transposed delta.
    """
    torch.ops.fedlora.stacked_delta_.default(W, list(Bs), list(As), weights, float(scale), bool(transpose))


def _check_one_device(op: str, named: Sequence[tuple[str, Tensor]]) -> None:
    """In the fakes: every tensor on the first one's device (a meta tensor among CPU tensors lands here)."""
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check(
            t.device == first.device,
            lambda: f"fedlora.{op}: {name} is on {t.device}, expected {first.device} like {first_name}",
        )


def _indexed(name: str, tensors: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / FakeTensor tracing: no data access, no sync."""

    @torch.library.register_fake("fedlora::per_sample_norms")
    def _per_sample_norms_fake(per_sample_grads):
        torch._check(len(per_sample_grads) > 0, lambda: "fedlora.per_sample_norms: empty per_sample_grads")
        _check_one_device("per_sample_norms", _indexed("per_sample_grads", per_sample_grads))
        return per_sample_grads[0].new_empty((per_sample_grads[0].shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fedlora::dp_clip_noise")
    def _dp_clip_noise_fake(per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset):
        torch._check(len(per_sample_grads) > 0, lambda: "fedlora.dp_clip_noise: empty per_sample_grads")
        _check_one_device("dp_clip_noise", _indexed("per_sample_grads", per_sample_grads))
        outs = [g.new_empty(g.shape[1:]) for g in per_sample_grads]
        return outs, per_sample_grads[0].new_empty((per_sample_grads[0].shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fedlora::dp_clip_noise_with_sum")
    def _dp_clip_noise_with_sum_fake(per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset):
        torch._check(len(per_sample_grads) > 0, lambda: "fedlora.dp_clip_noise_with_sum: empty per_sample_grads")
        _check_one_device("dp_clip_noise_with_sum", _indexed("per_sample_grads", per_sample_grads))
        outs = [g.new_empty(g.shape[1:]) for g in per_sample_grads]
        sums = [g.new_empty(g.shape[1:]) for g in per_sample_grads]
        return outs, sums, per_sample_grads[0].new_empty((per_sample_grads[0].shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fedlora::gaussian_noise_")
    def _gaussian_noise_fake(tensors, std, seed, offset):
        if tensors:
            _check_one_device("gaussian_noise_", _indexed("tensors", tensors))

    @torch.library.register_fake("fedlora::weighted_sum")
    def _weighted_sum_fake(xs, weights, rank_dim, out_rank):
        torch._check(len(xs) > 0, lambda: "fedlora.weighted_sum: empty xs")
        _check_one_device("weighted_sum", _indexed("xs", xs) + [("weights", weights)])
        shape = list(xs[0].shape)
        shape[rank_dim] = out_rank
        return xs[0].new_empty(shape)

    @torch.library.register_fake("fedlora::stacked_delta")
    def _stacked_delta_fake(Bs, As, weights, scale):
        torch._check(len(Bs) > 0 and len(Bs) == len(As), lambda: "fedlora.stacked_delta: need K >= 1 pairs")
        _check_one_device("stacked_delta", _indexed("Bs", Bs) + _indexed("As", As) + [("weights", weights)])
        return Bs[0].new_empty((Bs[0].shape[0], As[0].shape[1]))

    @torch.library.register_fake("fedlora::stacked_delta_")
    def _stacked_delta_inplace_fake(W, Bs, As, weights, scale, transpose=False):
        factors = _indexed("Bs", Bs) + _indexed("As", As) + [("weights", weights)]
        _check_one_device("stacked_delta_", factors + [("W", W)])  # names W as the odd one out


if hasattr(torch.ops, "fedlora") and hasattr(torch.ops.fedlora, "per_sample_norms"):
    _register_fakes()
