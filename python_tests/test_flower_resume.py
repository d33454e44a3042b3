"""A Flower run stopped after round k (its ServerApp gone, as when the SuperLink is killed) and continued
with ``resume = true`` ends exactly as the uninterrupted run: adapter, metrics and privacy.json, with and
without DP-SGD; the nodes continue their clients, and no noise offset is used twice. Refusals are one
line. In-memory grid here; test_flower_deployment.py kills a real SuperLink."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import MessageType  # noqa: E402
from safetensors import safe_open  # noqa: E402
from flowertools import InMemoryGrid  # noqa: E402
from test_flower_restart import noise_offsets  # noqa: E402

from fedlora_ext.app.run_folder import LOCK, RunLock, run_status  # noqa: E402
from fedlora_ext.errors import RunError  # noqa: E402
from fedlora_ext.federated.checkpoint import read_index  # noqa: E402
from fedlora_ext.flower.client_app import app as client_app  # noqa: E402
from fedlora_ext.flower.server_app import run_server  # noqa: E402

CLIENTS = 3
#: the numbers of a round that depend on the machine's speed, not on the run
TIMINGS = ("seconds", "seconds_train", "seconds_aggregate", "seconds_eval")


class ServerKilled(BaseException):
    """The ServerApp dies (not an error it could record: a kill leaves no summary)."""


class StopsBeforeRound(InMemoryGrid):
    """A grid whose server dies as it sends round ``stop``'s train messages: no node sees them."""

    def __init__(self, client_app, node_configs, stop: int, run_id: int = 7) -> None:
        super().__init__(client_app, node_configs, run_id)
        self.stop = stop

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN and int(m.content["config"]["round"]) + 1 == self.stop
               for m in messages):
            raise ServerKilled(f"killed before round {self.stop}")
        return super().send_and_receive(messages, timeout=timeout)


def node_configs(state_dir) -> dict[int, dict]:
    return {1000 + 7 * cid: {"partition-id": cid, "num-partitions": CLIENTS, "state-dir": str(state_dir)}
            for cid in range(CLIENTS)}


def run_config(out, **changes) -> dict:
    return {"preset": "default", "model": "tiny-bert", "dataset": "synthetic", "num-clients": CLIENTS, "rounds": 3,
            "local-steps": 2, "num-examples": 96, "seq-len": 16, "batch-size": 16, "lr": 5e-3, "max-examples": "none",
            "dp-epsilon": "none", "out-dir": str(out), "round-timeout": 60.0, **changes}


def rounds_of(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def assert_same_adapter(ours, theirs) -> None:
    """Bit for bit: the same tensors and metadata (safetensors writes its header's keys in any order)."""
    files = [safe_open(str(folder / "adapter.safetensors"), framework="pt") for folder in (ours, theirs)]
    assert files[0].metadata() == files[1].metadata() and list(files[0].keys()) == list(files[1].keys())
    for name in files[0].keys():
        assert torch.equal(files[0].get_tensor(name), files[1].get_tensor(name)), name


CASES = {
    # FedSA-LoRA: each node keeps its own B, which must survive the server's restart
    "fedsa": {"method": "fedsa_lora"},
    # DP-SGD with a fixed noise key, where a repeated offset would repeat the noise
    "ffa_dp": {"method": "ffa_lora", "dp-epsilon": 8.0, "dp-noise-seed": 5},
    # DP-FedAvg at the server: its account, noise offset and Poisson sampling continue from the checkpoint
    "dp_fedavg": {"method": "ffa_lora", "server-dp-noise-multiplier": 0.5, "participation": 0.67, "dp-noise-seed": 9},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_ends_as_the_uninterrupted_one(case, tmp_path, caplog):
    changes = CASES[case]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    with caplog.at_level(logging.INFO, logger="fedlora_ext"):
        run_server(InMemoryGrid(client_app, node_configs(tmp_path / "whole-nodes")), run_config(whole, **changes))
        uninterrupted = noise_offsets(caplog)
        caplog.clear()
        nodes = node_configs(tmp_path / "stopped-nodes")
        with pytest.raises(ServerKilled):
            run_server(StopsBeforeRound(client_app, nodes, stop=3), run_config(stopped, **changes))
        assert read_index(stopped)["rounds_done"] == 2 and not (stopped / "summary.json").exists()
        assert run_status(stopped).endswith("stopped after round 2/3 without a summary (killed?); continue with "
                                            "`flwr run` and resume=true")
        # a killed server leaves its lock file behind (the kernel dropped its flock): it does not block
        (stopped / LOCK).write_text(json.dumps({"pid": 999_999, "host": "gone", "since": "2026-01-01 00:00:00"}))
        # a new Flower run (a new run id) on the same nodes: their contexts are gone, their state files are not
        summary = run_server(InMemoryGrid(client_app, nodes, run_id=8), run_config(stopped, resume=True, **changes))
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert_same_adapter(stopped, whole)
    assert rounds_of(stopped) == rounds_of(whole)
    assert read_index(stopped)["rounds_done"] == 3 and not (stopped / LOCK).exists()
    assert "its state was lost?" not in caplog.text
    if rounds_of(whole)[2]["clients"]:  # round 3's nodes went on from their state files, of the first start
        assert "continuing from its state file" in caplog.text
        assert [p.name for p in (tmp_path / "stopped-nodes").iterdir()] == ["run-7"]
    assert (stopped / "privacy.json").exists() is (whole / "privacy.json").exists() is (case != "fedsa")
    if case != "fedsa":
        assert json.loads((stopped / "privacy.json").read_text()) == json.loads((whole / "privacy.json").read_text())
    if "dp-epsilon" in changes:
        # before and after the restart, each client used the offsets of the uninterrupted run, each once
        assert noise_offsets(caplog) == uninterrupted == {cid: [(0, 1), (2, 3), (4, 5)] for cid in range(CLIENTS)}


def test_a_node_without_state_dir_follows_the_server_count_after_a_resume(tmp_path, caplog):
    """No state-dir: the resumed run's nodes start from nothing, raise their accounts and offsets to the
    steps the server's checkpointed ledger says it asked, and so never reuse an offset."""
    out, target = tmp_path / "run", 8.0
    nodes = {nid: {k: v for k, v in node.items() if k != "state-dir"} for nid, node in node_configs(None).items()}
    changes = {"method": "ffa_lora", "dp-epsilon": target, "dp-noise-seed": 5}
    with caplog.at_level(logging.INFO, logger="fedlora_ext"):
        with pytest.raises(ServerKilled):
            run_server(StopsBeforeRound(client_app, nodes, stop=3), run_config(out, **changes))
        run_server(InMemoryGrid(client_app, nodes, run_id=8), run_config(out, resume=True, **changes))
    assert noise_offsets(caplog) == {cid: [(0, 1), (2, 3), (4, 5)] for cid in range(CLIENTS)}
    assert "its state was lost?" in caplog.text
    report = json.loads((out / "privacy.json").read_text())
    assert report["epsilon_max"] <= target and all(r["steps"] == 6 for r in report["clients"].values())
    assert all(r["steps"] == 6 for r in report["client_reports"].values())


# ---- refusals --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after round 1 of 2 (to copy: each refusal must leave it as it is)."""
    root = tmp_path_factory.mktemp("stopped")
    with pytest.raises(ServerKilled):
        run_server(StopsBeforeRound(client_app, node_configs(root / "nodes"), stop=2),
                   run_config(root / "run", rounds=2, method="fedit"))
    return root / "run"


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("given, message", [
    ({"lr": 1e-2}, r"resume = true: lr = 0\.01 differs from the run's 0\.005 \(in .*checkpoint.json\)"),
    ({"overwrite": True}, r"^resume = true and overwrite = true: .*give one of them$"),
    ({"rounds": 3}, r"resume = true: rounds = 3 differs from the run's 2"),
])
def test_a_resume_that_would_change_the_run_is_refused_and_leaves_it(given, message, stopped_run):
    before = snapshot(stopped_run)
    with pytest.raises(ValueError, match=message):
        run_server(None, {**run_config(stopped_run, rounds=2, method="fedit", resume=True), **given})
    assert snapshot(stopped_run) == before


def test_a_resume_needs_a_flower_checkpoint_that_is_not_completed(stopped_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"resume = true: .*empty holds no checkpoint.json .*start the run without resume"):
        run_server(None, run_config(empty, resume=True))
    with pytest.raises(ValueError, match=r"resume = true: out-dir .*missing is no folder"):
        run_server(None, run_config(tmp_path / "missing", resume=True))
    with pytest.raises(ValueError, match=r"resume = true continues the run in out-dir, but no out-dir is given"):
        run_server(None, {**run_config(None, resume=True), "out-dir": ""})
    completed = tmp_path / "completed"
    run_server(InMemoryGrid(client_app, node_configs(tmp_path / "nodes")), run_config(completed, rounds=1))
    with pytest.raises(ValueError, match=r"the run in .*completed completed all 1 rounds; nothing to continue"):
        run_server(None, run_config(completed, rounds=1, resume=True))


def test_a_stopped_flower_run_says_how_it_continues(stopped_run):
    """A new run on its folder, and `fedlora run --resume` (the simulator cannot play the nodes' part)."""
    from fedlora_ext.federated.simulation import Simulation

    before = snapshot(stopped_run)
    with pytest.raises(RunError, match=r"already holds a run .*; continue it with resume=true, replace it with "
                                       r"overwrite=true or choose another out-dir$"):
        run_server(None, run_config(stopped_run, rounds=2, method="fedit"))
    with pytest.raises(ValueError, match=r"^resume: .* holds a Flower run; continue it with `flwr run` and the run "
                                         r"config resume=true"):
        Simulation.resume(stopped_run)
    assert snapshot(stopped_run) == before


def test_a_resume_is_refused_while_another_server_holds_the_run(stopped_run):
    """A live server's lock (here this process's) refuses the resume, naming the holder."""
    with RunLock(stopped_run):
        with pytest.raises(RunError, match="is in use by another run"):
            run_server(None, run_config(stopped_run, rounds=2, method="fedit", resume=True))
