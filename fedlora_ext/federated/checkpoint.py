"""Checkpoints of a simulated run, one per round, from which ``fedlora run --resume`` continues.

A checkpoint is everything the next round reads: the global state (tensors, merged base, strategy
info such as FLoRA's pending stacks), every client's state (kept tensors, rank, info, privacy account
and noise offset), the server's DP-FedAvg account and offset, the byte ledger, the metrics so far and
torch's generator state. Tensors go to ``checkpoint-<round>.safetensors``, the rest to
``checkpoint.json``, which is written last (temporary file + rename) and names the tensor file and its
SHA-256: a crash at any moment leaves the previous checkpoint whole. Nothing is pickled.

The noise keys are not in the checkpoint: each client's key is in ``keys/client-<cid>.key`` (the
server's in ``keys/server.key``), written once, mode 0600 in a 0700 folder: the stand-in, on one
machine, for each party's own storage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora_ext.federated.client_state import client_meta, restore_client

if TYPE_CHECKING:
    from fedlora_ext.federated.simulation import Simulation

FORMAT = 1
INDEX = "checkpoint.json"


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


def _pack(value: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """JSON for nested dicts / lists / scalars; tensors go to ``tensors`` and leave their key behind.
    Dicts keep their key types (FLoRA's stacks are keyed by round numbers)."""
    if isinstance(value, Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _pack(v, tensors, prefix)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_pack(v, tensors, prefix) for v in value]}
    return {"value": value}


def unpack_info(packed: Any, tensors: dict[str, Tensor]) -> Any:
    if "tensor" in packed:
        return tensors[packed["tensor"]]
    if "dict" in packed:
        return {k: unpack_info(v, tensors) for k, v in packed["dict"]}
    if "list" in packed:
        return [unpack_info(v, tensors) for v in packed["list"]]
    return packed["value"]


def save_checkpoint(sim: Simulation, rounds_done: int, run_dir: Path) -> Path:
    """Checkpoints ``sim`` after ``rounds_done`` rounds into ``run_dir``; returns the index file."""
    run_dir = Path(run_dir)
    save_keys(sim, run_dir)
    tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    state = sim.state
    for name, t in state.tensors.items():
        tensors[f"global/{name}"] = t.detach().cpu().contiguous()
    for name, t in state.base.items():
        tensors[f"base/{name}"] = t.detach().cpu().contiguous()
    clients = []
    for client in sim.clients:
        for name, t in client.tensors.items():
            tensors[f"client{client.cid}/{name}"] = t.detach().cpu().contiguous()
        clients.append({**client_meta(client, secret=False), "tensors": sorted(client.tensors),
                        "info": _pack(client.info, tensors, f"client{client.cid}-info/")})
    server = sim.server.privacy
    index = {
        "format": FORMAT,
        "rounds_done": rounds_done,
        "config": sim.config.to_dict(),
        "global": {"tensors": list(state.tensors), "base": list(state.base), "info": _pack(state.info, tensors, "info/")},
        "clients": clients,
        "server_privacy": None if server is None else {"history": [list(h) for h in server.account.history],
                                                       "offset": server.noise.offset},
        "ledger": [{d: [[cid, n] for cid, n in r[d].items()] for d in r} for r in sim.ledger.rounds],
        "history": sim.history,
    }
    tensor_file = run_dir / f"checkpoint-{rounds_done:05d}.safetensors"
    temporary = tensor_file.with_name(f".{tensor_file.name}.tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, tensor_file)
    index["tensors_file"], index["sha256"] = tensor_file.name, _sha256(tensor_file)
    write_atomic(run_dir / INDEX, json.dumps(index).encode())
    for old in run_dir.glob("checkpoint-*.safetensors"):  # only once the new index names the new file
        if old != tensor_file:
            old.unlink()
    return run_dir / INDEX


def save_keys(sim: Simulation, run_dir: Path) -> None:
    """Each party's noise key in its own 0600 file (written once; keys never change in a run)."""
    folder = Path(run_dir) / "keys"
    parties = [(f"client-{c.cid}", c.privacy.noise.seed) for c in sim.clients if c.privacy is not None]
    if sim.server.privacy is not None:
        parties.append(("server", sim.server.privacy.noise.seed))
    if not parties:
        return
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    for party, seed in parties:
        path = folder / f"{party}.key"
        if not path.exists():
            write_atomic(path, str(seed).encode(), mode=0o600)


def _read_key(run_dir: Path, party: str) -> int:
    path = Path(run_dir) / "keys" / f"{party}.key"
    if not path.exists():
        raise ValueError(f"resume: {path} is missing; a private party cannot continue without its noise key")
    return int(path.read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(run_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The index and tensors of a run folder's last checkpoint, checked (format, file, SHA-256)."""
    run_dir = Path(run_dir)
    index_file = run_dir / INDEX
    if not index_file.exists():
        raise ValueError(f"resume: {run_dir} has no {INDEX}; is it the folder of a `fedlora run` (which checkpoints "
                         "after every round)?")
    index = json.loads(index_file.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"resume: {index_file} has format {index.get('format')!r}, expected {FORMAT}")
    tensor_file = run_dir / index["tensors_file"]
    if not tensor_file.exists() or _sha256(tensor_file) != index["sha256"]:
        raise ValueError(f"resume: {tensor_file} is missing or does not match the SHA-256 in {index_file}")
    return index, load_file(str(tensor_file))


def restore(sim: Simulation, index: dict, tensors: dict[str, Tensor], run_dir: Path) -> int:
    """Puts the checkpointed run into a freshly built ``sim`` (same config); returns the rounds done.
    The checkpoint's CPU tensors go to the run's device, where the uninterrupted run kept them."""
    from fedlora_ext.core.state import GlobalState
    from fedlora_ext.federated.comm import CommLedger

    tensors = {k: v if k.startswith("rng/") else v.to(sim.bench.device) for k, v in tensors.items()}
    g = index["global"]
    sim.state = GlobalState(tensors={n: tensors[f"global/{n}"] for n in g["tensors"]},
                            base={n: tensors[f"base/{n}"].clone() for n in g["base"]},
                            info=unpack_info(g["info"], tensors))
    clients = []
    for meta in index["clients"]:
        cid = int(meta["cid"])
        seed = _read_key(run_dir, f"client-{cid}") if meta.get("privacy") else None
        client = restore_client({**meta, "info": {}}, {n: tensors[f"client{cid}/{n}"] for n in meta["tensors"]}, seed=seed)
        client.info = unpack_info(meta["info"], tensors)
        fresh = next((c for c in sim.clients if c.cid == cid), None)
        if client.privacy is not None and client.privacy.account.target_epsilon is None and fresh is not None \
                and fresh.privacy is not None:  # a checkpoint from before the budget guard: the config's target
            client.privacy.account.target_epsilon = fresh.privacy.account.target_epsilon
        clients.append(client)
    if [c.cid for c in clients] != [c.cid for c in sim.clients]:
        raise ValueError("resume: the checkpoint's clients do not match the run's partition")
    sim.clients = clients
    server = index["server_privacy"]
    if server is not None:
        privacy = sim.server.privacy
        privacy.account.history = [(float(s), float(q), int(n)) for s, q, n in server["history"]]
        privacy.noise.seed, privacy.noise.offset = _read_key(run_dir, "server"), int(server["offset"])
    sim.server.ledger = CommLedger(rounds=[{d: {int(c): int(n) for c, n in r[d]} for d in r} for r in index["ledger"]])
    sim.history = list(index["history"])
    if sim.server.privacy_ledger is not None:
        sim.server.privacy_ledger.replay(sim.history, sim.clients)
    torch.set_rng_state(tensors["rng/torch"])
    return int(index["rounds_done"])

