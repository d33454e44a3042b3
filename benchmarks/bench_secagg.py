"""What secure aggregation (SecAgg+) costs on a real Flower deployment: seconds and bytes per round.

Usage (from the repository root)::

    python benchmarks/bench_secagg.py                       # FFA-LoRA on MiniLM, 5 and 10 SuperNodes
    python benchmarks/bench_secagg.py --nodes 5 --rounds 2  # one deployment size
    python benchmarks/bench_secagg.py --quick               # tiny-bert on synthetic data, 3 nodes: a smoke run
    python benchmarks/bench_secagg.py --masking-only        # only a node's masking work per share count

Each case starts its own SuperLink and ``--nodes`` SuperNodes on 127.0.0.1 (python_tests/deploytools.py,
the deployment tests' machinery), runs ``flwr run apps/fedlora`` with the main job's preset (FFA-LoRA
with DP-SGD on the packaged MiniLM and BBC News, ``num-clients`` = the nodes, every node every round) for
``--rounds`` rounds, and reads the run folder's metrics.jsonl: per round, its seconds (the training step:
for a secure round all four SecAgg+ stages, the local training inside the third) and the bytes each
node uploaded. Plain Flower runs once per size; SecAgg+ once per share count of ``--shares`` (each node
shares keys with a ring of that many nodes, itself included; "all" = every node): the masking work of a
node grows with its shares (one pairwise mask per neighbour, each a pseudo-random vector as long as
the update), and the server's unmasking with the shares of the nodes that dropped.

Flower starts a fresh ClientApp process for every message, so a SecAgg+ round (four messages per
node) also pays three more process starts per node than a plain one (one message): the table shows
both, and ``train_s`` (the node-side seconds the server saw for the training stage) separately.
First it prints a node's masking work alone (:func:`masking_costs`), per update size and share count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python_tests"))

from deploytools import Deployment  # noqa: E402  (the deployment tests' SuperLink + SuperNodes)
from harness import machine_info, import_installed_fedlora  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "secagg.json"


def run_config(out: Path, nodes: int, rounds: int, quick: bool, shares: int | None) -> dict:
    config = {"preset": "default", "num-clients": nodes, "rounds": rounds, "participation": 1.0,
              "eval-examples": 32, "dp-noise-seed": 7, "out-dir": str(out), "node-timeout": 300.0,
              "round-timeout": 1200.0}
    if quick:
        config.update({"model": "tiny-bert", "dataset": "synthetic", "num-examples": 96, "batch-size": 16,
                       "seq-len": 16, "rank": 4, "max-examples": "none"})
    if shares is not None:
        config.update({"secure-aggregation": True, "secagg-shares": shares,
                       "secagg-threshold": max(2, shares // 2 + 1)})
    return config


def one_case(root: Path, nodes: int, rounds: int, quick: bool, shares: int | None) -> dict:
    """One deployment, one run; the per-round rows of its metrics.jsonl."""
    deployment = Deployment(root)
    try:
        deployment.start([f"partition-id={k} num-partitions={nodes}" for k in range(nodes)])
        for k in range(nodes):
            deployment.wait_registered(f"supernode{k}")
        out = root / "run"
        started = time.perf_counter()
        result = deployment.run(run_config(out, nodes, rounds, quick, shares), timeout=3600.0)
        wall = time.perf_counter() - started
        summary_file = out / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if result.returncode != 0 or summary.get("status") != "completed":
            raise SystemExit(f"bench_secagg: the run with {nodes} nodes, shares {shares} did not complete: "
                             f"{summary.get('error') or result.stderr[-2000:]}\n{deployment.logs()}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        deployment.stop()
    return {"nodes": nodes, "secure": shares is not None, "shares": shares, "wall_s": wall,
            "rounds": [{k: row.get(k) for k in ("round", "seconds", "seconds_train", "seconds_aggregate",
                                                  "bytes_up", "bytes_down", "test_accuracy")} for row in rows]}


def summarise(case: dict) -> dict:
    """Medians over the rounds (the first round included: every round starts fresh ClientApp processes)."""
    def median(key):
        values = [r[key] for r in case["rounds"] if r.get(key) is not None]
        return statistics.median(values) if values else None

    up = median("bytes_up")
    return {"nodes": case["nodes"], "mode": f"SecAgg+ {case['shares']} shares" if case["secure"] else "plain",
            "round_s": median("seconds"), "train_s": median("seconds_train"),
            "up_per_node_kb": up / case["nodes"] / 1024 if up is not None else None,
            "down_kb": (median("bytes_down") or 0) / 1024}


def masking_costs(sizes: list[int], share_counts: list[int], repeats: int = 5) -> list[dict]:
    """A node's masking work per round, measured in process with Flower's own primitives: one key
    agreement and one pairwise mask per neighbour (shares - 1) plus its private mask, each mask a
    pseudo-random vector as long as the update (median of ``repeats``). The server's unmasking does the
    same per node that delivered (its private mask) and, per node that dropped, one key agreement and
    mask per neighbour of it."""
    import os

    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    rows = []
    for size in sizes:
        for shares in share_counts:
            keys = [generate_key_pairs() for _ in range(shares)]
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                pseudo_rand_gen(os.urandom(32), 2**32, [(size,)])  # the private mask
                for _, public in keys[1:]:
                    pseudo_rand_gen(generate_shared_key(keys[0][0], public), 2**32, [(size,)])
                times.append(time.perf_counter() - started)
            rows.append({"values": size, "shares": shares, "node_masking_ms": statistics.median(times) * 1e3})
    return rows


def print_masking(rows: list[dict]) -> None:
    print(f"\n{'values':>10} {'shares':>6} {'node masking ms':>16}")
    for r in rows:
        print(f"{r['values']:>10} {r['shares']:>6} {r['node_masking_ms']:>16.1f}")


def print_table(rows: list[dict]) -> None:
    print(f"{'nodes':>5}  {'mode':<22} {'s/round':>8} {'x plain':>8} {'train s':>8} {'up KB/node':>11} {'x plain':>8}")
    plain = {r["nodes"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        base = plain.get(r["nodes"])
        time_ratio = r["round_s"] / base["round_s"] if base and base["round_s"] else None
        up_ratio = r["up_per_node_kb"] / base["up_per_node_kb"] if base and base["up_per_node_kb"] else None
        print(f"{r['nodes']:>5}  {r['mode']:<22} {r['round_s']:>8.1f} {_fmt(time_ratio):>8} {r['train_s']:>8.1f} "
              f"{r['up_per_node_kb']:>11.1f} {_fmt(up_ratio):>8}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--shares", nargs="+", default=["3", "all"],
                        help="SecAgg+ share counts to run per size (an odd number, or 'all')")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny-bert on synthetic data, 3 nodes, 1 round")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--masking-only", action="store_true",
                        help="only the in-process masking costs (no deployment)")
    args = parser.parse_args(argv)
    fedlora_ext = import_installed_fedlora()
    # the main job's FFA-LoRA update (11,136 values), and larger adapters
    masking = masking_costs([11_136, 1_000_000, 10_000_000], [3, 5, 9, 17, 33] if not args.quick else [3, 5])
    print_masking(masking)
    if args.masking_only:
        return 0
    sizes, rounds = ([3], 1) if args.quick else (args.nodes, args.rounds)
    cases = []
    for nodes in sizes:
        share_counts = sorted({nodes if s == "all" else min(int(s), nodes) for s in args.shares})
        for shares in [None, *share_counts]:
            with tempfile.TemporaryDirectory(prefix="bench_secagg_") as folder:
                case = one_case(Path(folder), nodes, rounds, args.quick, shares)
            cases.append(case)
            print(f"  {nodes} nodes, {'plain' if shares is None else f'{shares} shares'}: {case['wall_s']:.0f} s",
                  file=sys.stderr)
    rows = [summarise(c) for c in cases]
    print_table(rows)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(fedlora_ext, [1]), "quick": args.quick, "rounds": rounds,
                                "table": rows, "cases": cases,
                                "masking": masking}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
