"""A real local Flower deployment as child processes: one flower-superlink and flower-supernode processes on
127.0.0.1 (--insecure), each in its own session and stopped by its id, and `flwr run apps/fedlora` against
it. Used by test_flower_deployment.py and benchmarks/bench_secagg.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from pausing import PAUSE_DEADLINE, flower_pauses, paused_marker, release, request_pause, wait_for_pause

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
        self.start_superlink()
        for i, node_config in enumerate(node_configs):
            self.start_supernode(f"supernode{i}", node_config)

    def start_superlink(self, name: str = "superlink") -> None:
        """The SuperLink (``name`` for its log: a restarted one's, on the same port and database)."""
        self._start(name, ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                           "--database", str(self.root / "state.db"), "--disable-runtime-dependency-installation"])
        self._wait_healthy(self.port, name)

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

    def run_interrupted(self, run_config: dict, interrupt, after_round: int | str = 1, timeout: float = 600.0) -> str:
        """`flwr run` with the server paused once round ``after_round`` is recorded (``"R-share_keys"``:
        once round R's SecAgg+ keys are shared): ``interrupt()`` runs
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

