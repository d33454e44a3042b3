"""FlexLoRA (arXiv 2402.11505), recomputed here in float64 from the recorded uploads: the server's
dW = sum_k p_k s_k B_k A_k and its SVD (dense, torch.linalg.svd), the global model equal to dW, every
client's download the rank-r_k truncation split sqrt(S) on each side with its own scale undone, with
and without DP-SGD, heterogeneous ranks (4, 2, 1)."""

from __future__ import annotations

import functools

import pytest
import torch

from fedlora_ext.federated import Simulation
from fedlora_ext.federated.comm import payload_bytes
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import fedavg_p, layer_views, lora_scale, pristine_weights, run_recorded, small_config

RANKS = (4, 2, 1)
G = sum(RANKS)  # the global adapter's rank (``rank``): the global model is then dW itself


@functools.lru_cache(maxsize=None)
def recorded(dp: bool = False, rslora: bool = False, global_rank: int = G):
    changes = dict(dp_noise_multiplier=1.0, dp_noise_seed=5, dp_max_grad_norm=1.0) if dp else {}
    config = small_config("flexlora", rank=global_rank, client_ranks=RANKS, rounds=3, local_steps=3, rslora=rslora,
                          dirichlet_alpha=1.0, **changes)
    return config, *run_recorded(config)


def modules_of(record) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] for n in record.replies[0].tensors if n.endswith("lora_A")})


def oracle_dW(config, record, module: str) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k in float64 from the replies, s_k from each client's uploaded rank."""
    p = fedavg_p(record.replies)
    dW = 0
    for k, reply in enumerate(record.replies):
        A, B = reply.tensors[f"{module}.lora_A"].double(), reply.tensors[f"{module}.lora_B"].double()
        dW = dW + p[k] * lora_scale(config, A.shape[0]) * (B @ A)
    return dW


def truncation(dW: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S


@pytest.mark.parametrize("dp, global_rank", [(False, G), (True, G), (False, 4)],
                         ids=["plain", "dp-sgd", "global-rank-4"])
def test_global_is_the_weighted_sum_of_products(dp, global_rank):
    """After every round s_G B_G A_G is dW's best rank-G approximation (float64 oracle: dW itself at
    G = sum r_k = 7, its rank-4 truncation at G = 4), and B_G^T B_G = A_G A_G^T = diag(S_G) / s_G: the
    global factors are dW's SVD split sqrt(S) on each side; the head is FedAvg."""
    config, sim, rec = recorded(dp, global_rank=global_rank)
    s_G = lora_scale(config, global_rank)
    assert len(rec.rounds) == config.rounds
    for record in rec.rounds:
        assert sorted(r.cid for r in record.replies) == [0, 1, 2]
        for module in modules_of(record):
            dW = oracle_dW(config, record, module)
            expected, S = truncation(dW, global_rank)
            if global_rank == G:
                torch.testing.assert_close(expected, dW, rtol=0, atol=1e-12 * float(S[0]))
            A_G = record.after.tensors[f"{module}.lora_A"].double()
            B_G = record.after.tensors[f"{module}.lora_B"].double()
            assert A_G.shape[0] == global_rank and B_G.shape[1] == global_rank
            scale = float(torch.linalg.norm(expected))
            assert scale > 0
            assert float(torch.linalg.norm(s_G * B_G @ A_G - expected)) <= 1e-5 * scale
            S_G = S[:global_rank]
            diag = torch.diag(torch.cat([S_G, S_G.new_zeros(global_rank - S_G.numel())]) / s_G)
            torch.testing.assert_close(B_G.T @ B_G, diag, rtol=0, atol=1e-5 * float(S[0]) / s_G)
            torch.testing.assert_close(A_G @ A_G.T, diag, rtol=0, atol=1e-5 * float(S[0]) / s_G)
        p = fedavg_p(record.replies)
        for name in [n for n in record.replies[0].tensors if n.startswith("head.")]:
            expected = sum(p[k] * r.tensors[name].double() for k, r in enumerate(record.replies))
            torch.testing.assert_close(record.after.tensors[name].double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dp, rslora", [(False, False), (True, False), (False, True)],
                         ids=["plain", "dp-sgd", "rslora"])
def test_download_is_the_rank_rk_truncation_split_sqrt_on_both_sides(dp, rslora):
    """What client k starts round t + 1 with: s_k B_k A_k equals the rank-r_k truncation of round t's
    dW to 1e-5, and B_k^T B_k = A_k A_k^T = diag(S_r) / s_k (sqrt(S) on each side, scale undone)."""
    config, sim, rec = recorded(dp, rslora)
    for record in rec.rounds[:-1]:
        for cid, r_k in enumerate(RANKS):
            views = rec.started[(record.index + 1, cid)]
            s_k = lora_scale(config, r_k)
            for module in modules_of(record):
                view = views[module]
                assert view.A.shape[0] == r_k and view.B.shape[1] == r_k
                assert view.scaling == pytest.approx(s_k)
                dW = oracle_dW(config, record, module)
                expected, S = truncation(dW, r_k)
                B, A = view.B.double(), view.A.double()
                atol = 1e-5 * float(S[0])
                torch.testing.assert_close(s_k * B @ A, expected, rtol=0, atol=atol)
                torch.testing.assert_close(B.T @ B, torch.diag(S[:r_k]) / s_k, rtol=0, atol=atol / s_k)
                torch.testing.assert_close(A @ A.T, torch.diag(S[:r_k]) / s_k, rtol=0, atol=atol / s_k)


def test_first_round_starts_from_the_shared_initialisation():
    """Round 1: every client gets the first r_k rows of the initial A (unscaled) and B = 0."""
    config, sim, rec = recorded()
    initial = Simulation(config).state  # the run's deterministic start
    for cid, r_k in enumerate(RANKS):
        for module, view in rec.started[(0, cid)].items():
            assert torch.equal(view.A, initial.tensors[f"{module}.lora_A"][:r_k])
            assert not view.B.any()


def test_clients_train_both_factors_and_upload_them():
    """A and B both move; the upload is exactly the trained A_k [r_k, n], B_k [m, r_k] and the head,
    r_k (m + n) floats per layer, and the download has the same size; the ledger agrees."""
    config, sim, rec = recorded()
    pristine = pristine_weights(config)
    for record in rec.rounds:
        for reply in record.replies:
            r_k = RANKS[reply.cid]
            start, end = rec.started[(record.index, reply.cid)], rec.finished[(record.index, reply.cid)]
            expected = 0
            for module, view in end.items():
                m, n = pristine[module].shape
                assert not torch.equal(view.A, start[module].A) and not torch.equal(view.B, start[module].B)
                assert torch.equal(reply.tensors[f"{module}.lora_A"], view.A)
                assert torch.equal(reply.tensors[f"{module}.lora_B"], view.B)
                expected += r_k * (m + n) * 4
            heads = rec.heads[(record.index, reply.cid)]
            expected += sum(t.numel() * 4 for t in heads.values())
            factors = sorted(n for n in reply.tensors if not n.startswith("head."))
            assert factors == sorted(f"{m}.lora_{f}" for m in end for f in "AB")
            assert len(reply.tensors) - len(factors) == len(heads)
            assert payload_bytes(reply.tensors) == expected
            assert sim.ledger.rounds[record.index]["up"][reply.cid] == expected
            assert sim.ledger.rounds[record.index]["down"][reply.cid] == expected


def test_global_model_is_base_plus_dW():
    """The evaluated global model is W0 + dW exactly (rank G = sum r_k, scale s_G), not a truncation."""
    config, sim, rec = recorded()
    record = rec.rounds[-1]
    views = layer_views(sim.global_model())
    pristine = pristine_weights(config)
    for module in modules_of(record):
        view = views[module]
        assert view.A.shape[0] == G and view.scaling == pytest.approx(lora_scale(config, G))
        expected = pristine[module].double() + oracle_dW(config, record, module)
        torch.testing.assert_close(view.effective(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("changes, needle", [
    (dict(server_dp_noise_multiplier=0.5), "server DP (DP-FedAvg) needs a method that averages"),
    (dict(aggregation="median"), "aggregation 'median' replaces an average"),
    (dict(rank=2), "flexlora: rank (the global adapter's rank) must be >= every client rank, got rank = 2 and "
                   "client_ranks [4, 2, 1]"),
])
def test_refusals(changes, needle):
    with pytest.raises(ValueError) as error:
        Simulation(small_config("flexlora", **{"rank": 4, "client_ranks": RANKS, **changes}))
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_rank_deficient_round_downloads_zero_components():
    """Only the rank-1 client replies: dW has rank 1, so the rank-4 client's download is that component
    and three zero rows / columns (sqrt(0) on each side); a round of zero updates leaves a zero global."""
    from fedlora_ext.core.state import ClientState, GlobalState, Reply
    from fedlora_ext.strategies import make_strategy

    config = small_config("flexlora", rank=G, client_ranks=RANKS)
    strategy = make_strategy(config)
    g = torch.Generator().manual_seed(0)
    names = {"layer.lora_A": (G, 6), "layer.lora_B": (5, G)}
    state = GlobalState(tensors={n: torch.zeros(shape) for n, shape in names.items()})
    B1, A1 = torch.randn(5, 1, generator=g), torch.randn(1, 6, generator=g)
    after = strategy.aggregate(state, [Reply(cid=2, num_examples=10, tensors={"layer.lora_A": A1, "layer.lora_B": B1})], 0)
    client = ClientState(cid=0, rank=4, num_examples=10)
    down = strategy.download(after, client, 1)
    B, A = down["layer.lora_B"].double(), down["layer.lora_A"].double()
    s_1, s_4 = lora_scale(config, 1), lora_scale(config, 4)
    torch.testing.assert_close(s_4 * B @ A, s_1 * B1.double() @ A1.double(), rtol=1e-6, atol=1e-7)
    assert not B[:, 1:].any() and not A[1:].any() and B[:, 0].any()
    zero = strategy.aggregate(state, [Reply(cid=2, num_examples=10, tensors={"layer.lora_A": A1,
                                                                            "layer.lora_B": torch.zeros(5, 1)})], 0)
    assert not zero.tensors["layer.lora_A"].any() and not zero.tensors["layer.lora_B"].any()
