"""FedSVD (reference code sw-programmer/FedSVD, reinit_lora), recomputed here in float64 from the
recorded uploads: B = sum_k p_k B_k with A frozen, and after every ``svd_period``-th aggregation
A <- V_r^T, B <- U_r S_r of the dense SVD of B A (product unchanged, A with orthonormal rows), with and
without DP-SGD, under DP-FedAvg (the re-factorisation is post-processing of the noised average), and
the download of A (r n per layer) exactly when a client's copy is stale."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from fedlora_ext.federated import Simulation
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import Recorder, fedavg_p, pristine_weights, small_config

F32 = 4


def record_end_round(sim: Simulation) -> list[tuple]:
    """Wraps the strategy's ``end_round``: (state before, state after) of every call, deep copies."""
    calls = []
    end_round = sim.strategy.end_round

    def recording(state, clients):
        before = copy.deepcopy(state)
        end_round(state, clients)
        calls.append((before, copy.deepcopy(state)))

    sim.strategy.end_round = recording
    return calls


@functools.lru_cache(maxsize=None)
def recorded(dp: bool = False, period: int = 2, rounds: int = 4, server_dp: bool = False, **extra):
    changes = dict(dp_noise_multiplier=1.0, dp_noise_seed=7, dp_max_grad_norm=1.0) if dp else {}
    if server_dp:
        changes.update(server_dp_noise_multiplier=0.3, server_dp_clip=5.0, participation=1.0)
    config = small_config("fedsvd", rank=4, rounds=rounds, local_steps=3, svd_period=period, dirichlet_alpha=1.0,
                          **changes, **dict(extra))
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    rec, calls = Recorder(sim), record_end_round(sim)
    sim.run(progress=False)
    return config, sim, rec, calls


def modules(state) -> list[str]:
    return sorted(n.rsplit(".", 1)[0] for n in state.tensors if n.endswith("lora_A"))


def check_refactorised(before, after) -> None:
    """The oracle of one re-factorisation: dense float64 SVD of B A = U S V^T; the new factors give the
    same product, A has orthonormal rows, B^T B = diag(S_r^2) (B = U_r S_r, up to the signs of U and V)."""
    for module in modules(before):
        A0, B0 = before.tensors[f"{module}.lora_A"].double(), before.tensors[f"{module}.lora_B"].double()
        A1, B1 = after.tensors[f"{module}.lora_A"].double(), after.tensors[f"{module}.lora_B"].double()
        product = B0 @ A0
        S = torch.linalg.svdvals(product)[: A0.shape[0]]
        atol = 1e-5 * float(S[0])
        assert float(S[0]) > 0
        torch.testing.assert_close(B1 @ A1, product, rtol=0, atol=atol)
        torch.testing.assert_close(A1 @ A1.T, torch.eye(A0.shape[0], dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(B1.T @ B1, torch.diag(S**2), rtol=0, atol=atol * float(S[0]))
        Vh = torch.linalg.svd(product, full_matrices=False)[2][: A0.shape[0]]
        signs = torch.sign((A1 * Vh).sum(dim=1))  # A1's rows are V's right singular vectors, up to sign
        torch.testing.assert_close(A1, signs[:, None] * Vh, rtol=0, atol=1e-5)
    for name in (n for n in before.tensors if n.startswith("head.")):
        assert torch.equal(after.tensors[name], before.tensors[name])


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_server_averages_b_and_refactorises_every_period(dp):
    """aggregate: B = sum_k p_k B_k (float64 oracle), A and the rest untouched; end_round: the SVD
    restart after aggregations 2 and 4 (svd_period = 2), nothing after 1 and 3."""
    config, sim, rec, calls = recorded(dp)
    assert len(rec.rounds) == len(calls) == config.rounds
    for record, (before, after) in zip(rec.rounds, calls):
        p = fedavg_p(record.replies)
        for module in modules(record.before):
            b, a = f"{module}.lora_B", f"{module}.lora_A"
            expected = sum(p[k] * r.tensors[b].double() for k, r in enumerate(record.replies))
            torch.testing.assert_close(record.after.tensors[b].double(), expected, rtol=1e-6, atol=1e-7)
            assert torch.equal(record.after.tensors[a], record.before.tensors[a])
        for name, t in record.after.tensors.items():  # what end_round saw is what aggregate made
            assert torch.equal(before.tensors[name], t)
        if (record.index + 1) % config.svd_period == 0:
            check_refactorised(before, after)
        else:
            assert all(torch.equal(after.tensors[n], t) for n, t in before.tensors.items())
    for name, t in calls[-1][1].tensors.items():
        assert torch.equal(sim.state.tensors[name], t)


def test_effective_weight_is_unchanged_by_the_refactorisation():
    """s B A with s = alpha / r before and after: the global model's weights stay the same (1e-6)."""
    config, sim, rec, calls = recorded(period=1, rounds=2)
    s = config.alpha / config.rank
    for before, after in calls:
        for module in modules(before):
            old = s * before.tensors[f"{module}.lora_B"].double() @ before.tensors[f"{module}.lora_A"].double()
            new = s * after.tensors[f"{module}.lora_B"].double() @ after.tensors[f"{module}.lora_A"].double()
            torch.testing.assert_close(new, old, rtol=0, atol=1e-6)


def test_refactorisation_after_dp_fedavg():
    """Under DP-FedAvg (the noised average of B replaces aggregate) the SVD restart runs on the noised
    global B: post-processing, the same oracle as without it."""
    config, sim, rec, calls = recorded(period=1, rounds=2, server_dp=True)
    assert rec.rounds == []  # the strategy's own average never ran: DP-FedAvg replaced it
    assert len(calls) == 2
    for before, after in calls:
        check_refactorised(before, after)
    assert sim.server.privacy.account.steps == 2


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_clients_train_b_on_the_current_a_and_upload_b(dp):
    """A frozen at the server's current A (re-factorised or not), B and the head train; the upload is
    B [m, r] and the head: r m floats per layer."""
    config, sim, rec, calls = recorded(dp)
    pristine = pristine_weights(config)
    for record in rec.rounds:
        for reply in record.replies:
            start, end = rec.started[(record.index, reply.cid)], rec.finished[(record.index, reply.cid)]
            expected = 0
            for module, view in end.items():
                assert torch.equal(view.A, start[module].A)
                assert torch.equal(view.A, record.before.tensors[f"{module}.lora_A"])
                assert not torch.equal(view.B, start[module].B)
                assert torch.equal(reply.tensors[f"{module}.lora_B"], view.B)
                expected += config.rank * pristine[module].shape[0] * F32
            heads = rec.heads[(record.index, reply.cid)]
            expected += sum(t.numel() * F32 for t in heads.values())
            assert not any(n.endswith("lora_A") for n in reply.tensors)
            assert sim.ledger.rounds[record.index]["up"][reply.cid] == expected


def test_a_is_downloaded_exactly_when_stale():
    """4 clients, half of them per round, svd_period 2: a client's download is B and the head, plus A
    (r n per layer) when a re-factorisation happened since it last trained (or at all, if it never
    trained): the ledger shows exactly that."""
    config, sim, rec, calls = recorded(period=2, rounds=5, num_clients=4, participation=0.5)
    pristine = pristine_weights(config)
    mods = modules(sim.state)
    b_bytes = sum(config.rank * pristine[m].shape[0] * F32 for m in mods)
    a_bytes = sum(config.rank * pristine[m].shape[1] * F32 for m in mods)
    head = sum(t.numel() * F32 for n, t in sim.state.tensors.items() if n.startswith("head."))
    refactored = [i for i in range(config.rounds) if (i + 1) % config.svd_period == 0]  # after these rounds
    last: dict[int, int] = {}
    saw_a = saw_without = False
    for round_index, metrics in enumerate(sim.history):
        for cid, got in sim.ledger.rounds[round_index]["down"].items():
            stale = any(j < round_index and j >= last.get(cid, -1) for j in refactored)
            assert got == b_bytes + head + (a_bytes if stale else 0), (round_index, cid)
            saw_a |= stale
            saw_without |= not stale and round_index > 2
        for cid in metrics["clients"]:
            last[cid] = round_index
    assert saw_a and saw_without


def test_svd_period_is_validated():
    with pytest.raises(ValueError, match="svd_period must be >= 1, got 0"):
        small_config("fedsvd", svd_period=0)


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam"])
def test_server_optimizer_moments_follow_the_new_basis(optimizer):
    """With a server optimizer the re-factorisation carries its moments of B into the new basis
    M = A V_r (B' = B M, recomputed here from the dense SVD): m' = m M, so the step it stands for in W,
    m A, is unchanged; v' = v (M * M)."""
    config, sim, rec, calls = recorded(period=1, rounds=2, server_optimizer=optimizer, server_lr=1.0)
    for before, after in calls:
        check_refactorised(before, after)
        moments_before = before.info["server_optimizer"]
        moments_after = after.info["server_optimizer"]
        for module in modules(before):
            a, b = f"{module}.lora_A", f"{module}.lora_B"
            A0, A1 = before.tensors[a].double(), after.tensors[a].double()
            B0 = before.tensors[b].double()
            Vh = torch.linalg.svd(B0 @ A0, full_matrices=False)[2][: A0.shape[0]]
            signs = torch.sign((A1 * Vh).sum(dim=1))
            M = A0 @ (signs[:, None] * Vh).T  # the basis change of B, with the signs the library chose
            m0, m1 = moments_before["m"][b].double(), moments_after["m"][b].double()
            torch.testing.assert_close(m1, m0 @ M, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(m1 @ A1, m0 @ A0, rtol=1e-4, atol=1e-6)
            if optimizer == "fedadam":
                v0, v1 = moments_before["v"][b].double(), moments_after["v"][b].double()
                torch.testing.assert_close(v1, v0 @ (M * M), rtol=1e-5, atol=1e-9)
