"""Secure aggregation (SecAgg+) on Flower, through the in-memory Grid: Flower's own client mod on every
node, our stage driver on the server (fedlora_ext/flower/secure.py). The real processes are in
test_flower_deployment.py.

A secure round must equal the plain round within the quantisation bound the protocol allows
(:func:`fedlora_ext.flower.secure.quantization_bound`), show the server nothing but the mean, survive a
node that drops after sharing its keys while enough are left, and leave privacy.json as it was.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402

from fedlora_ext.core.config import FedConfig  # noqa: E402
from fedlora_ext.federated.simulation import simulate  # noqa: E402
from fedlora_ext.flower import FedLoRAStrategy, FlowerRunError, config_from_run_config  # noqa: E402
from fedlora_ext.flower.client_app import app as client_app, secure_layout  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from fedlora_ext.flower.secure import SecureSettings, quantization_bound  # noqa: E402
from flowertools import InMemoryGrid  # noqa: E402
from test_flower import node_configs, run_flower, small  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)


def secure(config: FedConfig, **changes) -> FedConfig:
    return config.replace(secure_aggregation=True, **changes)


def bound(strategy: FedLoRAStrategy, round_clients: list[int]) -> float:
    """The protocol's bound for the clients summed in a round, every client sampled (quantisation,
    weights exact)."""
    counts = {c.cid: c.num_examples for c in strategy.clients if c.cid in round_clients}
    largest = max(c.num_examples for c in strategy.clients)
    return quantization_bound(SecureSettings.of(strategy.config), counts, largest)


def assert_within_bound(plain: FedLoRAStrategy, safe: FedLoRAStrategy) -> None:
    """Every value of the secure run's adapter is the plain run's up to the quantisation bound, plus the
    float32 rounding both runs do: the plain mean's K products and sums, the secure start + mean's one."""
    clients = plain.history[-1]["clients"]
    assert safe.history[-1]["clients"] == clients
    limit = bound(safe, clients)
    a, b = plain.strategy.global_tensors(plain.state), safe.strategy.global_tensors(safe.state)
    assert a.keys() == b.keys()
    for name in a:
        rounding = (len(clients) + 1) * EPS32 * float(a[name].abs().max())
        error = float((a[name] - b[name]).abs().max())
        assert error <= limit + rounding, (name, error, limit)


def dying_at(grid: InMemoryGrid, node: int, stage: str) -> None:
    """``node`` stops answering when the server sends the protocol's ``stage`` (it shared its keys)."""
    original = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            record = message.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is not None and record.get(Key.STAGE) == stage:
                grid.dead.add(node)
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive


def node_of(grid: InMemoryGrid, cid: int) -> int:
    return next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == cid)


@pytest.mark.parametrize("method,changes", [("fedit", {}), ("ffa_lora", {}), ("fedsa_lora", {}),
                                            ("ffa_lora", {"dp_epsilon": 8.0, "dp_noise_seed": 5})],
                         ids=["fedit", "ffa_lora", "fedsa_lora", "ffa_lora-dp_sgd"])
def test_a_secure_round_equals_the_plain_round_within_the_quantisation_bound(method, changes):
    config = small(method, rounds=1, **changes)
    plain, _ = run_flower(config)
    safe, _ = run_flower(secure(config))
    assert_within_bound(plain, safe)
    assert safe.history[0]["bytes_up"] > 0 and safe.history[0]["clients"] == [0, 1, 2]


@pytest.mark.parametrize("method", ["fedit", "fedprox", "ffa_lora", "fedsa_lora", "fed_sb", "fedsvd", "rolora"])
def test_every_round_s_mean_is_the_weighted_mean_of_the_uploads_within_the_bound(method, monkeypatch):
    """Every allowed method, two rounds (RoLoRA trains A in round 2 from the A it kept, FedSVD
    re-factorises after round 1): the server's mean of each round against the exact weighted mean of
    what the nodes handed to the protocol (recorded on the nodes)."""
    from fedlora_ext.flower import client_app as node_side

    uploads: dict[int, dict[int, tuple]] = {}  # round -> cid -> (changes, n_k)
    layout = node_side.secure_layout

    def recording(upload, reference, num_examples, cid, clipping_range):
        content = layout(upload, reference, num_examples, cid, clipping_range)
        changes = {n: (upload[n].double() - reference[n].double()) for n in sorted(upload)}
        uploads.setdefault(len(means), {})[cid] = (changes, num_examples)
        return content

    monkeypatch.setattr(node_side, "secure_layout", recording)
    means = []
    changes = {"svd_period": 1} if method == "fedsvd" else {}
    config = secure(small(method, rounds=2, **changes))
    strategy = FedLoRAStrategy(config)
    grid = InMemoryGrid(client_app, node_configs(config))
    strategy.connect(grid)
    mean_reply = strategy._secure_mean_reply

    def remember(accepted):
        means.append({n: torch.from_numpy(v) for n, v in strategy._round["secure"].mean.items()})
        return mean_reply(accepted)

    strategy._secure_mean_reply = remember
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    assert len(means) == 2
    for round_index, mean in enumerate(means):
        sent = uploads[round_index]
        total = sum(n for _, n in sent.values())
        limit = bound(strategy, list(sent))
        for name, value in mean.items():
            exact = sum(changes[name] * n for changes, n in sent.values()) / total
            assert float((value - exact).abs().max()) < limit, (round_index, name)


def test_the_server_sees_only_the_mean():
    """What reaches the aggregation is one reply, the mean; no node's reply carries its update, its count
    or Flower's legacy records beside the masked vector."""
    config = secure(small("ffa_lora", rounds=2))
    grid = InMemoryGrid(client_app, node_configs(config))
    seen_replies = []

    def watch(node, reply, message):
        if reply.metadata.message_type == "train":
            seen_replies.append(reply)
        return reply

    grid.tamper = watch
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    aggregated = []
    method_aggregate = strategy.strategy.aggregate

    def record(state, replies, round_index):
        aggregated.append([(r.cid, sorted(r.tensors)) for r in replies])
        return method_aggregate(state, replies, round_index)

    strategy.strategy.aggregate = record
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    names = strategy.strategy.upload_names(strategy.state, 0)
    assert aggregated == [[(-1, names)]] * 2
    collected = [r for r in seen_replies if r.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)]
    assert len(collected) == 2 * config.num_clients and len(seen_replies) == 4 * 2 * config.num_clients
    for reply in seen_replies:
        content = reply.content
        assert all(len(record) == 0 for record in content.array_records.values())
        assert not [n for n in content if n.startswith("fitres.")]
        assert "num-examples" not in content.metric_records.get("metrics", {})


def test_a_node_that_drops_after_sharing_keys_leaves_the_round_to_the_others():
    """Client 1 shares its keys, then dies before sending its masked vector: the others' vectors are
    unmasked with its reconstructed key, and the round equals the plain round without it."""
    config = small("ffa_lora", rounds=1)
    grid = InMemoryGrid(client_app, node_configs(config))
    dying_at(grid, node_of(grid, 1), Stage.COLLECT_MASKED_VECTORS)
    safe, _ = run_flower(secure(config), grid)
    assert safe.history[0]["clients"] == [0, 2]
    assert "collect_masked_vectors" in safe.history[0]["failed"]["1"]
    plain, _ = run_flower(config, dead=[node_of(grid, 1)])
    assert_within_bound(plain, safe)


def test_below_the_threshold_the_round_fails_with_a_clear_error(tmp_path):
    config = secure(small("ffa_lora", rounds=2, out_dir=str(tmp_path)), secagg_threshold=3)
    grid = InMemoryGrid(client_app, node_configs(config))
    dying_at(grid, node_of(grid, 1), Stage.COLLECT_MASKED_VECTORS)
    with pytest.raises(FlowerRunError, match=r"round 1: secure aggregation failed: after stage collect_masked_vectors, "
                                             r"2 of 3 sampled nodes are left .* fewer than secagg_threshold = 3"):
        run_flower(config, grid)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["stopped"] is True and "secagg_threshold" in lines[-1]["failed"]["secure_aggregation"]


def test_privacy_json_is_the_same_with_and_without_secure_aggregation(tmp_path):
    config = small("ffa_lora", rounds=2, dp_epsilon=8.0, dp_noise_seed=3)
    run_flower(config.replace(out_dir=str(tmp_path / "plain")))
    run_flower(secure(config, out_dir=str(tmp_path / "secure")))
    plain = json.loads((tmp_path / "plain" / "privacy.json").read_text())
    safe = json.loads((tmp_path / "secure" / "privacy.json").read_text())
    assert plain == safe and plain


@pytest.mark.parametrize("changes,message", [
    ({"method": "flora", "client_ranks": (8, 4, 2), "rank": 8}, r"method 'flora' with ranks \[8, 4, 2\] needs each client's own upload"),
    ({"method": "scaffold", "optimizer": "sgd"}, "method 'scaffold' needs each client's own upload"),
    ({"server_dp_noise_multiplier": 1.0}, "cannot run with server DP"),
    ({"max_update_norm": 2.0}, "cannot run with max_update_norm = 2"),
    ({"aggregation": "median"}, "cannot run with aggregation = 'median'"),
    ({"secagg_threshold": 4}, r"secagg_threshold must be in \[2, secagg_shares = 3\], got 4"),
    ({"secagg_threshold": 1}, r"secagg_threshold must be in \[2, secagg_shares = 3\], got 1"),
    ({"secagg_clipping_range": 0.0}, "secagg_clipping_range must be > 0, got 0"),
    ({"secagg_quantization_range": 2**31}, r"secagg_quantization_range must be in \[2, 2\*\*30\], got 2147483648"),
])
def test_what_secure_aggregation_cannot_run_is_refused_in_one_line(changes, message):
    changes = {"method": "ffa_lora", **changes}
    with pytest.raises(ValueError, match=message) as error:
        FedLoRAStrategy(small(changes.pop("method"), secure_aggregation=True, **changes))
    assert "\n" not in str(error.value)


def test_too_few_sampled_nodes_and_the_simulator_are_refused():
    with pytest.raises(ValueError, match="secure_aggregation is a Flower feature"):
        simulate(secure(small("ffa_lora", rounds=1)), progress=False)
    config = secure(small("ffa_lora", rounds=1, participation=0.34))  # one node a round
    with pytest.raises(FlowerRunError, match="round 1: secure aggregation failed: secure aggregation needs at "
                                             "least 2 sampled nodes, got 1"):
        run_flower(config)
    with pytest.raises(ValueError, match=r"num_clients = 1 \(SecAgg\+ needs at least 2"):
        FedConfig(num_clients=1, num_examples=8, secure_aggregation=True)


def test_the_run_config_keys_reach_the_config():
    config, _ = config_from_run_config({"secure-aggregation": True, "secagg-shares": 5, "secagg-threshold": 3,
                                        "secagg-clipping-range": 0.5, "secagg-quantization-range": 2**20})
    assert (config.secure_aggregation, config.secagg_shares, config.secagg_threshold) == (True, 5, 3)
    assert (config.secagg_clipping_range, config.secagg_quantization_range) == (0.5, 2**20)


def test_the_bound_is_the_one_derived_from_flowers_quantisation():
    """2 c K / (s sum n_k) with s = T // max n_k: the step 2c/T per value and node, over the weight sum."""
    settings = SecureSettings(shares=3, threshold=2, clipping_range=0.5, quantization_range=2**10)
    counts = {1: 30, 2: 40, 3: 50}
    s = 2**10 // 50
    assert quantization_bound(settings, counts) == pytest.approx(2 * 0.5 * 3 / (s * 120))
    assert np.isclose(quantization_bound(settings, {1: 1, 2: 1}), 2 * 0.5 * 2 / (2**10 * 2))


def test_the_node_sends_its_change_checks_it_and_logs_what_the_protocol_clips(caplog):
    """The layout secaggplus_mod reads: float64 changes sorted by name, the count as the weight; a value
    beyond the clipping range is logged on the node, a non-finite update is never sent."""
    start = {"b.lora_B": torch.zeros(2, 2), "a.lora_B": torch.ones(3)}
    upload = {"b.lora_B": torch.full((2, 2), 0.25), "a.lora_B": torch.tensor([1.5, 0.0, 3.0])}
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        fitres = compat.recorddict_to_fitres(secure_layout(upload, start, 17, 4, 1.0), keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert fitres.num_examples == 17 and [a.dtype for a in arrays] == [np.float64] * 2
    assert np.array_equal(arrays[0], [0.5, -1.0, 2.0]) and np.array_equal(arrays[1], np.full((2, 2), 0.25))
    assert "client 4: 1 values of its update exceed secagg_clipping_range = 1 (largest 2)" in caplog.text
    upload["a.lora_B"][0] = float("nan")
    with pytest.raises(ValueError, match="client 4's update is not finite; nothing is sent"):
        secure_layout(upload, start, 17, 4, 1.0)
    with pytest.raises(ValueError, match=r"client 4 holds no starting value for \['c.lora_B'\]"):
        secure_layout({**upload, "c.lora_B": torch.zeros(1)}, start, 17, 4, 1.0)
