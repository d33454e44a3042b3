"""What a private client releases (issue 22): its replies are a function of the DP-noised update and
public values only, in the simulator and on Flower, for every method; the training loss stays in the
client's own log; metrics.jsonl records every training (retries included) so the privacy table can
be recomputed from it; privacy.json states the adjacency and every released field."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import fedlora_ext.federated.simulation as simulation
from fedlora_ext.data.task import build_task
from fedlora_ext.dp.accountant import history_epsilon
from fedlora_ext.federated import release
from fedtools import small_config

#: every method a federation runs (centralized pools the data: it has no clients to release anything)
METHODS = {
    "fedit": {}, "ffa_lora": {}, "fedprox": {}, "fedsa_lora": {}, "fedsa_rslora": {}, "fedsa_vera": {},
    "flora": {"client_ranks": (8, 4), "rank": 8}, "hetlora": {"client_ranks": (8, 4), "rank": 8, "hetlora_gamma": 0.5},
    "lora_a2": {"client_ranks": (2, 1), "rank": 4}, "fedex_lora": {}, "standalone": {},
}
#: what a private client's reply may hold besides its tensors and n_k, in the simulator
SIMULATOR_METRICS = {"epsilon"}
#: ... and on Flower: the records of a train reply and the keys of each
FLOWER_RECORDS = {"arrays", "metrics", "privacy", "budget"}
FLOWER_METRICS = {"epsilon", "num-examples", "rank"}
FLOWER_PRIVACY = {"epsilon", "delta", "delta_rule", "n", "sigma", "q", "steps", "accountant", "target_epsilon"}


def private_config(method: str, **changes):
    values = dict(num_clients=2, rounds=2, local_steps=2, batch_size=8, num_examples=64, dp_epsilon=6.0,
                  dp_noise_seed=11, **METHODS.get(method, {}))
    values.update(changes)
    return small_config(method, **values)


def relabelled(task):
    """D': every training label moved to the next class (the same records, counts and texts): any
    field that depends on the records other than through the noised update differs on it."""
    classes = int(torch.as_tensor(task.train["labels"][:]).max()) + 1

    def shift(batch):
        moved = (torch.as_tensor(batch["labels"]) + 1) % classes
        return {"labels": moved, "label": moved}

    task.train = task.train.map(shift, batched=True)
    return task


def with_data(monkeypatch, module, flip: bool) -> None:
    """``module.build_task`` builds D, or D' with ``flip``."""
    monkeypatch.setattr(module, "build_task", lambda config: relabelled(build_task(config)) if flip else build_task(config))


def secrets_of(clients) -> set[float]:
    """Each client's noise key in the forms a leak could take: whole, and its two 32-bit halves."""
    keys = {c.privacy.noise.seed for c in clients}
    return {float(v) for k in keys for v in (k, k & 0xFFFFFFFF, k >> 32)}


RUN_CLIENT_ROUND = simulation.run_client_round


def simulated_replies(monkeypatch, config, flip: bool):
    """(replies of every client round in order, the clients) of a simulated run on D or D'."""
    with_data(monkeypatch, simulation, flip)
    replies = []

    def recording(*args, **kwargs):
        replies.append(RUN_CLIENT_ROUND(*args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(simulation, "run_client_round", recording)
    torch.manual_seed(config.seed)
    sim = simulation.Simulation(config)
    sim.run(progress=False)
    return replies, sim.clients


@pytest.mark.parametrize("method", list(METHODS))
def test_a_private_reply_is_a_function_of_the_noised_update_only(method, monkeypatch):
    """Same keys, D and D': tensors may differ (the DP output), every other field of every reply is
    the same and is exactly the documented set; the loss (which differs) never leaves the client."""
    config = private_config(method)
    on_d, clients = simulated_replies(monkeypatch, config, flip=False)
    on_d2, _ = simulated_replies(monkeypatch, config, flip=True)
    assert len(on_d) == len(on_d2) > 0
    secret = secrets_of(clients)
    for a, b in zip(on_d, on_d2):
        assert (a.cid, a.num_examples) == (b.cid, b.num_examples)
        assert set(a.metrics) == SIMULATOR_METRICS and a.metrics == b.metrics
        assert a.tensors.keys() == b.tensors.keys()
        assert not secret & {float(v) for v in a.metrics.values()}
    if method != "standalone":  # standalone uploads nothing
        assert any(not torch.equal(a.tensors[n], b.tensors[n]) for a, b in zip(on_d, on_d2) for n in a.tensors)
    # the loss did depend on the records: had it been sent, the replies would differ
    assert any(a.local["loss"] != b.local["loss"] for a, b in zip(on_d, on_d2))


def flower_train_replies(monkeypatch, config, flip: bool):
    """The train replies (node, reply) of a Flower run on the in-memory grid on D or D'."""
    pytest.importorskip("flwr")
    import fedlora_ext.flower.client_app as client_app
    from flowertools import InMemoryGrid
    from test_flower import node_configs

    from fedlora_ext.flower import FedLoRAStrategy

    with_data(monkeypatch, client_app, flip)
    client_app._RUNTIMES.clear()
    replies = []

    def record(node, reply, message):
        if not reply.has_error() and reply.metadata.message_type == "train":
            replies.append((node, reply))
        return reply

    grid = InMemoryGrid(client_app.app, node_configs(config))
    grid.tamper = record
    hetero = bool(config.client_ranks) and config.method != "lora_a2"
    strategy = FedLoRAStrategy(config.replace(client_ranks=()) if hetero else config)
    strategy.connect(grid)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    client_app._RUNTIMES.clear()
    return replies, grid


@pytest.mark.parametrize("method", list(METHODS))
def test_a_private_flower_reply_holds_only_the_documented_records(method, monkeypatch):
    """The same on Flower: the records of every train reply and their keys are exactly the documented
    ones and equal on D and D'; no noise key in any form; no loss."""
    config = private_config(method)
    on_d, grid = flower_train_replies(monkeypatch, config, flip=False)
    on_d2, _ = flower_train_replies(monkeypatch, config, flip=True)
    assert len(on_d) == len(on_d2) == config.num_clients * config.rounds
    from fedlora_ext.federated.client_state import restore_client

    keys = {restore_client(json.loads(c.state["fedlora.client"]["meta"]), {}).privacy.noise.seed
            for c in grid.contexts.values()}
    secret = {float(v) for k in keys for v in (k, k & 0xFFFFFFFF, k >> 32)}
    for (node_a, a), (node_b, b) in zip(on_d, on_d2):
        assert node_a == node_b
        assert set(a.content.keys()) == FLOWER_RECORDS
        assert set(a.content["metrics"]) == FLOWER_METRICS and dict(a.content["metrics"]) == dict(b.content["metrics"])
        assert set(a.content["privacy"]) == FLOWER_PRIVACY and dict(a.content["privacy"]) == dict(b.content["privacy"])
        assert set(a.content["budget"]) == {"exhausted"} and dict(a.content["budget"]) == dict(b.content["budget"])
        assert list(a.content["arrays"]) == list(b.content["arrays"])
        values = [*a.content["metrics"].values(), *a.content["privacy"].values(), *a.content["budget"].values()]
        assert not secret & {float(v) for v in values if isinstance(v, (int, float))}
        assert not any(str(k) in str(v) for k in keys for v in values)


def test_the_training_loss_stays_in_the_clients_own_log(tmp_path, caplog):
    """Under DP-SGD metrics.jsonl has no training loss; the client's log has it, with its steps and
    noise offsets. Without DP the loss is in the records as before."""
    config = private_config("fedit", out_dir=str(tmp_path / "dp"))
    with caplog.at_level(logging.INFO, logger="fedlora_ext.client"):
        simulation.simulate(config, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert rounds and all("train_loss" not in r for r in rounds)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedlora_ext.client"]
    assert len(lines) == 4 and all("training loss" in line and "noise offsets" in line for line in lines)
    assert "client 0, round 2: 2 local steps, noise offsets 2..3" in "\n".join(lines)
    plain = simulation.simulate(small_config("fedit", num_clients=2, rounds=1, local_steps=1), progress=False)
    assert plain.history[0]["train_loss"] > 0


def test_privacy_json_states_the_adjacency_and_every_released_field(tmp_path):
    config = private_config("fedsa_lora", out_dir=str(tmp_path))
    simulation.simulate(config, progress=False)
    report = json.loads((tmp_path / "privacy.json").read_text())
    stated = report["release"]
    assert stated["adjacency"] == release.ADJACENCY and "add/remove" in stated["adjacency"]
    assert stated["train_reply"] == release.TRAIN_REPLY and "training loss" in stated["kept_on_client"]
    # FedSA evaluates each client's own model on its held-out records: said to be outside the guarantee
    assert any("personal evaluation" in item for item in stated["outside_guarantee"])
    assert "OUTSIDE" in json.dumps(stated["personal_evaluation"])
    assert report["disagreements"] == {} and report["client_reports"].keys() == report["clients"].keys()


def test_metrics_jsonl_alone_gives_the_privacy_table(tmp_path):
    """Every training a client did, retries included, is in metrics.jsonl with its steps, sigma and q:
    the steps and epsilon of privacy.json follow from it (and delta) alone."""
    from test_dp_budget import retry_config

    config = retry_config(out_dir=str(tmp_path))
    torch.manual_seed(config.seed)
    simulation.simulate(config, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trainings = [t for r in rounds for t in r["trainings"]]
    assert any(t["attempt"] > 0 for t in trainings), "the run had no retry: the test proves nothing"
    # more trainings than replies: lost replies trained too
    assert len(trainings) > sum(len(r["clients"]) for r in rounds)
    report = json.loads((tmp_path / "privacy.json").read_text())
    for cid, row in report["clients"].items():
        mine = [t for t in trainings if t["client"] == int(cid)]
        assert sum(t["steps"] for t in mine) == row["steps"]
        history = [(t["sigma"], t["q"], t["steps"]) for t in mine]
        assert history_epsilon(history, row["delta"], row["accountant"]) == pytest.approx(row["epsilon"], rel=1e-12)


def test_the_run_log_holds_the_clients_own_lines_and_the_console_does_not(tmp_path, capfd):
    """``--log-file`` (jobs.job_log) takes the clients' own lines; nothing of them reaches the console."""
    from fedlora_ext.app.jobs import job_log

    with job_log(tmp_path / "run.log"):
        simulation.simulate(private_config("fedit", rounds=1), progress=False)
    text = (tmp_path / "run.log").read_text()
    assert "fedlora_ext.client: client 0, round 1: 2 local steps, noise offsets 0..1, training loss" in text
    captured = capfd.readouterr()
    assert "training loss" not in captured.out + captured.err


def test_docs_privacy_lists_every_released_field():
    """docs/PRIVACY.md, the audit a reviewer reads, names every field release.py declares."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "PRIVACY.md").read_text()
    for field in ("tensors", "num_examples", "metrics.epsilon", "metrics.rank", "privacy.*", "budget.exhausted",
                  "budget.refused", "node.cid", "node.num-examples", "node.rank", "metrics.<score>",
                  "metrics.num-examples", "training loss", "noise key", "add/remove"):
        assert field in text, field
    assert set(release.TRAIN_REPLY) and set(release.KEPT_ON_CLIENT) == {"training loss", "seconds in the DP step",
                                                                       "noise key and offset"}
