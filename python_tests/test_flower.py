"""The Flower strategy and ClientApp against the in-process simulator, through Flower's own Message,
records and ClientApp dispatch (an in-memory Grid; the real deployment is test_flower_deployment.py).

Every method must end with bitwise the same global adapter, merged base and byte ledger as the
simulator with the same seeds; bad replies and dead nodes must stay out of the aggregate.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedlora_ext.core.config import FedConfig  # noqa: E402
from fedlora_ext.federated.simulation import simulate  # noqa: E402
from fedlora_ext.core.validation import RejectedUpdate  # noqa: E402
from fedlora_ext.flower import FedLoRAStrategy, FlowerRunError, config_from_run_config  # noqa: E402
from fedlora_ext.flower.client_app import app as client_app  # noqa: E402
from fedlora_ext.flower.records import from_arrays, to_arrays  # noqa: E402
from fedtools import method_extras  # noqa: E402
from flowertools import InMemoryGrid  # noqa: E402

CLIENTS = 3
METHODS = {  # method -> config changes on top of fedtools.METHOD_EXTRAS (ranks per node come from
    # node_config where heterogeneous)
    "fedit": {},
    "ffa_lora": {},
    "fedprox": {},
    "fedsa_lora": {},
    "fedsa_rslora": {},
    "fedsa_vera": {},
    "flora": {"client_ranks": (8, 4, 2), "rank": 8},
    "hetlora": {"client_ranks": (8, 4, 2), "rank": 8, "hetlora_gamma": 0.5},
    "lora_a2": {"client_ranks": (2, 1, 1), "rank": 4},
    "rolora": {"rounds": 3},  # rounds 1-3: B, A, B, and a download of only the factor updated last round
    "fed_sb": {},
    "fedex_lora": {},
    "standalone": {},
    "scaffold": {},  # SGD (METHOD_EXTRAS); c travels with x, c_k stays in the node's state
    "flexlora": {"client_ranks": (8, 4, 2), "rank": 14},  # global rank 14 = sum: the global is dW itself
    "fedsvd": {"svd_period": 1},  # round 2 downloads the re-factorised A, the node keeps it
}


def small(method: str, **changes) -> FedConfig:
    values = {"method": method, "model": "tiny-bert", "num_clients": CLIENTS, "rounds": 2, "local_steps": 2,
              "num_examples": 96, "rank": 4, **method_extras(method), **METHODS.get(method, {}), **changes}
    return FedConfig(**values)


def node_configs(config: FedConfig, with_ranks: bool = True) -> dict[int, dict]:
    nodes = {}
    for cid in range(config.num_clients):
        node = {"partition-id": cid, "num-partitions": config.num_clients}
        if with_ranks and config.client_ranks:  # the node's own rank, as a deployment sets it
            node["rank"] = config.client_ranks[cid]
        nodes[1000 + 7 * cid] = node
    return nodes


def run_flower(config: FedConfig, grid: InMemoryGrid | None = None, node_config_ranks: bool = True, dead=()):
    """The run through the Flower strategy; the config it sends has no client_ranks when the nodes set them;
    the ``dead`` nodes stop answering once the run has started."""
    grid = grid or InMemoryGrid(client_app, node_configs(config, node_config_ranks))
    server_config = config.replace(client_ranks=()) if node_config_ranks and method_hetero(config) else config
    strategy = FedLoRAStrategy(server_config)
    strategy.connect(grid)
    grid.dead.update(dead)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    strategy.finish()
    return strategy, grid


def method_hetero(config: FedConfig) -> bool:
    return bool(config.client_ranks) and config.method != "lora_a2"  # LoRA-A2's ranks are budgets


def assert_same_run(sim, flower) -> None:
    a, b = sim.strategy.global_tensors(sim.state), flower.strategy.global_tensors(flower.state)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sim.state.base.keys() == flower.state.base.keys()
    for name in sim.state.base:
        assert torch.equal(sim.state.base[name], flower.state.base[name]), name
    assert sim.ledger.rounds == flower.server.ledger.rounds
    for s, f in zip(sim.history, flower.history, strict=True):
        for key in ("clients", "train_loss", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
                    "personal_accuracy", "personal_loss", "personal_scope", "personal_clients", "epsilon",
                    "epsilon_max", "server_epsilon"):
            assert s.get(key) == f.get(key), key


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_matches_the_simulator_bit_for_bit(method):
    config = small(method)
    sim = simulate(config, progress=False)
    flower, _ = run_flower(config)
    assert_same_run(sim, flower)


def test_partial_participation_and_dp_match_the_simulator():
    """FLoRA at 2 of 3 clients a round with DP-SGD (fixed noise seed): nodes follow the merges they
    missed from the downloaded stacks, and the DP steps are the simulator's."""
    config = small("flora", participation=0.67, rounds=3, dp_epsilon=8.0, dp_noise_seed=11)
    sim = simulate(config, progress=False)
    flower, _ = run_flower(config)
    assert_same_run(sim, flower)
    report = flower.finish()
    assert set(report["clients"]) <= {"0", "1", "2"} and report["epsilon_max"] <= 8.0 + 1e-9


def test_personal_evaluation_follows_the_participants_as_in_the_simulator():
    """FedSA-LoRA at 2 of 3 clients a round: the round's participants evaluate their own models, every
    client after the last round (and every eval_every rounds), on Flower as in the simulator."""
    config = small("fedsa_lora", participation=0.67, rounds=3, eval_every=2)
    sim = simulate(config, progress=False)
    flower, _ = run_flower(config)
    assert_same_run(sim, flower)
    assert [m["personal_scope"] for m in flower.history] == ["participants", "all", "all"]
    assert flower.history[0]["personal_clients"] == len(flower.history[0]["clients"]) == 2


def test_dp_fedavg_on_flower_matches_the_simulator():
    """Client-level DP at the server (Poisson client sampling, clipped and noised mean) on Flower."""
    config = small("ffa_lora", server_dp_noise_multiplier=0.5, participation=0.67, rounds=3, dp_noise_seed=9)
    sim = simulate(config, progress=False)
    flower, _ = run_flower(config)
    assert_same_run(sim, flower)
    assert flower.history[-1]["server_epsilon"] > 0


def test_noise_key_stays_on_the_node(tmp_path):
    """Fresh CSPRNG keys: the key is in the node's own state and in nothing the server receives or writes."""
    config = small("ffa_lora", dp_epsilon=8.0, out_dir=str(tmp_path))
    flower, grid = run_flower(config)
    keys = []
    for context in grid.contexts.values():
        meta = json.loads(context.state["fedlora.client"]["meta"])
        keys.append(str(meta["privacy"]["seed"]))
    assert len(set(keys)) == CLIENTS
    sent = [str(m.content) for m in grid.sent]
    files = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors")
    for key in keys:
        assert all(key not in text for text in sent) and key not in files
        assert key not in json.dumps(flower.history) and key not in json.dumps(flower.client_reports)
    assert {int(c) for c in flower.client_reports} == {0, 1, 2}


def test_artefacts_match_fedlora_run(tmp_path):
    config = small("fedsa_lora", out_dir=str(tmp_path))
    run_flower(config)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "fedsa_lora"
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "adapter.safetensors"))
    assert adapter and all(n.endswith("lora_A") for n in adapter)  # FedSA: only the shared A


# ---- faults --------------------------------------------------------------------------------------
def dies_after_round_one(grid: InMemoryGrid, node: int) -> None:
    """The node stops answering from round 2 on (its messages come back as errors, as Flower's do)."""
    original, trained = grid.send_and_receive, []

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            if trained:
                grid.dead.add(node)
            trained.append(True)
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive


def test_a_dead_node_leaves_the_round_to_the_others(caplog):
    config = small("ffa_lora", min_clients=2)
    grid = InMemoryGrid(client_app, node_configs(config))
    dies_after_round_one(grid, next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 1))
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        flower, _ = run_flower(config, grid)
    assert flower.history[0]["clients"] == [0, 1, 2]
    assert flower.history[1]["clients"] == [0, 2]
    assert "node offline" in flower.history[1]["failed"]["1"]
    assert "client 1" in caplog.text


def test_too_few_replies_stop_the_run_and_keep_what_was_aggregated(tmp_path):
    config = small("ffa_lora", min_clients=3, rounds=3, out_dir=str(tmp_path))
    grid = InMemoryGrid(client_app, node_configs(config))
    dies_after_round_one(grid, next(iter(grid.contexts)))
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    after_one = {}
    original = strategy.aggregate_evaluate

    def remember(server_round, replies):
        after_one.update({n: t.clone() for n, t in strategy.strategy.global_tensors(strategy.state).items()})
        return original(server_round, replies)

    strategy.aggregate_evaluate = remember
    with pytest.raises(FlowerRunError, match=r"round 2: 2 valid replies from 3 sampled clients, fewer than "
                                             r"min_clients = 3; stopping.*Rounds 1..1 are saved"):
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert after_one and all(torch.equal(saved[n], t) for n, t in after_one.items())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and lines[-1]["stopped"] is True


def _tamper_arrays(change):
    def tamper(node, reply, message):
        if reply.metadata.message_type != "train" or node != 1000 or reply.has_error():
            return reply
        arrays = reply.content["arrays"]
        change(arrays)
        return reply
    return tamper


def _first_b(arrays):
    return next(k for k in arrays if k.endswith("lora_B"))


BAD_REPLIES = {
    "wrong shape": (lambda a: a.__setitem__(_first_b(a), Array(np.zeros((3, 3), np.float32))), "has shape"),
    "wrong dtype": (lambda a: a.__setitem__(_first_b(a), Array(a[_first_b(a)].numpy().astype(np.float64))), "dtype"),
    "missing key": (lambda a: a.__delitem__(_first_b(a)), "missing tensors"),
    "extra key": (lambda a: a.__setitem__("evil.lora_B", Array(np.zeros(2, np.float32))), "unexpected tensors"),
    "NaN": (lambda a: a.__setitem__(_first_b(a), Array(np.full(a[_first_b(a)].shape, np.nan, np.float32))), "non-finite"),
    "Inf": (lambda a: a.__setitem__(_first_b(a), Array(np.full(a[_first_b(a)].shape, np.inf, np.float32))), "non-finite"),
    "lying header": (lambda a: a.__setitem__(_first_b(a), Array(dtype="float32", shape=(1, 1), stype="numpy.ndarray",
                                                                    data=a[_first_b(a)].data)), "declares"),
    "garbage bytes": (lambda a: a.__setitem__(_first_b(a), Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                                                                     data=b"\x93NUMPY garbage")), "could not be decoded"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_replies_are_rejected_and_logged(case, caplog):
    """A malformed reply from client 0 is logged with the client and the reason and never aggregated:
    the run equals one where client 0's node is dead."""
    change, reason = BAD_REPLIES[case]
    config = small("ffa_lora", min_clients=2)
    grid = InMemoryGrid(client_app, node_configs(config))
    grid.tamper = _tamper_arrays(change)
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        tampered, _ = run_flower(config, grid)
    assert all(h["clients"] == [1, 2] for h in tampered.history)
    assert reason in tampered.history[0]["failed"]["0"] and "client 0" in caplog.text
    reference, _ = run_flower(config, dead=[1000])
    for name, t in reference.strategy.global_tensors(reference.state).items():
        assert torch.equal(t, tampered.strategy.global_tensors(tampered.state)[name]), name


def test_a_reply_without_arrays_or_metrics_is_rejected():
    config = small("fedit", min_clients=1)
    grid = InMemoryGrid(client_app, node_configs(config))
    grid.tamper = lambda node, reply, message: (Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=message)
                                       if node == 1000 and reply.metadata.message_type == "train" else reply)
    flower, _ = run_flower(config, grid)
    assert "expected an ArrayRecord" in flower.history[0]["failed"]["0"]


def test_node_config_errors_are_clear():
    config = small("fedit")
    grid = InMemoryGrid(client_app, {1: {"partition-id": 0, "num-partitions": 3}, 2: {"num-partitions": 3},
                                     3: {"partition-id": 2, "num-partitions": 3}})
    with pytest.raises(FlowerRunError, match="partition-id' is missing"):
        FedLoRAStrategy(config).connect(grid)
    grid = InMemoryGrid(client_app, {1: {"partition-id": 0}, 2: {"partition-id": 0}, 3: {"partition-id": 2}})
    with pytest.raises(FlowerRunError, match="both claim partition-id 0"):
        FedLoRAStrategy(config).connect(grid)
    grid = InMemoryGrid(client_app, {1: {"partition-id": 0, "num-partitions": 5}, 2: {"partition-id": 1},
                                     3: {"partition-id": 2}})
    with pytest.raises(FlowerRunError, match="num-partitions 5 does not fit"):
        FedLoRAStrategy(config).connect(grid)
    with pytest.raises(ValueError, match="pools every client"):
        FedLoRAStrategy(small("centralized"))


def test_heterogeneous_node_ranks_are_refused_by_a_homogeneous_method():
    config = small("ffa_lora")
    grid = InMemoryGrid(client_app, {1: {"partition-id": 0, "rank": 8}, 2: {"partition-id": 1}, 3: {"partition-id": 2}})
    with pytest.raises(FlowerRunError, match="cannot take heterogeneous client ranks"):
        FedLoRAStrategy(config).connect(grid)


# ---- records and run config ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (2, 0, 4)])
def test_arrays_round_trip_exactly(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    tensors = {"a.b.lora_A": t, "x": t.transpose(0, -1) if t.dim() > 1 else t}
    back = from_arrays(to_arrays(tensors))
    assert list(back) == list(tensors)
    for name in tensors:
        assert back[name].dtype == tensors[name].dtype and torch.equal(back[name], tensors[name])


def test_object_arrays_are_refused_without_unpickling():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # what an attacker would send
    record = ArrayRecord()
    record["x"] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(RejectedUpdate, match="could not be decoded.*allow_pickle"):
        from_arrays(record)
    with pytest.raises(RejectedUpdate, match="expected an ArrayRecord"):
        from_arrays(ConfigRecord({"x": 1}))


def test_run_config_parses_presets_tuples_and_options():
    config, options = config_from_run_config({"preset": "default", "method": "flora", "client-ranks": "8,4,2",
                                              "num-clients": 3, "dirichlet-alpha": "none", "round-timeout": 30,
                                              "lr": ""})
    assert config.method == "flora" and config.client_ranks == (8, 4, 2) and config.dirichlet_alpha is None
    assert options["round-timeout"] == 30.0 and options["node-timeout"] == 300.0
    assert config.lr == config_from_run_config({})[0].lr  # "" keeps the preset's value
    with pytest.raises(ValueError, match=r"unknown key 'rounds_typo'; did you mean rounds"):
        config_from_run_config({"rounds-typo": 3})
    with pytest.raises(ValueError, match="rank must be int"):
        config_from_run_config({"rank": "abc"})


def test_the_app_declares_every_config_key():
    """Flower accepts only declared run-config keys: the app must declare every FedConfig field."""
    import dataclasses
    import tomllib
    from pathlib import Path

    app = tomllib.loads((Path(__file__).resolve().parents[1] / "apps" / "fedlora" / "pyproject.toml").read_text())
    declared = app["tool"]["flwr"]["app"]["config"]
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedlora_ext.flower.server_app:app",
                                                        "clientapp": "fedlora_ext.flower.client_app:app"}
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(FedConfig)}
    assert fields <= set(declared), sorted(fields - set(declared))
    config, _ = config_from_run_config(declared)
    assert config == config_from_run_config({})[0]  # the declared defaults are the default preset
