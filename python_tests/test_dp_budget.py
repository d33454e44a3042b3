"""The privacy budget guard (no client spends past its target: retries, failures, resume, Flower),
calibration that fails loudly, and the delta rule with its report."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedlora_ext.dp import PrivacyAccount, default_delta, noise_for_epsilon
from fedlora_ext.dp.rdp import rdp_epsilon
from fedlora_ext.federated.client_state import restore_client
from fedlora_ext.federated.privacy import format_report
from fedlora_ext.federated.simulation import Simulation, simulate
from fedtools import small_config

TARGET = 4.0


def retry_config(**changes):
    """Six clients, half sampled per attempt, half the replies lost, min_clients 3, up to 3 retries:
    retries re-train clients, so without the guard some would train in more than ``rounds`` attempts."""
    values = dict(num_clients=6, rounds=3, local_steps=2, batch_size=4, participation=0.5, dp_epsilon=TARGET,
                  round_retries=3, client_failure_rate=0.5, client_failure_mode="dropout", min_clients=3,
                  dp_noise_seed=5, num_examples=120)
    values.update(changes)
    return small_config("fedit", **values)


def test_retries_never_spend_past_the_target(tmp_path, caplog):
    config = retry_config(out_dir=str(tmp_path))
    torch.manual_seed(config.seed)
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        result = simulate(config, progress=False)
    steps = result.strategy.local_steps_per_round
    for client in result.clients:
        account = client.privacy.account
        assert account.epsilon() <= TARGET
        assert account.steps <= config.rounds * steps(client.num_examples)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    refused = {cid: why for line in lines for cid, why in line.get("budget_exhausted", {}).items()}
    assert refused, "the retries should have reached some client's budget"
    for cid, why in refused.items():
        assert why.startswith(f"client {cid}: epsilon would reach") and f"> target {TARGET:g}" in why
        account = result.clients[int(cid)].privacy.account
        assert account.steps == config.rounds * steps(result.clients[int(cid)].num_examples)  # it spent all
    assert "privacy budget exhausted" in caplog.text
    assert max(line["epsilon_max"] for line in lines) <= TARGET


def test_every_client_every_round_spends_exactly_the_calibrated_epsilon():
    """Sampled every round, never retried: nobody is refused and every client ends at the epsilon of
    its calibrated sigma after rounds * local_steps (the search is opacus's, as before the guard)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    config = small_config("fedit", num_clients=3, rounds=2, local_steps=2, batch_size=8, dp_epsilon=TARGET,
                          dp_delta=1e-5, dp_noise_seed=2)
    torch.manual_seed(config.seed)
    result = simulate(config, progress=False)
    assert all("budget_exhausted" not in row for row in result.history)
    for client in result.clients:
        account = client.privacy.account
        steps = config.rounds * result.strategy.local_steps_per_round(client.num_examples)
        q = min(1.0, config.batch_size / client.num_examples)
        sigma = get_noise_multiplier(target_epsilon=TARGET, target_delta=1e-5, sample_rate=q, steps=steps)
        assert account.noise_multiplier == sigma and account.steps == steps
        opacus = RDPAccountant()
        opacus.history = [(sigma, q, steps)]
        assert account.epsilon() == pytest.approx(opacus.get_epsilon(delta=1e-5), abs=1e-9)
        assert account.epsilon() == pytest.approx(rdp_epsilon([(sigma, q, steps)], 1e-5), abs=1e-9)
        assert 0 < account.epsilon() <= TARGET and not account.can_take(1)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_guard_admits_exactly_the_calibrated_steps(accountant):
    account = PrivacyAccount.calibrate(who="t", population=64, sample_rate=0.125, max_steps=12, accountant=accountant,
                                       target_epsilon=2.0)
    for _ in range(4):
        assert account.can_take(3)
        account.step(3)
    assert account.epsilon() <= 2.0 and account.epsilon_after(0) == account.epsilon()
    assert not account.can_take(1) and "epsilon would reach" in account.refusal(1, "client 0")
    given = PrivacyAccount.calibrate(who="t", population=64, sample_rate=0.125, max_steps=12, noise_multiplier=1.0)
    given.step(1000)
    assert given.target_epsilon is None and given.can_take(10**6)  # no target, no guard


def test_resume_keeps_the_guard(tmp_path):
    config = small_config("fedit", num_clients=3, rounds=3, local_steps=2, batch_size=8, dp_epsilon=TARGET,
                          dp_noise_seed=4, out_dir=str(tmp_path))
    torch.manual_seed(config.seed)
    first = Simulation(config)
    for round_index in range(2):
        first.step(round_index)
        first.save_checkpoint(round_index + 1, tmp_path)
    resumed = Simulation.resume(tmp_path)
    assert resumed.rounds_done == 2
    for client in resumed.clients:
        account = client.privacy.account
        assert account.target_epsilon == TARGET and account.steps == 4 and account.can_take(2)
    resumed.step(2)
    extra = resumed.step(3)  # a round more than calibrated: the restored history counts
    assert set(extra["budget_exhausted"]) == {"0", "1", "2"} and extra["clients"] == []
    assert all(c.privacy.account.steps == 6 and c.privacy.account.epsilon() <= TARGET for c in resumed.clients)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_an_unreachable_epsilon_is_a_one_line_error(accountant):
    with pytest.raises(ValueError) as error:
        PrivacyAccount.calibrate(who="client 0 (n = 20)", population=20, sample_rate=0.2, max_steps=10,
                                 accountant=accountant, target_epsilon=0.001)
    message = str(error.value)
    assert "\n" not in message
    for part in ("client 0", "target epsilon 0.001", "q = 0.2", "10 steps", "sigma more than 1e6"):
        assert part in message
    with pytest.raises(ValueError, match=r"target epsilon 0.001 .* sigma more than 1e6"):
        Simulation(small_config("fedit", dp_epsilon=0.001, dp_accountant=accountant, batch_size=4))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_small_reachable_epsilons_are_positive_and_met(accountant):
    cases = [(0.5, None, 0.25, 8), (0.001, 20**-1.1, 0.4, 60)]  # the second once reported epsilon -0.0069
    for target, delta, q, steps in cases:
        account = PrivacyAccount.calibrate(who="t", population=20, sample_rate=q, max_steps=steps,
                                           accountant=accountant, target_epsilon=target, delta=delta)
        assert account.noise_multiplier == noise_for_epsilon(target, account.delta, q, steps, accountant)
        account.step(steps)
        assert 0 < account.epsilon() <= target
    loose = PrivacyAccount(accountant=accountant, delta=20**-1.1, noise_multiplier=500.0, sample_rate=0.4)
    loose.step(60)
    assert loose.epsilon() >= 0  # the RDP / PRV conversions go below 0 here: clamped


def test_delta_defaults_and_report(tmp_path):
    assert default_delta(100) == 1e-5 and default_delta(10**6) == pytest.approx(1e-7)
    config = small_config("ffa_lora", rounds=1, local_steps=1, dp_epsilon=8.0, server_dp_noise_multiplier=1.0,
                          participation=1.0, out_dir=str(tmp_path))
    torch.manual_seed(config.seed)
    result = simulate(config, progress=False)
    report = json.loads((tmp_path / "privacy.json").read_text())
    for client in result.clients:
        row = report["clients"][str(client.cid)]
        assert row["n"] == client.num_examples and row["delta"] == min(1e-5, 1 / (10 * client.num_examples))
        assert row["delta_rule"] == "default min(1e-5, 1/(10 n))" and row["target_epsilon"] == 8.0
    server = report["server"]
    assert server["n"] == config.num_clients and server["delta"] == min(1e-5, 1 / (10 * config.num_clients))
    assert server["delta_rule"].startswith("default")
    table = format_report(report)
    assert "delta rule" in table and "default min(1e-5, 1/(10 n))" in table
    assert f"{result.clients[0].num_examples:>7}" in table.splitlines()[1]
    given = PrivacyAccount.calibrate(who="t", population=100, sample_rate=0.1, max_steps=5, target_epsilon=4.0,
                                     delta=1e-4)
    assert given.report()["delta_rule"] == "given" and given.report()["n"] == 100
    with pytest.raises(ValueError, match=r"must be < 1 / n"):
        PrivacyAccount.calibrate(who="t", population=100, sample_rate=0.1, max_steps=5, noise_multiplier=1.0,
                                 delta=0.01)


def test_dp_fedavg_never_runs_more_noisy_rounds_than_calibrated():
    config = small_config("ffa_lora", rounds=1, local_steps=1, server_dp_epsilon=8.0, participation=1.0,
                          dp_noise_seed=3)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    sim.step(0)
    with pytest.raises(RuntimeError, match="server DP-FedAvg"):
        sim.step(1)


# ---- Flower ---------------------------------------------------------------------------------------
def flower_budget_run(config, tamper):
    """A Flower run of ``config`` on the in-memory grid with ``tamper``, two rounds past the calibrated ones."""
    from flowertools import InMemoryGrid
    from test_flower import node_configs

    from fedlora_ext.flower import FedLoRAStrategy
    from fedlora_ext.flower.client_app import app as client_app

    grid = InMemoryGrid(client_app, node_configs(config))
    grid.tamper = tamper
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    return grid, strategy


def test_the_flower_server_asks_no_node_past_its_budget_by_its_own_ledger(caplog):
    """The server counts the steps it asks of each node (a lost reply included) and stops asking once
    the next round would pass the target, whatever the nodes report: they hide their own refusals."""
    pytest.importorskip("flwr")
    # Flower has no retries: lost replies (dropouts) and rounds past the calibrated ones stand in for them
    config = small_config("fedit", num_clients=3, rounds=2, local_steps=2, batch_size=8, dp_epsilon=TARGET,
                          dp_noise_seed=6, min_clients=1)
    hidden = {}

    def tamper(node, reply, message):  # node 1000 drops its reply in round 1; no node tells the server
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        if "budget" in reply.content.config_records and reply.content["budget"].get("exhausted"):
            hidden[node] = True
            del reply.content["budget"]
        if node == 1000 and int(message.content["config"]["round"]) == 0:
            return None
        return reply

    grid, strategy = flower_budget_run(config, tamper)
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds + 2, timeout=60)
    history = strategy.history
    assert hidden and history[0]["clients"] == [1, 2] and history[1]["clients"] == [0, 1, 2]
    # rounds 3 and 4: the server's ledger refuses every node before asking (the lost round counted)
    for late in history[2:]:
        assert set(late["budget_exhausted"]) == {"0", "1", "2"} and late["clients"] == [] and "failed" not in late
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 3 * 2
    for context in grid.contexts.values():
        client = restore_client(json.loads(context.state["fedlora.client"]["meta"]), {})
        assert client.privacy.account.steps == 4 and client.privacy.account.epsilon() <= TARGET
    report = strategy.finish()
    assert report["epsilon_max"] <= TARGET
    assert {cid: r["steps"] for cid, r in report["clients"].items()} == {"0": 4, "1": 4, "2": 4}
    # node 1000's reply was lost in round 1, so the server heard its account only after round 2: agreement
    assert report["disagreements"] == {}


def test_a_flower_node_refuses_by_itself_when_the_server_lost_count(caplog):
    """A node whose account would pass its target refuses to train even when asked (a server that lost
    its ledger stands in for a faulty one); the refusal is not a failure and the node spends nothing."""
    pytest.importorskip("flwr")
    config = small_config("fedit", num_clients=3, rounds=2, local_steps=2, batch_size=8, dp_epsilon=TARGET,
                          dp_noise_seed=6, min_clients=1)

    def forget(node, reply, message):  # after round 2 the server "forgets" its ledger and hears no budget
        if reply.metadata.message_type == "train" and int(message.content["config"]["round"]) == 1:
            if "budget" in reply.content.config_records:
                del reply.content["budget"]
            for account in strategy.server.privacy_ledger.accounts.values():
                account.history = []
        return reply

    grid, strategy = flower_budget_run(config, forget)
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds + 1, timeout=60)
    history = strategy.history
    assert set(history[2]["budget_exhausted"]) == {"0", "1", "2"} and "failed" not in history[2]
    assert "the node did not train" in caplog.text
    for context in grid.contexts.values():
        client = restore_client(json.loads(context.state["fedlora.client"]["meta"]), {})
        assert client.privacy.account.steps == 4 and client.privacy.account.epsilon() <= TARGET
    report = strategy.finish()
    assert report["epsilon_max"] <= TARGET
