"""Heterogeneous client ranks [8, 4, 2, 1]: FLoRA's stacking, HetLoRA's zero-padding, sparsity weights and
rank self-pruning, FedIT's zero-padded average, and every method that allows them runs with them."""

from __future__ import annotations

import functools

import pytest
import torch

from fedlora_ext.federated import Simulation
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import fedavg_p, layer_views, lora_scale, relative_error, run_recorded, small_config

RANKS = (8, 4, 2, 1)
EXACT_RTOL = 1e-6  # float32 rounding, relative (see test_fed_exactness.py)


@functools.lru_cache(maxsize=None)
def recorded(method: str, rounds: int = 2):
    config = small_config(method, rank=8, alpha=16.0, client_ranks=RANKS, num_clients=len(RANKS), rounds=rounds,
                          local_steps=3, dirichlet_alpha=1.0, hetlora_lambda=1e-2)
    return config, *run_recorded(config)


def _pad(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pads a factor to ``rank`` along ``dim`` (plain torch)."""
    shape = list(x.shape)
    shape[dim] = rank - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# ---- FLoRA ---------------------------------------------------------------------------------------------
def test_flora_clients_train_their_own_rank():
    config, sim, rec = recorded("flora")
    for record in rec.rounds:
        for reply in record.replies:
            r = RANKS[reply.cid]
            for module, view in rec.finished[(record.index, reply.cid)].items():
                assert reply.tensors[f"{module}.lora_A"].shape == (r, 32)
                assert reply.tensors[f"{module}.lora_B"].shape == (32, r)
                assert view.scaling == pytest.approx(config.alpha / r)  # s_k = alpha / r_k


def test_flora_merged_base_changes_as_stacked_math_says():
    """W_after - W_before = sum_k p_k (alpha / r_k) B_k A_k over the heterogeneous ranks, exactly; the
    remembered stacks are [m, sum r_k] and [sum r_k, n] and multiply out to the same delta."""
    config, sim, rec = recorded("flora")
    total_rank = sum(RANKS)
    for record in rec.rounds:
        p = fedavg_p(record.replies)
        stacks = record.after.info["stacks"][record.index]
        for module in record.before.base:
            delta = torch.zeros(32, 32, dtype=torch.float64)
            for k, reply in enumerate(record.replies):
                view = rec.finished[(record.index, reply.cid)][module]
                delta += p[k] * lora_scale(config, RANKS[reply.cid]) * (view.B.double() @ view.A.double())
                # the client trained on the merged base the server held
                assert torch.equal(view.W, record.before.base[module])
            stored = record.after.base[module].double() - record.before.base[module].double()
            assert relative_error(stored, delta) < EXACT_RTOL
            B_s, A_s = stacks[f"{module}.B_stacked"], stacks[f"{module}.A_stacked"]
            assert B_s.shape == (32, total_rank) and A_s.shape == (total_rank, 32)
            assert relative_error(B_s.double() @ A_s.double(), delta) < EXACT_RTOL


def test_flora_download_grows_with_sum_of_ranks():
    """Round 1 downloads only the head; round 2 the head plus round 1's stacks: (sum r_k)(m + n) floats
    per module, for every client (all took part in round 1)."""
    config, sim, rec = recorded("flora")
    modules = list(rec.finished[(0, 0)])
    heads = sum(t.numel() * 4 for t in rec.heads[(0, 0)].values())
    stacked = len(modules) * sum(RANKS) * (32 + 32) * 4
    assert all(b == heads for b in sim.ledger.rounds[0]["down"].values())
    assert all(b == heads + stacked for b in sim.ledger.rounds[1]["down"].values())
    assert len(sim.ledger.rounds[1]["down"]) == len(RANKS)
    # and the upload is each client's own rank: r_k (m + n) per module plus the head
    for cid, nbytes in sim.ledger.rounds[0]["up"].items():
        assert nbytes == heads + len(modules) * RANKS[cid] * (32 + 32) * 4


def test_flora_download_follows_missed_merges():
    """With partial participation a client downloads the stacks of every merge since it last trained."""
    config = small_config("flora", rank=8, alpha=16.0, client_ranks=RANKS, num_clients=4, participation=0.5,
                          rounds=3, local_steps=2)
    sim = Simulation(config)
    for round_index in range(config.rounds):
        sim.step(round_index)
    client = sim.clients[0]
    since = client.info.get("last_round", 0)
    payload = sim.strategy.download(sim.state, client, config.rounds)
    rounds_sent = sorted({int(n.split(".", 1)[0].removeprefix("round")) for n in payload if n.startswith("round")})
    assert rounds_sent == [r for r in range(config.rounds) if r >= since]
    for r in rounds_sent:  # each stack has the ranks of that round's participants
        participants = sim.history[r]["clients"]
        B_s = next(t for n, t in payload.items() if n.startswith(f"round{r}.") and n.endswith("B_stacked"))
        assert B_s.shape[1] == sum(RANKS[c] for c in participants)


# ---- HetLoRA -------------------------------------------------------------------------------------------
def test_hetlora_clients_get_the_first_ranks_of_the_global():
    config, sim, rec = recorded("hetlora")
    for record in rec.rounds:
        for reply in record.replies:
            r = rec.ranks[(record.index, reply.cid)]
            for module, view in rec.started[(record.index, reply.cid)].items():
                assert view.A.shape == (r, 32) and view.B.shape == (32, r)
                assert torch.equal(view.A, record.before.tensors[f"{module}.lora_A"][:r])
                assert torch.equal(view.B, record.before.tensors[f"{module}.lora_B"][:, :r])
                assert reply.tensors[f"{module}.lora_A"].shape == (r, 32)


def test_hetlora_sparsity_weighted_zero_padded_average():
    """Server: w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F per module, A = sum w_k pad(A_k), B = sum w_k pad(B_k)
    at r_max = 8; the ranks only some clients have get only their (weighted) contributions."""
    config, sim, rec = recorded("hetlora")
    for record in rec.rounds:
        for module in rec.finished[(record.index, record.replies[0].cid)]:
            views = [rec.finished[(record.index, r.cid)][module] for r in record.replies]
            norms = torch.stack([torch.linalg.norm(v.B.double() @ v.A.double()) for v in views])
            assert (norms > 0).all()
            w = norms / norms.sum()
            A = sum(w[k] * _pad(v.A.double(), 8, 0) for k, v in enumerate(views))
            B = sum(w[k] * _pad(v.B.double(), 8, 1) for k, v in enumerate(views))
            torch.testing.assert_close(record.after.tensors[f"{module}.lora_A"].double(), A, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(record.after.tensors[f"{module}.lora_B"].double(), B, rtol=1e-5, atol=1e-7)
            # rank 7 exists only on the rank-8 client: its row is that client's, scaled by its weight
            k8 = next(k for k, r in enumerate(record.replies) if RANKS[r.cid] == 8)
            torch.testing.assert_close(record.after.tensors[f"{module}.lora_A"][7].double(),
                                       w[k8] * views[k8].A[7].double(), rtol=1e-5, atol=1e-8)
        heads = [n for n in record.before.tensors if n.startswith("head.")]
        p = fedavg_p(record.replies)
        for name in heads:  # the head is plain FedAvg
            expected = sum(p[k] * r.tensors[name].double() for k, r in enumerate(record.replies))
            torch.testing.assert_close(record.after.tensors[name].double(), expected, rtol=1e-6, atol=1e-7)


def _tail_norm(views, rank: int, gamma: float) -> float:
    start = int(gamma * rank)  # floor(g r)
    return sum(float(torch.linalg.norm(v.B[:, start:].double()) * torch.linalg.norm(v.A[start:].double()))
               for v in views.values())


def test_hetlora_penalty_and_tail_norm():
    """The self-pruning penalty is lambda * sum_modules ||B[:, g r:]|| ||A[g r:, :]||, and the tail norm a
    client remembers is the same sum after its training."""
    config = small_config("hetlora", rank=8, alpha=16.0, client_ranks=RANKS, num_clients=4, rounds=1,
                          local_steps=2, hetlora_lambda=0.5)
    sim, rec = run_recorded(config)
    for client in sim.clients:
        views = rec.finished[(0, client.cid)]
        assert client.info["tail_norm"] == pytest.approx(_tail_norm(views, RANKS[client.cid], config.hetlora_gamma),
                                                         rel=1e-5)
    # the penalty closure on a model loaded with a client's factors
    client = sim.clients[0]
    model = sim.bench.model(client.rank)
    penalty = sim.strategy.penalty(model, client)
    expected = config.hetlora_lambda * _tail_norm(layer_views(model), client.rank, config.hetlora_gamma)
    assert float(penalty().detach()) == pytest.approx(expected, rel=1e-5)
    assert sim.strategy.penalty(model, client) is not None
    assert Simulation(config.replace(hetlora_lambda=0.0)).strategy.penalty(model, client) is None


def test_hetlora_rank_self_pruning():
    """When a client's tail norm fell since its last round its rank shrinks to floor(0.99 r) (never below
    1); when it did not, or on its first round, the rank stays. Forced by setting the remembered norm."""
    config = small_config("hetlora", rank=8, alpha=16.0, client_ranks=RANKS, num_clients=4, rounds=2,
                          local_steps=2)
    # the remembered tail norm was huge: every tail "fell"
    sim = Simulation(config)
    for client in sim.clients:
        client.info["tail_norm"] = 1e9
    sim.step(0)
    assert [c.rank for c in sim.clients] == [7, 3, 1, 1]  # floor(0.99 * [8, 4, 2, 1]), rank 1 stays
    payload = sim.strategy.download(sim.state, sim.clients[0], 1)
    assert next(t for n, t in payload.items() if n.endswith("lora_A")).shape[0] == 7
    sim.step(1)  # the pruned ranks train and aggregate (zero-padded back to r_max = 8)
    assert all(t.shape[0] == 8 for n, t in sim.state.tensors.items() if n.endswith("lora_A"))
    # the remembered norm was zero: no tail can have fallen below it
    sim = Simulation(config)
    for client in sim.clients:
        client.info["tail_norm"] = 0.0
    sim.step(0)
    assert [c.rank for c in sim.clients] == list(RANKS)
    # first round: nothing to compare with
    sim = Simulation(config)
    sim.step(0)
    assert [c.rank for c in sim.clients] == list(RANKS)


# ---- FedIT with zero-padding, and every method that takes heterogeneous ranks --------------------------
def test_fedit_zero_pads_to_the_largest_rank():
    config, sim, rec = recorded("fedit", rounds=1)
    record = rec.rounds[0]
    p = fedavg_p(record.replies)
    for module in rec.finished[(0, 0)]:
        views = [rec.finished[(0, r.cid)][module] for r in record.replies]
        A = sum(p[k] * _pad(v.A.double(), 8, 0) for k, v in enumerate(views))
        torch.testing.assert_close(record.after.tensors[f"{module}.lora_A"].double(), A, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["fedit", "fedprox", "flora", "hetlora", "standalone"])
def test_heterogeneous_ranks_run(method):
    """Every method that allows heterogeneous ranks runs with [8, 4, 2, 1]: each client trains at its own
    rank, and a global adapter (where the method keeps one) has the largest rank."""
    config = small_config(method, rank=8, alpha=16.0, client_ranks=RANKS, num_clients=4, rounds=2,
                          local_steps=2)
    sim, rec = run_recorded(config)
    assert len(sim.history) == 2 and all(h["train_loss"] > 0 for h in sim.history)
    assert {key for key in rec.finished} == {(r, c) for r in range(2) for c in range(4)}
    for (round_index, cid), views in rec.finished.items():
        assert all(v.A.shape == (RANKS[cid], 32) and v.B.shape == (32, RANKS[cid]) for v in views.values())
    for name, t in sim.state.tensors.items():
        if name.endswith("lora_A"):
            assert t.shape == (8, 32)
