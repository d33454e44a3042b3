"""A Flower node's client state on its own disk, so a restarted SuperNode continues its client.

Flower keeps a node's ``context.state`` in memory: a SuperNode that restarts comes back as a new node
with none, and a private client would start a fresh privacy account and, with ``dp_noise_seed`` set,
draw the same noise again. With ``state-dir`` in its ``node_config`` the node writes its client state
(kept tensors, merged base, account, noise key and offset) after every message to
``<state-dir>/run-<run id>/client-<cid>.safetensors`` (the run id of the run's first start, which the
messages of a resumed run carry as ``run-key``): one file written to a temporary name and
renamed (a crash leaves the previous one whole), mode 0600 in 0700 folders, as it holds the key.
It never leaves the node; the server's ledger still decides who trains.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from fedlora_ext.federated.checkpoint import write_atomic


def state_file(node_config, run_id: int, cid: int) -> Path | None:
    """Where this node keeps client ``cid``'s state for run ``run_id`` (None without ``state-dir``)."""
    folder = node_config.get("state-dir")
    if folder is None or str(folder).strip() == "":
        return None
    return Path(str(folder)).expanduser() / f"run-{run_id}" / f"client-{cid}.safetensors"


def save_state(path: Path, meta: dict, tensors: dict[str, Tensor], base: dict[str, Tensor]) -> None:
    """Writes the client's meta (JSON, with its key), kept tensors and merged base as one file."""
    for folder in (path.parent.parent, path.parent):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    entries = {f"tensors/{n}": t for n, t in tensors.items()} | {f"base/{n}": t for n, t in base.items()}
    entries = {n: t.detach().cpu().contiguous() for n, t in entries.items()}
    write_atomic(path, save(entries, metadata={"meta": json.dumps(meta)}), mode=0o600)


def load_state(path: Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]] | None:
    """(meta, kept tensors, merged base) from ``path``, or None when the node has no state there yet."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
        entries = {name: handle.get_tensor(name) for name in handle.keys()}
    split = {prefix: {n.removeprefix(prefix): t for n, t in entries.items() if n.startswith(prefix)}
             for prefix in ("tensors/", "base/")}
    return meta, split["tensors/"], split["base/"]
