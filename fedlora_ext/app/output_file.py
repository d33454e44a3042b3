"""A file a command writes beside its printed result (``generate --json``, ``predict --out``, ``evaluate
--json``): a new file, or with ``--overwrite`` one the same command wrote earlier, never anything else; written
through a hidden file and a rename, so that a reader never sees half of it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path


def check_output_file(path: str | Path, flag: str, overwrite: bool, earlier: Callable[[Path], bool],
                      what: str) -> None:
    """Refuses ``flag PATH`` before any work: a folder, a path under a file, an existing file without
    ``overwrite``, or (with it) one that ``earlier`` does not recognise as ``what`` (an earlier result)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    above = next(p for p in path.absolute().parents if p.exists())  # the folder it goes into, or a file
    if not above.is_dir():
        raise ValueError(f"{flag} {path}: {above} is a file, not a folder; choose another path")
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_file() or not earlier(path):
        raise ValueError(f"{flag} {path} exists and is not {what}; not touching it, --overwrite or not: choose "
                         "another path")
    if not overwrite:
        raise ValueError(f"{flag} {path} exists ({what}); pass --overwrite to replace it, or choose another path")


def write_through_rename(path: str | Path, text: str) -> None:
    """``text`` into ``path`` through a new hidden file beside it and a rename (the callers have checked
    that ``path`` may be replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(os.getpid()):
        temporary = path.with_name(f".{path.name}.{n}.tmp")
        try:
            with temporary.open("x") as file:  # exclusive: never an existing file
                file.write(text)
        except FileExistsError:
            continue
        break
    try:
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
