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
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None or shutil.which("flwr") is None:  # pragma: no cover
    pytest.skip("Flower's command-line tools are not on PATH", allow_module_level=True)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora_ext.federated.simulation import simulate  # noqa: E402
from fedlora_ext.flower.run_config import config_from_run_config  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "fedlora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink and supernodes as child processes, each in its own session (its process group
    holds the SuperExec and ClientApp processes it starts), stopped by id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr_home"
        self.home.mkdir(parents=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(args, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start(self, node_configs: list[str]) -> None:
        self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.root / "state.db"), "--disable-runtime-dependency-installation"])
        self._wait_healthy(self.port, "superlink")
        for i, node_config in enumerate(node_configs):
            self._start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                          "--port", str(free_port()), "--node-config", node_config])

    def _wait_healthy(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{name} not healthy after {timeout} s")

    def run(self, run_config: dict, timeout: float = 420.0) -> subprocess.CompletedProcess:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return subprocess.run(["flwr", "run", str(APP), "local", "--stream", "--run-config", overrides],
                              env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for process in self.processes.values():  # by id: the process group each child leads
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            try:  # the SuperExec and ClientApp processes it started
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_detached(self) -> None:
        """Processes that outlive the CLI which started them (the simulation engine's local SuperLink):
        found by our FLWR_HOME in their environment, stopped by id."""
        marker = f"FLWR_HOME={self.home}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


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


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs flwr[simulation] (Ray)")
def test_simulation_engine_matches_the_simulator(deployment, tmp_path):
    """The same app on Flower's simulation engine (a `:local:` connection, Ray): FFA-LoRA with DP-SGD."""
    (deployment.home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local:"\noptions.num-supernodes = 3\n')
    deployment.env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    out = tmp_path / "run"
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "dp-noise-seed": 5})
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    result = subprocess.run(["flwr", "run", str(APP), "sim", "--stream", "--run-config", overrides], env=deployment.env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0 and (out / "summary.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    assert_matches_simulator(run_config, out, tmp_path / "simulated")


def test_a_supernode_killed_mid_run_leaves_the_rounds_to_the_others(deployment, tmp_path):
    """SIGKILL to one supernode's process group once round 1 is recorded: Flower reports the node lost
    (after its missed heartbeats), rounds 2 and 3 aggregate the other two (min_clients = 2), and the
    run completes with the failure in metrics.jsonl."""
    out = tmp_path / "run"
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "rounds": 3, "min-clients": 2,
                                   "dp-epsilon": "none"})
    deployment.start([f"partition-id={i} num-partitions=3" for i in range(3)])
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    run = subprocess.Popen(["flwr", "run", str(APP), "local", "--stream", "--run-config", overrides], env=deployment.env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists()
                                                   and (out / "metrics.jsonl").read_text().strip()):
            time.sleep(0.2)
        os.killpg(deployment.processes["supernode2"].pid, signal.SIGKILL)
        output, _ = run.communicate(timeout=480)
    finally:
        if run.poll() is None:
            run.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", output[-3000:] + deployment.logs()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["clients"] == [0, 1, 2]
    assert [r["clients"] for r in rounds[1:]] == [[0, 1], [0, 1]]
    assert all("client 2" in r["failed"]["2"] for r in rounds[1:])


def test_a_restarted_supernode_keeps_its_budget_and_never_reuses_noise(deployment, tmp_path):
    """DP-SGD with a fixed noise key (the case where a reset stream would repeat noise): once round 1 is
    recorded, supernode 0 is killed and started again with the same node_config (a new node id, Flower's
    state gone). It continues from its state file (state-dir) and the server's count: the server finds
    it again, every node ends within its target, the node's own account equals the server's ledger and
    its noise offset equals the steps it took (each step used the next unused offset)."""
    from fedlora_ext.federated.client_state import restore_client
    from fedlora_ext.flower.node_state import load_state

    out, state = tmp_path / "run", tmp_path / "node-state"
    target = 6.0
    run_config = small_run(out, **{"method": "ffa_lora", "rank": 4, "rounds": 3, "min-clients": 2,
                                   "dp-epsilon": target, "dp-noise-seed": 5})
    node_configs = [f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)]
    deployment.start(node_configs)
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    run = subprocess.Popen(["flwr", "run", str(APP), "local", "--stream", "--run-config", overrides], env=deployment.env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists()
                                                   and (out / "metrics.jsonl").read_text().strip()):
            time.sleep(0.2)
        os.killpg(deployment.processes["supernode0"].pid, signal.SIGKILL)
        deployment.processes["supernode0"].wait(timeout=10)
        deployment._start("supernode0-restarted", ["flower-supernode", "--insecure", "--superlink",
                                                   f"127.0.0.1:{deployment.port}", "--port", str(free_port()),
                                                   "--node-config", node_configs[0]])
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", output[-3000:] + deployment.logs()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 in rounds[-1]["clients"], "the restarted node took part again"
    report = json.loads((out / "privacy.json").read_text())
    assert all(r["epsilon"] <= target for r in report["clients"].values()) and report["epsilon_max"] <= target
    files = list(state.glob("run-*/client-0.safetensors"))
    assert len(files) == 1, files
    meta, _, _ = load_state(files[0])
    client = restore_client(meta, {})
    asked = report["clients"]["0"]["steps"]
    assert client.privacy.account.steps == asked and client.privacy.noise.offset == asked
    assert sum(t["steps"] for r in rounds for t in r["trainings"] if t["client"] == 0) == asked
