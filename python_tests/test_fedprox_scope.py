"""FedProx's proximal term covers exactly the tensors a client downloaded this round (METHODS.md:
(mu/2) ||w - w_global||^2, w_global = what came from the server): FedSA-LoRA's A (downloaded) is pulled,
its B and head (kept on the client) are not; FFA-LoRA's B and head are pulled (A is frozen).

Each test runs a real client round (``run_client_round``, the simulator's wiring) whose local update is
replaced by: move every trainable tensor away from where the round started, then take the gradient of
the trainer's regulariser alone (no data term), so each tensor's proximal gradient is visible.
"""

from __future__ import annotations

import pytest
import torch

from fedlora_ext.core import adapters
from fedlora_ext.federated import Simulation
from fedlora_ext.federated.client import run_client_round
from fedlora_ext.strategies.base import factor_kind
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config

MU = 0.5
SHIFT = 0.25


def _proximal_gradients(method: str, **changes):
    """The proximal gradient of every trainable tensor in client 0's second round, its download, and the
    shifted values (by name)."""
    sim = Simulation(small_config(method, fedprox_mu=MU, **changes))
    sim.step(0)  # a first round: the client now keeps its own tensors
    client = sim.clients[0]
    payload = sim.server.configure(client, 1)
    seen = {}

    def local_update(trainer, model, client_, round_index):
        params = adapters.trainable_parameters(model)
        with torch.no_grad():
            for p in params.values():
                p.add_(SHIFT)
        regulariser = trainer._regulariser(params, None)
        grads = {n: None for n in params}
        if regulariser is not None:
            found = torch.autograd.grad(regulariser(), list(params.values()), allow_unused=True)
            grads = {n: g for n, g in zip(params, found)}
        seen.update(grads=grads, values={n: p.detach().clone() for n, p in params.items()})
        return 0.0

    sim.strategy.local_update = local_update
    run_client_round(sim.strategy, sim.bench, sim.state, client, payload, sim.client_data[0][0], 1)
    return seen["grads"], payload, seen["values"]


def _check(grads, payload, values, pulled_kinds, free_kinds):
    kinds = {factor_kind(n) for n in grads}
    assert pulled_kinds <= kinds and free_kinds <= kinds, kinds
    for name, grad in grads.items():
        kind = factor_kind(name)
        if kind in pulled_kinds:
            assert name in payload, f"{name} trains and is pulled, so it must have been downloaded"
            expected = MU * (values[name] - payload[name])
            assert grad is not None and grad.abs().max() > 0, f"{name}: no proximal gradient"
            torch.testing.assert_close(grad, expected)
        elif kind in free_kinds:
            assert name not in payload, f"{name} is kept locally, it must not be downloaded"
            assert grad is None or not grad.any(), f"{name} (kept locally) got a proximal gradient"


def test_fedsa_pulls_the_downloaded_a_only():
    grads, payload, values = _proximal_gradients("fedsa_lora")
    _check(grads, payload, values, pulled_kinds={"lora_A"}, free_kinds={"lora_B", "head"})


def test_ffa_pulls_b_and_head_never_a():
    grads, payload, values = _proximal_gradients("ffa_lora")
    assert not any(factor_kind(n) == "lora_A" for n in grads)  # A is frozen: not even trainable
    assert not any(factor_kind(n) == "lora_A" for n in payload)  # and never travels
    _check(grads, payload, values, pulled_kinds={"lora_B", "head"}, free_kinds=set())


@pytest.mark.parametrize("method", ["fedprox", "fedit"])
def test_fedit_pulls_everything_it_trains(method):
    grads, payload, values = _proximal_gradients(method)
    _check(grads, payload, values, pulled_kinds={"lora_A", "lora_B", "head"}, free_kinds=set())


def test_without_mu_there_is_no_term():
    sim = Simulation(small_config("fedsa_lora"))
    model = sim.bench.checkout(sim.clients[0].rank, sim.state, 0)
    from fedlora_ext.federated.client import LocalTrainer

    trainer = LocalTrainer(sim.config, sim.client_data[0][0], 0, proximal={})
    assert trainer._regulariser(adapters.trainable_parameters(model), None) is None
