"""A real local Flower deployment: one flower-superlink and three flower-supernode processes on
127.0.0.1 (--insecure), `flwr run apps/fedlora`, and the final adapter compared bit for bit with the
in-process simulator's. Every process is started in its own session and stopped by its id.

Flower starts a fresh ClientApp process per message (about 10 s a round on 2 cores), so each run is
two rounds of a tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None or shutil.which("flwr") is None:  # pragma: no cover
    pytest.skip("Flower's command-line tools are not on PATH", allow_module_level=True)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora_ext.federated.simulation import simulate  # noqa: E402
from fedlora_ext.flower.run_config import config_from_run_config  # noqa: E402
from deploytools import Deployment, free_port  # noqa: E402
from pausing import PAUSE_DEADLINE, paused_marker, release, request_pause, wait_for_pause  # noqa: E402


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.stop()
    d.stop_detached()


RUNS = {
    # FFA-LoRA with DP-SGD (a fixed noise seed, so the simulator can repeat the noise)
    "ffa_lora_dp": ({"method": "ffa_lora", "rank": 4, "dp-epsilon": 8.0, "dp-noise-seed": 5}, [None, None, None]),
    # FLoRA without DP, each node with its own rank from its node_config
    "flora_heterogeneous": ({"method": "flora", "rank": 8, "dp-epsilon": "none"}, [8, 4, 2]),
}


def small_run(out: Path, **overrides) -> dict:
    return {"preset": "default", "model": "tiny-bert", "dataset": "synthetic", "num-examples": 96,
            "num-clients": 3, "rounds": 2, "local-steps": 2, "batch-size": 16, "seq-len": 16, "lr": 5e-3,
            "max-examples": "none", "out-dir": str(out), "node-timeout": 120.0, "round-timeout": 240.0, **overrides}


def assert_matches_simulator(run_config: dict, out: Path, reference: Path, ranks=()) -> None:
    """The run's summary says completed, and its adapter and metrics are the simulator's."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == run_config["rounds"], summary
    config, _ = config_from_run_config(run_config)
    if any(ranks):
        config = config.replace(client_ranks=tuple(ranks))
    simulate(config.replace(out_dir=str(reference)), progress=False)
    ours, theirs = load_file(str(out / "adapter.safetensors")), load_file(str(reference / "adapter.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    flower_metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    simulated = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for f, s in zip(flower_metrics, simulated, strict=True):
        for key in ("clients", "bytes_up", "bytes_down", "test_accuracy", "epsilon_max"):
            assert f.get(key) == s.get(key), key


@pytest.mark.parametrize("case", list(RUNS))
def test_deployment_matches_the_simulator(case, deployment, tmp_path):
    overrides, ranks = RUNS[case]
    out = tmp_path / "run"
    run_config = small_run(out, **overrides)
    deployment.start([f"partition-id={i} num-partitions=3" + (f" rank={r}" if r else "") for i, r in enumerate(ranks)])
    started = time.monotonic()
    result = deployment.run(run_config)
    assert result.returncode == 0 and (out / "summary.json").exists(), result.stdout[-3000:] + deployment.logs()
    print(f"{case}: flwr run took {time.monotonic() - started:.1f} s")
    assert_matches_simulator(run_config, out, tmp_path / "simulated", ranks)


def test_a_supernode_killed_after_sharing_its_keys_leaves_the_secure_round_to_the_others(deployment, tmp_path):
    """SecAgg+ on real processes: the server is paused once round 1's keys are shared, supernode 2 is
    killed, and the round goes on (secagg-threshold = 2 of 3): its masks are rebuilt from the others'
    shares, the two survivors' mean is aggregated, and the failure names the stage it missed."""
    out = tmp_path / "run"
    run_config = small_run(out, **{**SECURE, "dp-noise-seed": "none", "dp-epsilon": "none"})
    deployment.start([f"partition-id={i} num-partitions=3" for i in range(3)])
    output = deployment.run_interrupted(run_config, lambda: deployment.kill("supernode2"), after_round="1-share_keys")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", output[-3000:] + deployment.logs()
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["clients"] == [0, 1] and "collect_masked_vectors" in line["failed"]["2"], line


def use_simulation_engine(deployment: Deployment) -> None:
    """The deployment's `flwr run` goes to a `:local:` connection (the simulation engine, 3 SuperNodes)."""
    (deployment.home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local:"\noptions.num-supernodes = 3\n')
    deployment.env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs flwr[simulation] (Ray)")
def test_simulation_engine_matches_the_simulator(deployment, tmp_path):
    """The same app on Flower's simulation engine (a `:local:` connection, Ray): FFA-LoRA with DP-SGD."""
    use_simulation_engine(deployment)
    out = tmp_path / "run"
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "dp-noise-seed": 5})
    result = deployment.run(run_config, "sim")  # from tmp_path, the deployment's root
    assert result.returncode == 0 and (out / "summary.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    assert_matches_simulator(run_config, out, tmp_path / "simulated")


SECURE = {"method": "ffa_lora", "rank": 4, "rounds": 1, "dp-noise-seed": 5, "secure-aggregation": True,
          "secagg-shares": 3, "secagg-threshold": 2}


def assert_secure_run_within_the_bound(run_config: dict, out: Path, reference: Path) -> None:
    """A one-round SecAgg+ run against the plain run (the simulator, which plain Flower equals bit for bit):
    every value within the quantisation bound of the clients summed (fedlora_ext.flower.secure), plus the
    float32 rounding both do; the update bytes are the masked vectors'."""
    from fedlora_ext.flower.secure import SecureSettings, quantization_bound

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1, summary
    config, _ = config_from_run_config(run_config)
    plain = simulate(config.replace(secure_aggregation=False, out_dir=str(reference)), progress=False)
    ours, theirs = load_file(str(out / "adapter.safetensors")), load_file(str(reference / "adapter.safetensors"))
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["clients"] == plain.history[0]["clients"] == [0, 1, 2]
    limit = quantization_bound(SecureSettings.of(config), {c.cid: c.num_examples for c in plain.clients})
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        rounding = 4 * torch.finfo(torch.float32).eps * float(theirs[name].abs().max())
        assert float((ours[name] - theirs[name]).abs().max()) <= limit + rounding, name


def test_secure_aggregation_on_the_deployment_engine(deployment, tmp_path):
    """FFA-LoRA with DP-SGD under SecAgg+ on a SuperLink and three SuperNodes (Flower's secaggplus_mod
    on each node, our stage driver in the ServerApp): the plain run's adapter within the bound, and the
    same privacy.json as the plain Flower run on the same nodes."""
    out, plain = tmp_path / "run", tmp_path / "plain"
    run_config = small_run(out, **SECURE)
    deployment.start([f"partition-id={i} num-partitions=3" for i in range(3)])
    for config in (run_config, {**run_config, "secure-aggregation": False, "out-dir": str(plain)}):
        result = deployment.run(config)
        assert result.returncode == 0, result.stdout[-3000:] + deployment.logs()
    assert_secure_run_within_the_bound(run_config, out, tmp_path / "simulated")
    report = json.loads((out / "privacy.json").read_text())
    assert report and report == json.loads((plain / "privacy.json").read_text())


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs flwr[simulation] (Ray)")
def test_secure_aggregation_on_the_simulation_engine(deployment, tmp_path):
    """The same secure run on the simulation engine (three virtual SuperNodes, Ray)."""
    use_simulation_engine(deployment)
    out = tmp_path / "run"
    run_config = small_run(out, **SECURE)
    result = deployment.run(run_config, "sim")
    assert result.returncode == 0 and (out / "summary.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    assert_secure_run_within_the_bound(run_config, out, tmp_path / "simulated")


def test_a_supernode_killed_mid_run_leaves_the_rounds_to_the_others(deployment, tmp_path):
    """SIGKILL to one supernode's process group while the server is paused after round 1: Flower
    reports the node lost (after its missed heartbeats), rounds 2 and 3 aggregate the other two
    (min_clients = 2), and the run completes with the failure in metrics.jsonl."""
    out = tmp_path / "run"
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "rounds": 3, "min-clients": 2,
                                   "dp-epsilon": "none"})
    deployment.start([f"partition-id={i} num-partitions=3" for i in range(3)])
    output = deployment.run_interrupted(run_config, lambda: deployment.kill("supernode2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", output[-3000:] + deployment.logs()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["clients"] == [0, 1, 2]
    assert [r["clients"] for r in rounds[1:]] == [[0, 1], [0, 1]]
    assert all("client 2" in r["failed"]["2"] for r in rounds[1:])


def test_a_restarted_supernode_keeps_its_budget_and_never_reuses_noise(deployment, tmp_path):
    """DP-SGD with a fixed noise key (the case where a reset stream would repeat noise): while the server
    is paused after round 1, supernode 0 is killed and started again with the same node_config (a new
    node id, Flower's state gone). The pause lasts until the new node is online at the SuperLink, so
    round 2's rediscovery (``FedLoRAStrategy.rediscover``, before each round's sampling) finds it however
    fast it came back. It continues from its state file (state-dir) and the server's count: it trains
    in rounds 2 and 3, every node ends within its target, the node's own account equals the server's
    ledger and its noise offset equals the steps it took (each step used the next unused offset)."""
    from fedlora_ext.federated.client_state import restore_client
    from fedlora_ext.flower.node_state import load_state

    out, state = tmp_path / "run", tmp_path / "node-state"
    target = 6.0
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "rounds": 3, "min-clients": 2,
                                   "dp-epsilon": target, "dp-noise-seed": 5})
    node_configs = [f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)]
    deployment.start(node_configs)

    def restart_node_0() -> None:
        deployment.kill("supernode0")
        deployment.start_supernode("supernode0-restarted", node_configs[0])
        deployment.wait_registered("supernode0-restarted")  # round 2 must not start before it is online

    output = deployment.run_interrupted(run_config, restart_node_0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", output[-3000:] + deployment.logs()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [0 in r["clients"] for r in rounds] == [True, True, True], "the restarted node trained in rounds 2 and 3"
    report = json.loads((out / "privacy.json").read_text())
    assert all(r["epsilon"] <= target for r in report["clients"].values()) and report["epsilon_max"] <= target
    files = list(state.glob("run-*/client-0.safetensors"))
    assert len(files) == 1, files
    meta, _, _ = load_state(files[0])
    client = restore_client(meta, {})
    asked = report["clients"]["0"]["steps"]
    assert client.privacy.account.steps == asked and client.privacy.noise.offset == asked
    assert sum(t["steps"] for r in rounds for t in r["trainings"] if t["client"] == 0) == asked


@pytest.mark.slow
def test_a_run_resumed_after_its_superlink_is_killed_ends_as_the_uninterrupted_one(deployment, tmp_path):
    """FFA-LoRA with DP-SGD (a fixed noise key), three rounds, nodes with a state-dir. One run goes through;
    in a second, the SuperLink's process group (the ServerApp it started included) gets SIGKILL while the
    server is paused after round 2 (checkpointed), the SuperLink starts again on its port and database, the
    supernodes reconnect, and `flwr run ... resume=true` continues the run to the uninterrupted run's
    adapter, metrics and privacy.json."""
    from fedlora_ext.app.run_folder import lock_holder
    from fedlora_ext.federated.checkpoint import read_index

    whole, stopped, state = tmp_path / "whole", tmp_path / "stopped", tmp_path / "node-state"
    changes = {"method": "ffa_lora", "rank": 4, "rounds": 3, "dp-epsilon": 8.0, "dp-noise-seed": 5}
    deployment.start([f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)])
    result = deployment.run(small_run(whole, **changes))
    assert result.returncode == 0 and json.loads((whole / "summary.json").read_text())["status"] == "completed", \
        result.stdout[-3000:] + deployment.logs()

    request = request_pause(deployment.pause_dir, 2)
    with open(tmp_path / "flwr-run.log", "w") as handle:
        run = subprocess.Popen(deployment.command(small_run(stopped, **changes)), env=deployment.env, cwd=tmp_path,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_pause(paused_marker(deployment.pause_dir, 2), run, log=tmp_path / "flwr-run.log")
        deployment.kill("superlink")
        deadline = time.monotonic() + PAUSE_DEADLINE  # a failure guard: the event is the lock's release
        while lock_holder(stopped) is not None:  # the ServerApp is gone when its flock is
            assert time.monotonic() < deadline, "the ServerApp outlived its SuperLink"
            time.sleep(0.05)
    finally:
        release(request)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
    assert read_index(stopped)["rounds_done"] == 2 and not (stopped / "summary.json").exists()
    deployment.start_superlink("superlink-restarted")
    result = deployment.run({**small_run(stopped, **changes), "resume": True})
    summary = json.loads((stopped / "summary.json").read_text())
    assert result.returncode == 0 and summary["status"] == "completed" and summary["rounds"] == 3, \
        result.stdout[-3000:] + deployment.logs()
    ours, theirs = load_file(str(stopped / "adapter.safetensors")), load_file(str(whole / "adapter.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    timings = ("seconds", "seconds_train", "seconds_aggregate", "seconds_eval")
    rounds = [[{k: v for k, v in json.loads(line).items() if k not in timings}
               for line in (folder / "metrics.jsonl").read_text().splitlines()] for folder in (stopped, whole)]
    assert rounds[0] == rounds[1]
    assert json.loads((stopped / "privacy.json").read_text()) == json.loads((whole / "privacy.json").read_text())
