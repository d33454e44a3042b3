"""Personal evaluation follows the round's participants, not the population: each round evaluates the
own models of the clients that replied validly, and every client (with a test split) after the last
round and every ``eval_every`` rounds; ``personal_scope`` / ``personal_clients`` say which."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora_ext.federated.simulation import Simulation, personal_scope, simulate
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config

TIMINGS = {"seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval"}


def config(method: str = "fedsa_lora", **changes):
    values = dict(num_clients=12, participation=0.25, rounds=3, local_steps=1, num_examples=144)
    return small_config(method, **{**values, **changes})


def run_counted(monkeypatch, cfg):
    """Runs ``cfg``; returns its history and the cids whose own model was built, per round."""
    built: dict[int, list[int]] = {}
    original = Simulation.client_model

    def counting(self, client, round_index):
        built.setdefault(round_index, []).append(client.cid)
        return original(self, client, round_index)

    monkeypatch.setattr(Simulation, "client_model", counting)
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    sim.run(progress=False)
    return sim, built


def test_rounds_evaluate_their_participants_and_the_last_round_everyone(monkeypatch):
    cfg = config()
    sim, built = run_counted(monkeypatch, cfg)
    everyone = [c.cid for c in sim.clients]
    assert all(len(sim.client_data[cid][1]) for cid in everyone)  # every client has a test split
    for round_index, metrics in enumerate(sim.history):
        if round_index < cfg.rounds - 1:
            assert metrics["personal_scope"] == "participants"
            assert sorted(built[round_index]) == sorted(metrics["clients"])
            assert len(metrics["clients"]) == 3 < len(everyone)
        else:
            assert metrics["personal_scope"] == "all"
            assert built[round_index] == everyone
        assert metrics["personal_clients"] == len(built[round_index])
        assert 0.0 <= metrics["personal_accuracy"] <= 1.0 and metrics["personal_loss"] > 0


def test_clients_whose_reply_is_lost_are_not_participants(monkeypatch):
    cfg = config(client_failure_rate=0.6, client_failure_mode="dropout")
    sim, built = run_counted(monkeypatch, cfg)
    lossy = [r for r, m in enumerate(sim.history[:-1]) if "failed" in m]
    assert lossy  # some sampled clients trained, but their reply was lost
    for r in lossy:
        metrics = sim.history[r]
        assert sorted(built[r]) == sorted(metrics["clients"]) and metrics["personal_clients"] == len(metrics["clients"])
        assert not set(built[r]) & {int(cid) for cid in metrics["failed"]}
    assert sim.history[-1]["personal_scope"] == "all" and sim.history[-1]["personal_clients"] == cfg.num_clients


def test_eval_every_evaluates_everyone_on_its_rounds_and_the_last(monkeypatch):
    cfg = config(rounds=5, eval_every=2)
    assert [personal_scope(cfg, r) for r in range(5)] == ["participants", "all", "participants", "all", "all"]
    sim, built = run_counted(monkeypatch, cfg)
    assert [m["personal_scope"] for m in sim.history] == ["participants", "all", "participants", "all", "all"]
    assert [m["personal_clients"] for m in sim.history] == [3, 12, 3, 12, 12]
    assert [len(built[r]) for r in range(5)] == [3, 12, 3, 12, 12]
    every_round = config(rounds=2, eval_every=1)
    assert [personal_scope(every_round, r) for r in range(2)] == ["all", "all"]


def test_only_clients_with_a_test_split_count():
    cfg = config(rounds=1, num_clients=4, participation=1.0, num_examples=64)
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    sim.client_data[1] = (sim.client_data[1][0], sim.client_data[1][1].select([]))
    metrics = sim.step(0)
    assert metrics["personal_scope"] == "all" and metrics["personal_clients"] == 3


def test_methods_without_personal_evaluation_have_no_personal_metrics(monkeypatch):
    sim, built = run_counted(monkeypatch, config("fedit", rounds=2))
    assert not built
    for metrics in sim.history:
        assert "test_accuracy" in metrics
        assert not [k for k in metrics if k.startswith("personal_")], metrics
    personal = config("fedit", rounds=2, personal_eval=True)
    assert [m["personal_scope"] for m in simulate(personal, progress=False).history] == ["participants", "all"]


def test_a_resumed_run_evaluates_as_the_uninterrupted_one(tmp_path):
    cfg = config(rounds=3, eval_every=2, client_failure_rate=0.3)
    whole = tmp_path / "whole"
    simulate(cfg.replace(out_dir=str(whole)), progress=False)
    cut = tmp_path / "cut"
    torch.manual_seed(cfg.seed)
    first = Simulation(cfg.replace(out_dir=str(cut)))
    cut.mkdir()
    first.step(0)
    first.save_checkpoint(1, cut)
    resumed = Simulation.resume(cut)
    resumed.run(progress=False)

    def rows(folder):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    reference = rows(whole)
    assert [m["personal_scope"] for m in reference] == ["participants", "all", "all"]
    assert rows(cut) == reference


@pytest.mark.parametrize("rounds,every,expected", [(1, None, ["all"]), (4, 3, ["participants"] * 2 + ["all"] * 2)])
def test_scope_depends_only_on_the_round_and_the_config(rounds, every, expected):
    cfg = config(rounds=rounds, eval_every=every)
    assert [personal_scope(cfg, r) for r in range(rounds)] == expected
