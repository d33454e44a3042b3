"""A Flower node that loses its state (a restarted SuperNode: a new node id, a fresh context) neither
resets its privacy budget nor reuses a (key, offset) pair: it continues from its state file
(``state-dir`` in its node_config), and without one its account and offsets follow the server's count
of the steps it asked. In-memory grid here; test_flower_deployment.py restarts a real SuperNode."""

from __future__ import annotations

import logging
import re
import stat

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flowertools import InMemoryGrid  # noqa: E402
from test_flower import node_configs  # noqa: E402

from fedlora_ext.flower import FedLoRAStrategy  # noqa: E402
from fedlora_ext.flower.client_app import app as client_app  # noqa: E402
from fedtools import small_config  # noqa: E402

TARGET = 4.0
OFFSETS = re.compile(r"client (\d+), round (\d+): (\d+) local steps, noise offsets (\d+)\.\.(\d+)")


def noise_offsets(caplog) -> dict[int, list[tuple[int, int]]]:
    """Each client's (first, last) noise offsets per training, from the clients' own log lines."""
    used: dict[int, list[tuple[int, int]]] = {}
    for record in caplog.records:
        found = OFFSETS.search(record.getMessage())
        if record.name == "fedlora_ext.client" and found:
            used.setdefault(int(found[1]), []).append((int(found[4]), int(found[5])))
    return used


@pytest.mark.parametrize("state_file", [True, False], ids=["state-dir", "no-state-dir"])
def test_a_restarted_node_keeps_its_account_and_never_reuses_noise(state_file, tmp_path, caplog):
    config = small_config("ffa_lora", num_clients=3, rounds=3, local_steps=2, batch_size=8, dp_epsilon=TARGET,
                          dp_noise_seed=6, min_clients=1)
    nodes = node_configs(config)
    if state_file:
        for node in nodes.values():
            node["state-dir"] = str(tmp_path / "node-state")
    grid = InMemoryGrid(client_app, nodes)
    restarted = {}

    def restart_after_round_1(node, reply, message):
        """Node 1000 (client 0) dies after its round-1 reply and comes back as node 2000, state lost."""
        if node == 1000 and reply.metadata.message_type == "train" and not restarted:
            grid.dead.add(1000)
            grid.contexts[2000] = Context(run_id=7, node_id=2000, node_config=dict(nodes[1000]), state=RecordDict(),
                                          run_config={})
            restarted[node] = 2000
        return reply

    grid.tamper = restart_after_round_1
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    with caplog.at_level(logging.INFO, logger="fedlora_ext"):
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    history = strategy.history
    assert restarted and history[1]["clients"] == [0, 1, 2], "client 0 is back for round 2 at its new node"
    assert strategy.nodes[0] == 2000
    # the stream of every client is used once: offsets 0..1, 2..3, 4..5
    assert noise_offsets(caplog) == {cid: [(0, 1), (2, 3), (4, 5)] for cid in range(3)}
    lost = "its state was lost?" in caplog.text
    assert lost is not state_file  # the state file restores the account; without it, the server's count does
    report = strategy.finish()
    assert report["epsilon_max"] <= TARGET and report["disagreements"] == {}
    assert report["client_reports"]["0"]["steps"] == report["clients"]["0"]["steps"] == 6
    if state_file:
        path = tmp_path / "node-state" / "run-7" / "client-0.safetensors"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
