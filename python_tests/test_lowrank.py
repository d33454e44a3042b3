"""The stacked-factor SVD (fedlora_ext.strategies.lowrank) against torch.linalg.svd of the dense float64
sum sum_k w_k B_k A_k: singular values and the reconstructed sum to 1e-10 relative, orthonormal
vectors, any shape (size 1, odd, R > min(m, n)), zero and rank-deficient sums."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_ext.strategies.lowrank import stacked_svd, svd_of_product, truncated_factors

TOL = 1e-10  # float64 throughout; the goal is 1e-5


def dense(Bs, As, w) -> torch.Tensor:
    return sum(float(wk) * (B.double() @ A.double()) for wk, B, A in zip(w, Bs, As))


def check_against_dense(Bs, As, w) -> None:
    U, S, Vh = stacked_svd(Bs, As, w)
    m, n = Bs[0].shape[0], As[0].shape[1]
    R = sum(B.shape[1] for B in Bs)
    k = min(m, n, R)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    exact = dense(Bs, As, w)
    S_ref = torch.linalg.svdvals(exact)
    scale = max(float(S_ref.max()) if S_ref.numel() else 0.0, 1e-300)
    assert float((S - S_ref[:k]).abs().max()) <= TOL * scale
    assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())
    assert float(torch.linalg.norm((U * S) @ Vh - exact)) <= TOL * max(float(torch.linalg.norm(exact)), 1e-300)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)


@st.composite
def factor_sets(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    ranks = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    kind = draw(st.sampled_from(["random", "zero", "deficient", "some_zero"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g) for r in ranks]
    As = [torch.randn(r, n, generator=g) for r in ranks]
    if kind == "zero":
        Bs = [torch.zeros_like(B) for B in Bs]
    elif kind == "deficient":  # every client's B in one shared 1-dimensional column space
        u = torch.randn(m, 1, generator=g)
        Bs = [u @ torch.randn(1, B.shape[1], generator=g) for B in Bs]
    elif kind == "some_zero":
        As[0] = torch.zeros_like(As[0])
    w = (torch.rand(len(ranks), generator=g) + 0.1).tolist()
    return Bs, As, w


@settings(max_examples=150, deadline=None)
@given(factor_sets())
def test_stacked_svd_matches_dense(case):
    check_against_dense(*case)


@pytest.mark.parametrize("m, n, ranks", [(1, 1, [1]), (1, 7, [3, 2]), (7, 1, [2, 2]), (5, 3, [4, 4]),
                                         (33, 17, [16, 8, 4]), (64, 64, [2])],
                         ids=["1x1", "1x7", "7x1", "R>min", "odd", "one-client"])
def test_edge_shapes(m, n, ranks):
    g = torch.Generator().manual_seed(m * 100 + n)
    Bs = [torch.randn(m, r, generator=g) for r in ranks]
    As = [torch.randn(r, n, generator=g) for r in ranks]
    check_against_dense(Bs, As, [0.5] * len(ranks))


def test_float32_factors_are_used_as_float64():
    """Factors arrive as float32; the result is the float64 SVD of exactly those values."""
    g = torch.Generator().manual_seed(1)
    Bs, As = [torch.randn(300, 8, generator=g)], [torch.randn(8, 200, generator=g)]
    check_against_dense(Bs, As, [1.0])


def test_svd_of_product_and_truncated_split():
    """Rank-r truncation split sqrt(S / s) on each side: s B A is the truncation U_r S_r Vh_r, and
    B, A carry the same singular values (B^T B = A A^T = diag(S_r) / s)."""
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    U, S, Vh = svd_of_product(B, A)
    Ud, Sd, Vhd = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    for r, s in [(3, 2.0), (6, 0.5), (9, 1.0)]:
        Bt, At = truncated_factors(U, S, Vh, r, s)
        assert Bt.shape == (40, r) and At.shape == (r, 30)
        k = min(r, 6)
        truncation = (Ud[:, :k] * Sd[:k]) @ Vhd[:k]
        torch.testing.assert_close(s * Bt @ At, truncation, rtol=0, atol=1e-10 * float(Sd[0]))
        torch.testing.assert_close(Bt.T @ Bt, At @ At.T, rtol=0, atol=1e-10 * float(Sd[0]))
        if r > k:  # beyond the product's rank: zero components
            assert not Bt[:, k:].any() and not At[k:].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs K >= 1"):
        stacked_svd([], [])
    with pytest.raises(ValueError, match=r"pair 1 has B \(4, 2\) and A \(3, 5\)"):
        stacked_svd([torch.ones(4, 2), torch.ones(4, 2)], [torch.ones(2, 5), torch.ones(3, 5)])
    with pytest.raises(ValueError, match=r"weights must be \[1\]"):
        stacked_svd([torch.ones(4, 2)], [torch.ones(2, 5)], [1.0, 2.0])
