"""Runs paused at a known point, for tests that interrupt, kill or race a run: they wait for an event
the run signals, never on how fast it goes.

`fedlora run`: ``paused(env, after_round, path)`` is ``env`` with FEDLORA_TEST_PAUSE_AFTER_ROUND
(fedlora_ext/app/jobs.py): the run, once round ``after_round`` is checkpointed, creates ``path`` and waits
there until a signal ends it or ``path`` is removed. ``wait_for_pause(path, process)`` returns once
``path`` exists.

A Flower ServerApp (fedlora_ext/flower/strategy.py) started with FEDLORA_TEST_PAUSE_DIR=<folder>
(``flower_pauses(env, folder)``): ``request_pause(folder, R)`` asks it to stop once round R is recorded;
it then creates ``paused_marker(folder, R)``, and waits until the request file is removed (``release``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

#: a failure guard only: the pause is what the tests wait for
PAUSE_DEADLINE = 300


def paused(env: dict, after_round: int, path: Path) -> dict:
    return {**env, "FEDLORA_TEST_PAUSE_AFTER_ROUND": f"{after_round}:{path}"}


def wait_for_pause(path: Path, process: subprocess.Popen, timeout: float = PAUSE_DEADLINE,
                   log: Path | None = None) -> None:
    """Returns once ``path`` exists; fails when ``process`` ends first (with its stderr, or the tail
    of ``log``) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = process.stderr.read()[-3000:] if process.stderr is not None else ""
            if log is not None and log.exists():
                output += log.read_text()[-3000:]
            raise AssertionError(f"the run ended (exit {process.returncode}) before pausing: {output}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no pause after {timeout} s")
        time.sleep(0.05)


# ---- Flower: the server pauses between rounds -------------------------------------------------------
def flower_pauses(env: dict, folder: Path) -> dict:
    """``env`` for a SuperLink: the ServerApps it starts inherit it and look in ``folder`` for requests."""
    return {**env, "FEDLORA_TEST_PAUSE_DIR": str(folder)}


def request_pause(folder: Path, after_round: int) -> Path:
    """Asks the server to pause once round ``after_round`` is recorded; returns the request file."""
    request = folder / f"pause-after-round-{after_round}"
    request.touch()
    return request


def paused_marker(folder: Path, after_round: int) -> Path:
    """The file the server creates when it pauses after round ``after_round``."""
    return folder / f"paused-after-round-{after_round}"


def release(request: Path) -> None:
    """Lets the server go on (it polls every 0.05 s)."""
    request.unlink(missing_ok=True)
