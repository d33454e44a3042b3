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
from pausing import PAUSE_DEADLINE, flower_pauses, paused_marker, release, request_pause, wait_for_pause  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "fedlora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink and supernodes as child processes, each in its own session (its process group
    holds the SuperExec and ClientApp processes it starts), stopped by id. The ServerApps the SuperLink
    starts inherit its environment, so a test can pause one between rounds (``pause_dir``, pausing.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr_home"
        self.home.mkdir(parents=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.pause_dir = root / "pauses"
        self.pause_dir.mkdir()
        self.env = flower_pauses(self.env, self.pause_dir)
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
            self.start_supernode(f"supernode{i}", node_config)

    def start_supernode(self, name: str, node_config: str) -> None:
        self._start(name, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                           "--port", str(free_port()), "--node-config", node_config])

    def wait_registered(self, name: str, timeout: float = PAUSE_DEADLINE) -> None:
        """Returns once supernode ``name`` is registered and online at the SuperLink: it logs its
        node id only after the SuperLink activated it."""
        deadline, log = time.monotonic() + timeout, self.root / f"{name}.log"
        while "SuperNode ID:" not in log.read_text():
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not registered after {timeout} s")
            time.sleep(0.05)

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

    @staticmethod
    def command(run_config: dict, connection: str = "local") -> list[str]:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return ["flwr", "run", str(APP), connection, "--stream", "--run-config", overrides]

    def run(self, run_config: dict, connection: str = "local", timeout: float = 420.0) -> subprocess.CompletedProcess:
        """`flwr run` to its end on ``connection`` (a name in FLWR_HOME's config.toml), output captured."""
        return subprocess.run(self.command(run_config, connection), env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def run_interrupted(self, run_config: dict, interrupt, after_round: int = 1, timeout: float = 600.0) -> str:
        """`flwr run` with the server paused once round ``after_round`` is recorded: ``interrupt()`` runs
        during the pause, then the run goes on to its end. Returns its output (also in flwr-run.log)."""
        request, log = request_pause(self.pause_dir, after_round), self.root / "flwr-run.log"
        with open(log, "w") as handle:
            run = subprocess.Popen(self.command(run_config), env=self.env, cwd=self.root, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_pause(paused_marker(self.pause_dir, after_round), run, log=log)
            interrupt()
            release(request)
            run.wait(timeout=timeout)
        finally:
            release(request)
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(timeout=10)
        return log.read_text()

    def kill(self, name: str) -> None:
        """SIGKILL to process ``name``'s group (a supernode and the ClientApps it started); returns once
        the process is gone."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=10)

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
    result = deployment.run(run_config, "sim")  # from tmp_path, the deployment's root
    assert result.returncode == 0 and (out / "summary.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    assert_matches_simulator(run_config, out, tmp_path / "simulated")


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
