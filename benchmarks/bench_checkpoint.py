"""Bytes and seconds of one round's checkpoint as the population grows, with a fixed number sampled.

A FedSA-LoRA run's state is built in code (no training): a shared A and head in the global state, and
per client its own B for q and v in every layer. Each round 10 sampled clients get new B tensors (what
local training does) and the run is checkpointed with ``CheckpointWriter``, told which clients were
sampled, as ``fedlora run`` does after every round. Reported per population: the first save (every client with state is written: what
every round cost before per-client files) and the median later round (the global state plus the
clients that changed), with the index's own size. The per-round bytes and seconds should not grow with
the population; the index grows by one short entry per client.

    python benchmarks/bench_checkpoint.py                 # 30, 300, 3000 clients, 10 sampled
    python benchmarks/bench_checkpoint.py --populations 30 300 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

fedlora_ext = harness.import_installed_fedlora()
from fedlora_ext.core.state import ClientState, GlobalState  # noqa: E402
from fedlora_ext.federated.checkpoint import FOLDER, INDEX, CheckpointWriter, RunState  # noqa: E402

DEFAULT_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "checkpoint_cpu.json"
MIB = 2**20


def names(layers: int, kind: str) -> list[str]:
    return [f"model.layers.{i}.self_attn.{m}_proj.lora_{kind}.weight" for i in range(layers) for m in ("q", "v")]


def fedsa_run(population: int, hidden: int, layers: int, rank: int, seed: int) -> RunState:
    generator = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(rank, hidden, generator=generator) for n in names(layers, "A")}
    shared["score.weight"] = torch.randn(4, hidden, generator=generator)
    clients = [ClientState(cid=c, rank=rank, num_examples=100,
                           tensors={n: torch.randn(hidden, rank, generator=generator) for n in names(layers, "B")},
                           info={"last_round": 0})
               for c in range(population)]
    return RunState(0, {"method": "fedsa_lora", "num_clients": population}, GlobalState(tensors=shared), clients)


def train_round(run: RunState, sampled: int, round_number: int, generator: torch.Generator) -> list[int]:
    """What a round changes: the sampled clients' B (new tensors) and last round, the shared A; returns
    the sampled ids (what the simulator tells the writer)."""
    chosen = torch.randperm(len(run.clients), generator=generator)[:sampled].tolist()
    for cid in chosen:
        client = run.clients[cid]
        client.tensors = {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in client.tensors.items()}
        client.info = {"last_round": round_number}
    run.state = GlobalState(tensors={n: t + 0.01 for n, t in run.state.tensors.items()})
    run.rounds_done = round_number
    run.history.append({"round": round_number})
    return chosen


def folder_bytes(run_dir: Path) -> dict[str, int]:
    folder = run_dir / FOLDER
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


def measure(population: int, args, root: Path) -> dict:
    run_dir = root / f"n{population}"
    run_dir.mkdir()
    run = fedsa_run(population, args.hidden, args.layers, args.rank, seed=population)
    writer = CheckpointWriter(run_dir)
    generator = torch.Generator().manual_seed(1)
    rounds = []
    for round_number in range(1, args.rounds + 1):
        changed = None  # the first save looks at every client
        if round_number > 1:
            changed = train_round(run, args.sampled, round_number, generator)
        else:
            run.rounds_done = 1
        before = folder_bytes(run_dir)
        started = time.perf_counter()
        writer.save(run, changed=changed)
        seconds = time.perf_counter() - started
        after = folder_bytes(run_dir)
        index = (run_dir / INDEX).stat().st_size
        new = {n: s for n, s in after.items() if n not in before}
        rounds.append({"round": round_number, "seconds": seconds, "files_written": len(new),
                       "bytes_written": sum(new.values()) + index, "index_bytes": index,
                       "checkpoint_bytes": sum(after.values()) + index})
    shutil.rmtree(run_dir)
    later = rounds[1:]
    return {"population": population, "sampled": args.sampled, "client_bytes": 2 * args.layers * args.hidden * args.rank * 4,
            "first": rounds[0],
            "median": {k: statistics.median(r[k] for r in later)
                       for k in ("seconds", "bytes_written", "files_written", "index_bytes")},
            "rounds": rounds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[30, 300, 3000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6, help="saves per population (the first writes everything)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = harness.machine_info(fedlora_ext, [1])
    header.update({k: getattr(args, k) for k in ("populations", "sampled", "rounds", "hidden", "layers", "rank")})
    per_client = 2 * args.layers * args.hidden * args.rank * 4
    print(f"FedSA-LoRA state: B of {args.layers} layers x (q, v), hidden {args.hidden}, rank {args.rank}: "
          f"{per_client / MIB:.2f} MiB per client; {args.sampled} clients sampled per round; "
          f"{args.rounds - 1} later rounds (median); CPU: {header['cpu_model']}")
    print(f"{'clients':>8} {'first save MiB':>15} {'first s':>8} {'round MiB':>10} {'round s':>8} {'files':>6} "
          f"{'index KiB':>10}")
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for population in args.populations:
            r = measure(population, args, Path(root))
            m = r["median"]
            print(f"{population:>8} {r['first']['bytes_written'] / MIB:>15.1f} {r['first']['seconds']:>8.2f} "
                  f"{m['bytes_written'] / MIB:>10.2f} {m['seconds']:>8.3f} {m['files_written']:>6.0f} "
                  f"{m['index_bytes'] / 1024:>10.1f}")
            results.append(r)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results, "loadavg": os.getloadavg()}, indent=2,
                               default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
