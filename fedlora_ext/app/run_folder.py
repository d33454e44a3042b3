"""Claiming a run folder: one run per folder, never over another run's files without ``--overwrite``.

The rule (README, "Federated fine-tuning"): a run goes into a new folder, an empty one, or (with
``overwrite``) a folder that holds only an earlier run's files, which are removed first so that nothing
of that run survives. A folder holds a run when it has one of :data:`MARKERS` (``config.json``,
``metrics.jsonl``, ``checkpoint.json``, ``summary.json``, ``adapter.safetensors``, ``results.md``, ...)
or a ``keys/`` folder; a run that failed or was interrupted before finishing its first round leaves
nothing to continue, and its folder may be taken again without ``overwrite``. A folder with files
fedlora did not write is never taken, and never emptied.

While a run uses a folder it holds an exclusive ``flock`` on ``.fedlora.lock`` there, which records
its pid, host and start time: a second run (``--resume`` included) is refused naming the holder. The
kernel drops the lock when the process dies however it dies, so a lock file left by a killed run does
not block. Default run folders (``runs/<name>-YYYYMMDD-HHMMSS``, then ``-2``, ``-3`` ...) are created
with an exclusive ``mkdir``, so two runs started in the same second never share one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from fedlora_ext.errors import RunError
from fedlora_ext.federated.checkpoint import FOLDER as CHECKPOINT_FOLDER
from fedlora_ext.federated.checkpoint import read_index, write_atomic

LOCK = ".fedlora.lock"
# files whose presence means "a run was here" (a run's, a Flower run's, or a comparison's)
MARKERS = ("config.json", "metrics.jsonl", "checkpoint.json", "summary.json", "adapter.safetensors", "privacy.json",
           "results.md", "results.json", "compare.json")
# everything else fedlora writes into a run folder (patterns), and its folders: a new artefact must be
# listed here (or in MARKERS), else --overwrite refuses the folder as holding files fedlora did not write
OTHER_FILES = ("plot.png", "accuracy.png", "final_accuracy.png", "bytes.png", "epsilon.png", "labels.json",
               "data.json", "checkpoint-*.safetensors",  # format 1's checkpoint tensors
               "generations.jsonl", "run.log", LOCK)  # run.log: `--log-file RUN_DIR/run.log`
# base_model/: a tiny model's base (`fedlora export` starts from it), written through .base_model.tmp/
FOLDERS = ("keys", "cache", "tensorboard", "base_model", ".base_model.tmp", CHECKPOINT_FOLDER)
_COMPARE = ("results.md", "results.json", "compare.json")


class RunLock:
    """An exclusive ``flock`` on ``folder/.fedlora.lock`` for the life of a run (a context manager).
    :meth:`acquire` raises :class:`RunError` naming the holder when another process has it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        for _ in range(100):  # the holder may unlink the file between our open and our flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunError(f"{self.folder} is in use by another run ({holder_text(read_holder(self.path))}); "
                                   "wait for it to finish or choose another folder") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self._created = fd, created
                return self
            os.close(fd)
        raise RunError(f"{self.folder}: could not take {LOCK} (it keeps changing)")

    def record(self) -> None:
        """Writes who holds the lock: pid, host, start time and command line."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["fedlora", *sys.argv[1:]])}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self, *, remove: bool = True) -> None:
        """Drops the lock; removes the file (while still holding it) unless ``remove`` is false and the
        file was there before us (a stale lock left exactly as found)."""
        if self._fd is None:
            return
        try:
            if remove or self._created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder_text(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    return f"pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')}"


def lock_holder(folder: str | Path) -> dict | None:
    """Who holds the folder's lock (``pid``, ``host``, ``since``), or None when no process does."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path) or {"pid": None}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---- what a folder holds --------------------------------------------------------------------------
def _summary(folder: Path) -> dict:
    try:
        value = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_markers(folder: str | Path) -> list[str]:
    """The markers of a run in ``folder`` (empty when it holds none)."""
    folder = Path(folder)
    found = [name for name in MARKERS if (folder / name).exists()]
    if (folder / "keys").is_dir():
        found.append("keys/")
    return found


def reusable(folder: str | Path) -> bool:
    """A run that failed or was interrupted before finishing its first round: nothing to continue."""
    folder = Path(folder)
    if _summary(folder).get("status") not in ("failed", "interrupted"):
        return False
    if any((folder / name).exists() for name in ("checkpoint.json", "adapter.safetensors", *_COMPARE)):
        return False
    metrics = folder / "metrics.jsonl"
    return not metrics.exists() or not metrics.read_text().strip()


def holds_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and bool(run_markers(folder)) and not reusable(folder)


def _known(entry: Path, compare: bool) -> bool:
    name = entry.name
    if entry.is_symlink():
        return False
    if entry.is_dir():
        if name in FOLDERS:
            return True
        # a comparison's variants are run folders of their own (or empty ones), or (--seeds) folders of them
        return compare and (_run_or_empty(entry) or _seed_runs(entry))
    if name.endswith(".tmp"):  # a temporary file of an atomic write: `.name.tmp` or `name.tmp`
        name = name[:-4].lstrip(".")
    return name in MARKERS or any(fnmatch.fnmatchcase(name, pattern) for pattern in OTHER_FILES)


def _run_or_empty(folder: Path) -> bool:
    return not foreign_entries(folder, compare=False) and (bool(run_markers(folder)) or not any(folder.iterdir()))


def _seed_runs(folder: Path) -> bool:
    """A variant of ``compare --seeds``: nothing but ``seed<k>/`` run folders (or empty ones)."""
    return all(e.is_dir() and not e.is_symlink() and fnmatch.fnmatchcase(e.name, "seed*")
               and e.name[4:].lstrip("-").isdigit() and _run_or_empty(e) for e in folder.iterdir())


def foreign_entries(folder: str | Path, *, compare: bool | None = None) -> list[str]:
    """The entries of ``folder`` that fedlora does not write (sorted names)."""
    folder = Path(folder)
    if compare is None:
        compare = any((folder / name).exists() for name in _COMPARE)
    return sorted(e.name for e in folder.iterdir() if not _known(e, compare))


def _remove_contents(folder: Path) -> None:
    """Removes every entry but the lock (markers last, so an interrupted removal still reads as a run)."""
    entries = [e for e in folder.iterdir() if e.name != LOCK]
    entries.sort(key=lambda e: (e.name in MARKERS, e.name != "checkpoint.json"))
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim(folder: str | Path, *, overwrite: bool = False, command: str = "run") -> RunLock:
    """Takes ``folder`` for a new run (creating it) and returns its held :class:`RunLock`; the caller
    releases it (``with claim(...):``). Raises :class:`RunError` (one line, naming the folder) when
    another run holds it, when it holds a run and ``overwrite`` is false, or when it holds files that
    fedlora did not write (never removed, even with ``overwrite``). With ``overwrite`` the earlier
    run's files are removed before this returns."""
    folder = Path(folder)
    out = "out-dir" if command == "flower" else "--out"
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder} exists and is not a folder; choose another {out}")
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder).acquire()
    try:
        markers = run_markers(folder)
        if markers and not reusable(folder) and not overwrite:
            resume = (folder / "checkpoint.json").exists() and _summary(folder).get("status") != "completed"
            hint = "" if not resume else ("continue it with resume=true, " if _flower_run(folder) else
                                          f"continue it with `fedlora run --resume {folder}`, ")
            replace = "overwrite=true" if command == "flower" else "--overwrite"
            raise RunError(f"{folder} already holds a run ({_listing(markers)}); {hint}replace it with {replace} "
                           f"or choose another {out}")
        foreign = foreign_entries(folder)
        if foreign:
            what = "besides a run, files fedlora did not write" if markers else "files that are not a fedlora run"
            raise RunError(f"{folder} holds {what} ({_listing(foreign)}); not touching it: choose an empty or new "
                           f"folder as {out}")
        _remove_contents(folder)
        lock.record()
    except BaseException:
        lock.release(remove=False)
        raise
    return lock


def _flower_run(folder: Path) -> bool:
    """Whether the folder's checkpoint is a Flower server's (the run continues with ``resume=true``)."""
    try:
        return read_index(folder).get("nodes") is not None
    except ValueError:
        return False


def lock_existing(folder: str | Path) -> RunLock | None:
    """The lock of an existing run folder (``--resume``); None when there is no such folder (the
    resume then fails with its own message)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    lock = RunLock(folder).acquire()
    lock.record()
    return lock


def new_run_folder(parent: str | Path, name: str, now: float | None = None) -> Path:
    """``parent/<name>-YYYYMMDD-HHMMSS`` (local time ``now``), or with ``-2``, ``-3`` ... when taken:
    made with an exclusive ``mkdir``, so parallel runs started in the same second get their own."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunError(f"{parent}: no free run folder name for {stamp}")


def write_json_atomic(path: str | Path, value) -> None:
    """JSON through a temporary file in the same folder and a rename (the checkpoints' own writer)."""
    write_atomic(Path(path), json.dumps(value, indent=2).encode())


# ---- fedlora status -------------------------------------------------------------------------------
def _rounds_planned(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "config.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_rounds(folder: str | Path) -> int | None:
    """The rounds done of the folder's last checkpoint (None without one, or with a damaged one)."""
    try:
        return int(read_index(folder)["rounds_done"])
    except (ValueError, KeyError, TypeError):
        return None


def _metrics_rounds(folder: Path) -> int:
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    rounds = 0
    for line in lines:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and not row.get("stopped"):
                rounds += 1
    return rounds


def run_status(folder: str | Path) -> str:
    """One line on the run in ``folder``: running (who), completed, failed, interrupted, or stopped.
    Raises ValueError when the folder holds no run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    holder = lock_holder(folder)
    planned = _rounds_planned(folder)
    of = f"/{planned}" if planned else ""
    done = checkpoint_rounds(folder)
    if done is None:
        done = _metrics_rounds(folder)
    if holder is not None:
        return f"{folder}: running ({holder_text(holder)}), {done}{of} rounds done"
    summary = _summary(folder)
    status = summary.get("status")
    if status is None and "final" in summary:  # a summary from before summaries had a status
        status = "completed"
    resume = ("continue with `flwr run` and resume=true" if _flower_run(folder)
              else f"continue with fedlora run --resume {folder}")
    if status == "completed":
        rounds = summary.get("rounds", done)
        line = f"{folder}: completed {rounds}{of} rounds"
        final = summary.get("final")
        if isinstance(final, (int, float)) and final == final:
            line += f", final {summary.get('accuracy', 'test')} {summary.get('metric', 'accuracy')} {final:.3f}"
        if summary.get("epsilon") is not None:
            line += f", epsilon {summary['epsilon']:.2f}"
        return line
    if status == "failed":
        after = f" after round {done}" if done else ""
        return f"{folder}: failed{after}: {summary.get('error', 'no error recorded')}"
    if status == "interrupted":
        done = summary.get("rounds_done", done)
        if (folder / "checkpoint.json").exists():
            return f"{folder}: interrupted after round {done}{of} ({resume})"
        return f"{folder}: interrupted before its first round finished (nothing to continue; start it again)"
    if (folder / "results.md").exists():
        return f"{folder}: comparison finished (results.md)"
    if planned and done == planned and (folder / "adapter.safetensors").exists():  # simulate writes no summary
        return f"{folder}: completed {done}{of} rounds (no summary.json)"
    if (folder / "checkpoint.json").exists():
        return f"{folder}: stopped after round {done}{of} without a summary (killed?); {resume}"
    if run_markers(folder):
        return f"{folder}: stopped after round {done}{of} without a summary"
    raise ValueError(f"{folder} holds no run (no {', '.join(MARKERS[:4])}, ...)")
