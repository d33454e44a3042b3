"""A `fedlora run` subprocess paused at a known point, for tests that interrupt, kill or race a run:
they wait for an event the run signals, never on how fast it goes.

``paused(env, after_round, path)`` is ``env`` with FEDLORA_TEST_PAUSE_AFTER_ROUND (fedlora_ext/jobs.py):
the run, once round ``after_round`` is checkpointed, creates ``path`` and waits there until a signal
ends it or ``path`` is removed. ``wait_for_pause(path, process)`` returns once ``path`` exists.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

#: a failure guard only: the pause is what the tests wait for
PAUSE_DEADLINE = 300


def paused(env: dict, after_round: int, path: Path) -> dict:
    return {**env, "FEDLORA_TEST_PAUSE_AFTER_ROUND": f"{after_round}:{path}"}


def wait_for_pause(path: Path, process: subprocess.Popen, timeout: float = PAUSE_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            stderr = process.stderr.read()[-3000:] if process.stderr is not None else ""
            raise AssertionError(f"the run ended (exit {process.returncode}) before pausing: {stderr}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no pause after {timeout} s")
        time.sleep(0.05)
