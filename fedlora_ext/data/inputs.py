"""A run's inputs as its folder records them, so that ``fedlora run --resume DIR`` works from any current
directory: a dataset or model given as a local path is recorded absolute, and a local model folder by a
fingerprint of its files (the data's is its content fingerprint, :mod:`fedlora_ext.data.fingerprint`).

Names that are not paths (``synthetic``, the packaged corpora, ``minilm``, the tiny models, Hub ids)
are their own identity and stay as given.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedlora_ext.data.models import PACKAGED_MODEL
from fedlora_ext.data.sources import PACKAGED_CORPORA, looks_like_path
from fedlora_ext.data.tiny_models import TINY

#: dataset and model names that never name a path
NAMED_DATASETS = ("synthetic", *PACKAGED_CORPORA)
NAMED_MODELS = (PACKAGED_MODEL, *TINY)


def local_path(name: str, named: tuple[str, ...]) -> Path | None:
    """``name`` as an absolute path when it is an existing local file or folder (not one of ``named``),
    else None. Symbolic links are kept (``abspath``, not ``resolve``): the path the user gave, from ``/``."""
    if name in named:
        return None
    path = Path(name).expanduser()
    return Path(os.path.abspath(path)) if path.exists() else None


def absolute_inputs(dataset: str, model: str) -> dict[str, str]:
    """The FedConfig changes that record ``dataset`` and ``model`` as absolute paths (only those that are
    relative local paths; empty when there is nothing to change)."""
    changes = {}
    for key, name, named in (("dataset", dataset, NAMED_DATASETS), ("model", model, NAMED_MODELS)):
        path = local_path(name, named)
        if path is not None and str(path) != name:
            changes[key] = str(path)
    return changes


def relative_path(name: str, named: tuple[str, ...], suffixes: tuple[str, ...]) -> bool:
    """Whether ``name`` reads as a relative path (``suffixes``: what a file of its kind ends in), as runs
    recorded them before paths were stored absolute; a Hub id does not."""
    if name in named or Path(name).expanduser().is_absolute():
        return False
    return looks_like_path(name, suffixes)


#: files of a model folder that do not change what the model computes (documentation)
_NOT_MODEL = (".md",)


def model_fingerprint(model: str) -> str:
    """SHA-256 of a local model folder's files (top level, not hidden, not documentation: config, weights,
    tokenizer), each by its name, size and content; "" for a name that is not a local folder. The folder's
    own path is not in it: a moved folder keeps its fingerprint."""
    path = local_path(model, NAMED_MODELS)
    if path is None or not path.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name.startswith(".") or not file.is_file() or file.suffix.lower() in _NOT_MODEL:
            continue
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
