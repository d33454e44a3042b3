"""FedSA-LoRA (arXiv 2410.01463) and its rsLoRA / VeRA variants: A (VeRA: d) is shared and averaged,
every client keeps its own B (VeRA: b) and head, in its own storage.

The FedSA-LoRA reference shares one peft model among simulated clients, so "local" B leaks from one
client to the next (METHODS.md); these tests read every client's adapter off the live model at the
start and end of its training and check that what it starts from is its own B of its last round.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fedlora_ext.core import adapters
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import fedavg_p, run_recorded, small_config

SHARED = {"fedsa_lora": "A", "fedsa_rslora": "A", "fedsa_vera": "vera_d"}
LOCAL = {"fedsa_lora": "B", "fedsa_rslora": "B", "fedsa_vera": "vera_b"}
NAME = {"A": "lora_A", "B": "lora_B", "vera_d": "vera_d", "vera_b": "vera_b"}


@functools.lru_cache(maxsize=None)
def recorded(method: str, participation: float = 1.0, num_clients: int = 3, rounds: int = 2):
    config = small_config(method, num_clients=num_clients, participation=participation, rounds=rounds,
                          local_steps=3, dirichlet_alpha=1.0)
    return config, *run_recorded(config)


@pytest.mark.parametrize("method", list(SHARED))
def test_shared_factor_is_the_average(method):
    """After every aggregation the server's shared factor is sum_k p_k X_k of the clients' trained ones;
    clients upload nothing else (no B, no head)."""
    config, sim, rec = recorded(method)
    shared = SHARED[method]
    for record in rec.rounds:
        p = fedavg_p(record.replies)
        for reply in record.replies:
            assert reply.tensors and all(n.endswith(NAME[shared]) for n in reply.tensors), list(reply.tensors)
        modules = rec.finished[(record.index, record.replies[0].cid)].keys()
        for module in modules:
            expected = sum(p[k] * getattr(rec.finished[(record.index, r.cid)][module], shared).double()
                           for k, r in enumerate(record.replies))
            actual = record.after.tensors[f"{module}.{NAME[shared]}"].double()
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", list(SHARED))
def test_every_client_keeps_its_own_local_factor(method):
    """Each client's kept B (VeRA b) is the one it trained, they differ between clients, the next round
    starts from the client's own B and the averaged A, and a client's first round starts from B = 0."""
    config, sim, rec = recorded(method)
    shared, local = SHARED[method], LOCAL[method]
    last = config.rounds - 1
    modules = list(rec.finished[(0, 0)])
    for client in sim.clients:
        for module in modules:
            kept = client.tensors[f"{module}.{NAME[local]}"]
            assert torch.equal(kept, getattr(rec.finished[(last, client.cid)][module], local))
            # the next round started from its own B of the round before and from the server's A
            assert torch.equal(getattr(rec.started[(1, client.cid)][module], local),
                               getattr(rec.finished[(0, client.cid)][module], local))
            assert torch.equal(getattr(rec.started[(1, client.cid)][module], shared),
                               rec.rounds[0].after.tensors[f"{module}.{NAME[shared]}"])
            # its first round starts from a fresh B (VeRA: b), which peft initialises to zero
            assert not getattr(rec.started[(0, client.cid)][module], local).any()
        # the personalised head stays on the client, too
        assert any(n.startswith("head.") for n in client.tensors)
    # B is personal: no two clients hold the same one
    for module in modules:
        name = f"{module}.{NAME[local]}"
        kept = [c.tensors[name] for c in sim.clients]
        for i in range(len(kept)):
            for j in range(i + 1, len(kept)):
                assert not torch.allclose(kept[i], kept[j]), f"clients {i} and {j} share {name}"


@pytest.mark.parametrize("method", list(SHARED))
def test_kept_tensors_live_in_separate_storage(method):
    """No shared model object: two clients' kept tensors are distinct tensors with distinct storage, and
    none of them aliases a parameter of the simulator's (reused) peft models."""
    config, sim, rec = recorded(method)
    model_storage = {p.untyped_storage().data_ptr() for m in sim.bench._models.values() for p in m.parameters()}
    seen = {}
    for client in sim.clients:
        assert client.tensors
        for name, t in client.tensors.items():
            ptr = t.untyped_storage().data_ptr()
            assert ptr not in model_storage, f"client {client.cid} {name} aliases a model parameter"
            assert ptr not in seen, f"client {client.cid} {name} shares storage with {seen[ptr]}"
            seen[ptr] = (client.cid, name)


def test_partial_participation_never_leaks_another_clients_b():
    """4 clients, half of them per round, 3 rounds: whenever a client trains it starts from its own B of
    the last round it took part in, or from zero if it never took part, never from whoever trained last
    on the same reused model."""
    config, sim, rec = recorded("fedsa_lora", participation=0.5, num_clients=4, rounds=3)
    last_b: dict[int, dict] = {}
    took_part = set()
    for round_index in range(config.rounds):
        cids = sorted(cid for (r, cid) in rec.started if r == round_index)
        assert len(cids) == 2
        for cid in cids:
            took_part.add(cid)
            for module, view in rec.started[(round_index, cid)].items():
                if cid in last_b:
                    assert torch.equal(view.B, last_b[cid][module])
                else:
                    assert not view.B.any(), f"round {round_index}: client {cid} started from a stale B"
        for cid in cids:
            last_b[cid] = {m: v.B for m, v in rec.finished[(round_index, cid)].items()}
    assert len(took_part) > 2  # the sampling really mixed clients, so a leak had a chance to show


def test_rslora_scaling_is_alpha_over_sqrt_r():
    """fedsa_rslora trains with s = alpha / sqrt(r) (peft's own scaling on every client layer)."""
    config, sim, rec = recorded("fedsa_rslora")
    s = config.alpha / config.rank**0.5
    assert s != config.alpha / config.rank
    for views in rec.finished.values():
        for view in views.values():
            assert view.scaling == pytest.approx(s)


def test_vera_shares_d_keeps_b_and_trains_both():
    """fedsa_vera: the d vectors [r] travel, the b vectors [out] stay; both actually move in training
    (Opacus issue 820: peft adapters can silently stop updating)."""
    config, sim, rec = recorded("fedsa_vera")
    for key, views in rec.finished.items():
        for module, view in views.items():
            start = rec.started[key][module]
            assert view.vera_d.shape == (config.rank,)
            assert not torch.equal(view.vera_d, start.vera_d)
            assert not torch.equal(view.vera_b, start.vera_b)
    model = sim.bench.model(config.rank)
    assert all(n.endswith(("vera_d", "vera_b")) for n in adapters.adapter_parameters(model))


@pytest.mark.parametrize("method", list(SHARED))
def test_personalised_evaluation_is_reported(method):
    config, sim, rec = recorded(method)
    for metrics in sim.history:
        assert 0.0 <= metrics["personal_accuracy"] <= 1.0 and metrics["personal_loss"] > 0
        assert "test_accuracy" not in metrics  # the server has no B: no global model to score
