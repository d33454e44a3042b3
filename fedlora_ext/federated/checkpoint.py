"""Checkpoints of a simulated run, one per round, from which ``fedlora run --resume`` continues and from
which ``fedlora export`` / ``evaluate`` / ``status`` read the run's state.

A checkpoint is everything the next round reads: the global state (tensors, merged base, strategy info
such as FLoRA's pending stacks), every client's state (kept tensors, rank, info, privacy account and
noise offset), the server's DP-FedAvg account and offset, the byte ledger, the metrics so far and
torch's generator state. It is stored so that a round writes what the round changed, not the population:

* ``checkpoint/global-<round>.safetensors``: the global tensors, the merged base and torch's generator;
* ``checkpoint/client-<cid>-<round>.safetensors``: one client's kept tensors, with its state as JSON in
  the file's metadata; written only in a round that changed the client (a client with no state of its
  own has no file);
* ``checkpoint.json``: the index, written last (temporary file + rename): the rounds done, the config,
  the history, and per client (in columns, a few dozen bytes each) its rank, example count, the round
  its file was written in and that file's SHA-256; a Flower server's also ``nodes``, what it holds of
  its nodes (the run key they keep their state under, their privacy reports; the rest is on the nodes).

File names carry the round that wrote them and no file is ever rewritten, so a crash at any byte leaves
the previous index and every file it names whole; files a newer index no longer names are removed only
after it is in place (and a crash's leftovers at the next save). Nothing is pickled.

The noise keys are not in the checkpoint: each client's key is in ``keys/client-<cid>.key`` (the
server's in ``keys/server.key``), written once, mode 0600 in a 0700 folder: the stand-in, on one
machine, for each party's own storage. :func:`read_run` is the one reader of all this.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.federated.client_state import client_meta, restore_client

FORMAT = 2
INDEX = "checkpoint.json"
FOLDER = "checkpoint"  # the tensor files of format 2
_LEGACY_TENSORS = "checkpoint-*.safetensors"  # format 1: one file with every tensor, beside the index


@dataclass
class RunState:
    """A run's state after ``rounds_done`` rounds, as a checkpoint holds it.

    ``server_privacy`` is ``{"history", "offset", "seed"}`` of the server's DP-FedAvg stream (None when the
    run has none; ``seed`` None unless read with ``keys``); ``ledger`` the byte ledger's rounds; ``rng``
    torch's generator state (None where only the models were read)."""

    rounds_done: int
    config: dict
    state: GlobalState
    clients: list[ClientState]
    server_privacy: dict | None = None
    ledger: list[dict[str, dict[int, int]]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    rng: Tensor | None = None
    files: dict[int, dict] = field(default_factory=dict)  # read: each client's index entry and stored meta
    # a Flower server's (JSON): the key its nodes keep their state under and each node's own privacy
    # report; None for a simulated run, whose clients' whole state is in the checkpoint
    nodes: dict | None = None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """safetensors through a temporary file and a rename; returns the file's SHA-256."""
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    digest = _sha256(temporary)
    os.replace(temporary, path)
    return digest


def _pack(value: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """JSON for nested dicts / lists / scalars; tensors go to ``tensors`` and leave their key behind.
    Dicts keep their key types (FLoRA's stacks are keyed by round numbers)."""
    if isinstance(value, Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _pack(v, tensors, prefix)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_pack(v, tensors, prefix) for v in value]}
    return {"value": value}


def _unpack(packed: Any, tensors: dict[str, Tensor]) -> Any:
    if "tensor" in packed:
        return tensors[packed["tensor"]]
    if "dict" in packed:
        return {k: _unpack(v, tensors) for k, v in packed["dict"]}
    if "list" in packed:
        return [_unpack(v, tensors) for v in packed["list"]]
    return packed["value"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class _Written:
    """A client's file as the index names it, and what it held: its meta (JSON) and the tensor objects
    with their versions, so that an untouched client is recognised without reading its tensors."""

    entry: dict
    meta: str
    tensors: tuple


def _client_files(client: ClientState) -> tuple[str, dict[str, Tensor], tuple]:
    """(meta JSON, tensors to store, signature) of a client: the signature holds the tensor objects
    themselves (an in-place change bumps their version; a new tensor is another object)."""
    tensors = dict(client.tensors)
    meta = {**client_meta(client, secret=False), "tensors": sorted(client.tensors)}
    meta["info"] = _pack(meta["info"], tensors, "info/")
    signature = tuple((name, t, t._version) for name, t in sorted(tensors.items()))
    return json.dumps(meta, sort_keys=True), tensors, signature


def _unchanged(written: _Written | None, meta: str, signature: tuple) -> bool:
    return written is not None and written.meta == meta and len(written.tensors) == len(signature) and all(
        a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(written.tensors, signature))


def _bare_entry(client: ClientState) -> dict:
    return {"cid": client.cid, "rank": client.rank, "num_examples": client.num_examples}


def _stateless(client: ClientState) -> bool:
    """Nothing beyond its rank and example count, which the index holds."""
    return not client.tensors and not client.info and client.privacy is None


class CheckpointWriter:
    """Writes a run's checkpoints into ``run_dir``, each round the global state plus the clients that
    changed since the checkpoint before (every client with state in its first save)."""

    def __init__(self, run_dir: str | Path, resumed: RunState | None = None) -> None:
        """``resumed``: the state read from ``run_dir`` (its clients as the run now holds them), whose
        files stand: the next save writes only the clients that changed since."""
        self.run_dir = Path(run_dir)
        self._written: dict[int, _Written] = {}
        self._global_file: str | None = None  # the last save's
        self._swept = False
        self._check_all = resumed is None  # nothing written by this writer yet: look at every client
        self._pending: set[int] = set()  # clients to look at in the next save whatever the caller says
        for client in resumed.clients if resumed is not None else ():
            if _stateless(client):
                continue
            entry = resumed.files.get(client.cid)
            meta, _, signature = _client_files(client)
            if entry is not None and meta == entry["meta"]:
                self._written[client.cid] = _Written({k: v for k, v in entry.items() if k != "meta"}, meta, signature)
            else:
                self._pending.add(client.cid)

    def save(self, run: RunState, changed: Iterable[int] | None = None) -> Path:
        """Checkpoints ``run``; returns the index file. ``changed``: the ids of every client the run may
        have changed since the last save (None: any client); only those are looked at, so a round's
        save costs what the round's participants hold, whatever the population."""
        folder = self.run_dir / FOLDER
        folder.mkdir(exist_ok=True)
        save_keys(self.run_dir, run)
        round_tag = f"{run.rounds_done:05d}"
        tensors: dict[str, Tensor] = {"rng/torch": run.rng if run.rng is not None else torch.get_rng_state()}
        tensors.update({f"global/{n}": t for n, t in run.state.tensors.items()})
        tensors.update({f"base/{n}": t for n, t in run.state.base.items()})
        info = _pack(run.state.info, tensors, "info/")
        global_file = f"global-{round_tag}.safetensors"
        global_sha = _write_tensors(folder / global_file, tensors)
        look = None if changed is None or self._check_all else set(changed) | self._pending
        entries, written = [], {}
        for client in run.clients:
            before = self._written.get(client.cid)
            if look is not None and client.cid not in look:  # untouched: as it was written (or stateless)
                if before is not None:
                    written[client.cid] = before
                entries.append(before.entry if before is not None else _bare_entry(client))
                continue
            entry = _bare_entry(client)
            if not _stateless(client):
                meta, own, signature = _client_files(client)
                if _unchanged(before, meta, signature):
                    entry = before.entry
                else:
                    sha = _write_tensors(folder / _client_file(client.cid, run.rounds_done), own,
                                         metadata={"meta": meta})
                    entry = {**entry, "round": run.rounds_done, "sha256": sha, "tensors": bool(client.tensors)}
                written[client.cid] = _Written(entry, meta, signature)
            entries.append(entry)
        server = run.server_privacy
        index = {
            "format": FORMAT,
            "rounds_done": run.rounds_done,
            "config": run.config,
            "global": {"file": global_file, "sha256": global_sha, "tensors": list(run.state.tensors),
                       "base": list(run.state.base), "info": info},
            "clients": {column: [e.get(column) for e in entries] for column in _COLUMNS},
            "server_privacy": None if server is None else {"history": [list(h) for h in server["history"]],
                                                           "offset": server["offset"]},
            "ledger": [{d: [[cid, n] for cid, n in r[d].items()] for d in r} for r in run.ledger],
            "history": run.history,
            "nodes": run.nodes,
        }
        write_atomic(self.run_dir / INDEX, json.dumps(index).encode())
        self._remove_unnamed(index, written)
        self._written, self._check_all, self._pending = written, False, set()
        return self.run_dir / INDEX

    def unsaved(self, run: RunState) -> list[int]:
        """The clients whose state differs from what the last save wrote (a check for callers that pass
        ``changed``: empty right after a save when they named every client they changed)."""
        out = []
        for client in run.clients:
            before = self._written.get(client.cid)
            if _stateless(client):
                if before is not None:
                    out.append(client.cid)
                continue
            meta, _, signature = _client_files(client)
            if not _unchanged(before, meta, signature):
                out.append(client.cid)
        return out

    def _remove_unnamed(self, index: dict, written: dict[int, _Written]) -> None:
        """Removes the files the new index no longer names: the replaced ones, and once per writer every
        other file in the folder (a crashed save's, a resumed run's older ones, format 1's)."""
        named = {index["global"]["file"]} | {_client_file(e["cid"], e["round"]) for e in client_entries(index)
                                             if e["round"] is not None}
        folder = self.run_dir / FOLDER
        if self._swept:
            stale = [folder / name for name in (_client_file(cid, w.entry["round"]) for cid, w in self._written.items())
                     if name not in named]
            stale += [folder / self._global_file] if self._global_file not in named else []
        else:
            stale = [p for p in folder.iterdir() if p.name not in named]
            stale += list(self.run_dir.glob(_LEGACY_TENSORS))
            self._swept = True
        self._global_file = index["global"]["file"]
        for path in stale:
            path.unlink(missing_ok=True)


_COLUMNS = ("cid", "rank", "num_examples", "round", "sha256", "tensors")


def _client_file(cid: int, round_number: int) -> str:
    return f"client-{cid}-{round_number:05d}.safetensors"


def client_entries(index: dict) -> list[dict]:
    """The index's clients as dicts: ``cid``, ``rank``, ``num_examples``, ``tensors`` (whether it keeps
    any), and for format 2 the ``round`` its file was written in (None: no file) and its ``sha256``."""
    clients = index["clients"]
    if index["format"] == 1:
        return [{**meta, "tensors": bool(meta["tensors"])} for meta in clients]
    return [dict(zip(_COLUMNS, row)) for row in zip(*(clients[c] for c in _COLUMNS))]


def save_keys(run_dir: Path, run: RunState) -> None:
    """Each party's noise key in its own 0600 file (written once; keys never change in a run)."""
    folder = Path(run_dir) / "keys"
    parties = [(f"client-{c.cid}", c.privacy.noise.seed) for c in run.clients if c.privacy is not None]
    if run.server_privacy is not None:
        parties.append(("server", run.server_privacy["seed"]))
    if not parties:
        return
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    for party, seed in parties:
        path = folder / f"{party}.key"
        if not path.exists():
            write_atomic(path, str(seed).encode(), mode=0o600)


# ------------------------------------------------------------------------------------------------ reading
def _read_key(run_dir: Path, party: str) -> int:
    path = Path(run_dir) / "keys" / f"{party}.key"
    if not path.exists():
        raise ValueError(f"{path} is missing; a private party cannot continue without its noise key")
    return int(path.read_text())


def read_index(run_dir: str | Path) -> dict:
    """The index of a run folder's last checkpoint, its format checked (its files are not read)."""
    run_dir = Path(run_dir)
    index_file = run_dir / INDEX
    if not index_file.exists():
        raise ValueError(f"{run_dir} has no {INDEX}; is it the folder of a `fedlora run` (which checkpoints "
                         "after every round)?")
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        raise ValueError(f"{index_file} is not JSON: the checkpoint index is damaged") from None
    if not isinstance(index, dict) or index.get("format") not in (1, FORMAT):
        got = index.get("format") if isinstance(index, dict) else None
        raise ValueError(f"{index_file} has format {got!r}, expected 1 or {FORMAT}")
    return index


def update_config(run_dir: str | Path, config: dict) -> None:
    """Puts ``config`` in the index of the last checkpoint (a resumed run's new total of rounds or moved
    inputs), so that a run stopped before its next checkpoint continues with it: the index is written as
    always (temporary file + rename), the files it names are untouched."""
    index = read_index(run_dir)
    if index["config"] != config:
        index["config"] = config
        write_atomic(Path(run_dir) / INDEX, json.dumps(index).encode())


def _load_checked(path: Path, sha256: str, index_file: Path) -> dict[str, Tensor]:
    if not path.exists() or _sha256(path) != sha256:
        raise ValueError(f"{path} is missing or does not match the SHA-256 in {index_file}")
    return load_file(str(path))


def read_run(run_dir: str | Path, *, device: torch.device | str = "cpu", keys: bool = False) -> RunState:
    """The state of a run folder's last checkpoint, every file checked against its SHA-256, tensors on
    ``device`` (the generator state stays on the CPU).

    With ``keys`` the private parties' noise keys are read from ``keys/`` and every client's privacy
    state is restored (what resuming needs); without, clients carry no privacy state (what building
    their models needs: export, evaluate).

    Raises:
        ValueError: one line: no checkpoint, another format, a missing or damaged file, a missing key.
    """
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    if index["format"] == 1:
        return _read_format_1(run_dir, index, device, keys)
    index_file = run_dir / INDEX
    folder = run_dir / FOLDER
    g = index["global"]
    tensors = _load_checked(folder / g["file"], g["sha256"], index_file)
    clients, files = [], {}
    for entry in client_entries(index):
        if entry["round"] is None:
            clients.append(ClientState(cid=int(entry["cid"]), rank=int(entry["rank"]),
                                       num_examples=int(entry["num_examples"])))
            continue
        path = folder / _client_file(entry["cid"], entry["round"])
        own = _load_checked(path, entry["sha256"], index_file)
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["meta"])
        own = {k: v.to(device) for k, v in own.items()}
        clients.append(_client(run_dir, meta, {n: own[n] for n in meta["tensors"]}, _unpack(meta["info"], own), keys))
        files[int(entry["cid"])] = {**entry, "meta": json.dumps(meta, sort_keys=True)}
    run = _run_state(run_dir, index, tensors, clients, device, keys)
    run.files = files
    return run


def _client(run_dir: Path, meta: dict, tensors: dict[str, Tensor], info: dict, keys: bool) -> ClientState:
    if not keys:
        meta = {k: v for k, v in meta.items() if k != "privacy"}
    seed = _read_key(run_dir, f"client-{meta['cid']}") if meta.get("privacy") else None
    client = restore_client({**meta, "info": {}}, tensors, seed=seed)
    client.info = info
    return client


def _run_state(run_dir: Path, index: dict, tensors: dict[str, Tensor], clients: list[ClientState],
               device, keys: bool) -> RunState:
    """The global part of a checkpoint (``tensors``: the global file's, on the CPU) around ``clients``."""
    rng = tensors.pop("rng/torch")
    tensors = {k: v.to(device) for k, v in tensors.items()}
    g = index["global"]
    state = GlobalState(tensors={n: tensors[f"global/{n}"] for n in g["tensors"]},
                        base={n: tensors[f"base/{n}"] for n in g["base"]},
                        info=_unpack(g["info"], tensors))
    server = index["server_privacy"]
    if server is not None:
        server = {"history": [(float(s), float(q), int(n)) for s, q, n in server["history"]],
                  "offset": int(server["offset"]), "seed": _read_key(run_dir, "server") if keys else None}
    ledger = [{d: {int(c): int(n) for c, n in r[d]} for d in r} for r in index["ledger"]]
    return RunState(int(index["rounds_done"]), index["config"], state, clients, server, ledger,
                    list(index["history"]), rng, nodes=index.get("nodes"))


def _read_format_1(run_dir: Path, index: dict, device, keys: bool) -> RunState:
    """A checkpoint written before per-client files: every tensor in one file beside the index."""
    tensors = _load_checked(run_dir / index["tensors_file"], index["sha256"], run_dir / INDEX)
    clients = []
    for meta in index["clients"]:
        cid = int(meta["cid"])
        own = {n: tensors[f"client{cid}/{n}"].to(device) for n in meta["tensors"]}
        info_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith(f"client{cid}-info/")}
        clients.append(_client(run_dir, meta, own, _unpack(meta["info"], info_tensors), keys))
    shared = {k: v for k, v in tensors.items() if k.startswith(("rng/", "global/", "base/", "info/"))}
    return _run_state(run_dir, index, shared, clients, device, keys)
