"""End-to-end benchmark of federated rounds on the main job's default, non-private and private.

Usage (from the repository root)::

    python benchmarks/bench_round.py                 # preset `default`, 3 rounds each, 2 threads
    python benchmarks/bench_round.py --rounds 2 --threads 1 --preset default
    python benchmarks/bench_round.py --quick         # tiny-bert on 120 BBC articles: a smoke run

Each round's seconds are split as the simulator measures them: local training (forward, backward and
optimizer steps of every sampled client, per-sample gradient hooks included), of which the DP step
(clip + noise: one ``dp_clip_noise`` per local step), the aggregation, and the evaluation. The table
shows medians over the rounds; the JSON keeps every round. Model loading and tokenising are outside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

fedlora_ext = harness.import_installed_fedlora()
from fedlora_ext.federated import preset  # noqa: E402
from fedlora_ext.federated.simulation import Simulation  # noqa: E402
from fedlora_ext.jobs import quiet_libraries  # noqa: E402

DEFAULT_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "round_cpu.json"
PARTS = ("seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval")


def measure(config, rounds: int) -> list[dict]:
    simulation = Simulation(config)
    rows = []
    for r in range(rounds):
        metrics = simulation.step(r)
        rows.append({k: metrics[k] for k in PARTS} | {"clients": len(metrics["clients"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny-bert on 120 articles, 2 rounds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    base = preset(args.preset)
    if args.quick:
        base = base.replace(model="tiny-bert", max_examples=120, num_clients=3, local_steps=2)
        args.rounds = min(args.rounds, 2)
    variants = {"non_private": base.replace(dp_epsilon=None, dp_noise_multiplier=None),
                "private": base if base.sample_dp else base.replace(dp_epsilon=8.0)}
    header = harness.machine_info(fedlora_ext, [args.threads])
    header.update(preset=args.preset, quick=args.quick, rounds=args.rounds, config=base.to_dict())
    print(f"{base.method} on {base.dataset} with {base.model}, {base.num_clients} clients x {base.participation:g}, "
          f"{base.local_steps} local steps of batch {base.batch_size} x {base.seq_len}; {args.threads} threads\n")
    print(f"{'variant':<12} {'round s':>8} {'train s':>8} {'(DP step)':>10} {'aggregate s':>12} {'eval s':>8}")
    results = {}
    for name, config in variants.items():
        torch.manual_seed(config.seed)
        rows = measure(config, args.rounds)
        med = {k: statistics.median(r[k] for r in rows) for k in PARTS}
        results[name] = {"median": med, "rounds": rows}
        print(f"{name:<12} {med['seconds']:>8.2f} {med['seconds_train']:>8.2f} {med['seconds_dp']:>10.3f} "
              f"{med['seconds_aggregate']:>12.4f} {med['seconds_eval']:>8.2f}")
    ratio = results["private"]["median"]["seconds_train"] / results["non_private"]["median"]["seconds_train"]
    print(f"\nprivate / non-private local training: {ratio:.2f}x")
    header["private_over_non_private_train"] = ratio
    path = Path(args.json or (DEFAULT_JSON.with_name("round_cpu_quick.json") if args.quick else DEFAULT_JSON))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results, "written": time.ctime(),
                                "loadavg": os.getloadavg()}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
