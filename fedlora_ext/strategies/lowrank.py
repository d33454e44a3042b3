"""The SVD of a weighted sum of LoRA products, sum_k w_k B_k A_k [m, n], without forming the m x n matrix.

With the stacks B_s = [B_1 ... B_K] [m, R] and A_s = [w_1 A_1; ...; w_K A_K] [R, n] (R = sum_k r_k),
B_s A_s is the sum. Reduced QR of both stacks, B_s = Q_B R_B and A_s^T = Q_A R_A, gives
B_s A_s = Q_B (R_B R_A^T) Q_A^T; the small core R_B R_A^T [min(m, R), min(n, R)] has the SVD
U' S V'^T, so the sum's SVD is U = Q_B U', S, V = Q_A V' (Q_B, Q_A have orthonormal columns).
Cost O((m + n) R^2 + R^3) against O(m n min(m, n)) for a dense SVD; the [m, n] sum never exists.

Everything is computed in float64: the factors are small next to the dense sum (R (m + n) numbers), so
float64 costs little (benchmarks/bench_svd.py) and keeps singular values and the reconstructed sum at
~1e-15 relative to a dense float64 SVD. float32 errors are ~1e-7 of the largest singular value, so a
singular value below ~1e-6 of the largest would keep few correct digits (and the singular vectors of
close singular values rotate by error / gap, which float64 keeps 1e9 times smaller).

The factors are peft's (B [out, r], A [r, in]) whatever the layer's storage: GPT-2's Conv1D
(fan_in_fan_out) transposes only the base weight, so callers that never form B A into a weight need no
transpose. Zero or rank-deficient sums and R > min(m, n) are valid: the SVD then has
k = min(m, n, R) components, the trailing ones with singular value 0 (their vectors are orthonormal,
spanning directions of the stacks' column / row spaces, and contribute nothing to the sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stacked_svd(Bs: Sequence[Tensor], As: Sequence[Tensor],
                weights: Sequence[float] | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``sum_k w_k B_k A_k`` from its factors.

    Args:
        Bs: K factors B_k [m, r_k].
        As: K factors A_k [r_k, n] (the same r_k as B_k).
        weights: w_k, K numbers (default 1 each); folded into the A stack.

    Returns:
        (U [m, k], S [k], Vh [k, n]) in float64 on the factors' device, k = min(m, n, sum_k r_k),
        S descending and non-negative, U and Vh^T with orthonormal columns, U diag(S) Vh = the sum.
    """
    if len(Bs) == 0 or len(Bs) != len(As):
        raise ValueError(f"stacked_svd: needs K >= 1 pairs of factors, got {len(Bs)} B and {len(As)} A")
    K = len(Bs)
    w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (K,):
        raise ValueError(f"stacked_svd: weights must be [{K}], got {tuple(w.shape)}")
    m, n = Bs[0].shape[0], As[0].shape[1]
    for k, (B, A) in enumerate(zip(Bs, As)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise ValueError(f"stacked_svd: pair {k} has B {tuple(B.shape)} and A {tuple(A.shape)}; expected "
                             f"B [{m}, r] and A [r, {n}] with the same r")
    device = Bs[0].device
    B_s = torch.cat([B.to(torch.float64) for B in Bs], dim=1)  # [m, R]
    A_s = torch.cat([float(w_k) * A.to(device, torch.float64) for w_k, A in zip(w.tolist(), As)], dim=0)  # [R, n]
    Q_B, R_B = torch.linalg.qr(B_s)  # [m, min(m, R)], [min(m, R), R]
    Q_A, R_A = torch.linalg.qr(A_s.T)  # [n, min(n, R)], [min(n, R), R]
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U_core, S, Vh_core @ Q_A.T


def svd_of_product(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B A`` (B [m, r], A [r, n]): :func:`stacked_svd` of one pair."""
    return stacked_svd([B], [A])


def truncated_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """LoRA factors at ``rank`` whose ``scale * B A`` is the rank-``rank`` truncation U_r S_r Vh_r: the
    square root of the singular values on each side, the scale undone on each side,
    B = U_r sqrt(S_r / scale) [m, rank], A = sqrt(S_r / scale) Vh_r [rank, n] (float64). Components
    beyond the SVD's k are zero (a rank above min(m, n, R))."""
    k = min(rank, S.shape[0])
    root = torch.sqrt(S[:k] / scale)
    B = U.new_zeros(U.shape[0], rank)
    A = Vh.new_zeros(rank, Vh.shape[1])
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return B, A
