"""The main job's sweep (issue 23): how its final accuracy is distributed over noise keys, per variant.

Each variant is the default preset plus ``--set`` overrides, run as a newcomer runs it (``fedlora run``
in a subprocess, its own run folder). ``--seeds 1 2 3`` fixes the clients' noise keys
(``dp_noise_seed``), so every variant sees the same keys and their differences are the variant's, not
the draw's; ``--fresh N`` runs N times with fresh keys from the OS, which is what a newcomer gets.
The table gives, per variant: median / min / max final test accuracy (whole test split), the best
round's score on the fixed subset, the job time and epsilon. ``--jobs 2 --threads 1`` runs two jobs at
once with one torch thread each (more throughput on 2 cores; job times are then not an idle machine's).

    python benchmarks/sweep_main_job.py --variants default sgd --seeds 1 2 3 4 5
    python benchmarks/sweep_main_job.py --variants default --fresh 10 --json benchmarks/results/main_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Each entry: --set overrides of the default preset. "default" is the preset as shipped.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    # the README's old Flower recipe (3 SuperNodes; a deployment with the same seeds ends with the
    # simulator's adapter): a round reads 3 x 128 examples and averages 3 updates' noise
    "three_clients": ["num_clients=3"],
    # the preset before issue 23: AdamW at a constant lr 0.09, whose first steps are sign steps of size lr
    # in every coordinate, noise or not
    "issue22": ["optimizer=adamw", "lr=0.09", "lr_schedule=constant", "rank=2", "rounds=5", "local_steps=2",
                "batch_size=64"],
    "constant_lr045": ["lr_schedule=constant", "lr=0.045"],
    "cosine_lr09": ["lr_schedule=cosine", "lr=0.09"],
    "cosine_lr09_r1": ["lr_schedule=cosine", "lr=0.09", "rank=1"],
    "cosine_lr135": ["lr_schedule=cosine", "lr=0.135"],
    # the same examples per round in one step of twice the batch: at a fixed epsilon the per-step noise
    # on the mean gradient falls (sigma / batch: 1.08 / 64 -> about 1.2 / 128 at n = 178), fewer steps
    "cosine_1step_b128_lr18": ["lr_schedule=cosine", "lr=0.18", "local_steps=1", "batch_size=128"],
}


def run_one(variant: str, seed: int | None, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        out = Path(tmp) / "run"
        sets = [*VARIANTS[variant]] + ([f"dp_noise_seed={seed}"] if seed is not None else [])
        cmd = ["fedlora", "run", "--quiet", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"variant": variant, "seed": seed, "error": done.stderr.strip().splitlines()[-1:]}
        summary = json.loads((out / "summary.json").read_text())
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [r.get("test_accuracy") for r in rounds if "round" in r]
    return {"variant": variant, "seed": seed, "final": summary["final"], "best": summary["best"],
            "curve": curve, "seconds": summary["seconds_total"], "epsilon": summary["epsilon"]}


def table(results: list[dict]) -> str:
    rows = ["| variant | runs | final median | min | max | best-round median | job s median | epsilon |",
            "|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in results):
        ok = [r for r in results if r["variant"] == variant and "final" in r]
        failed = sum(1 for r in results if r["variant"] == variant and "error" in r)
        if not ok:
            rows.append(f"| {variant} | 0 ({failed} failed) | | | | | | |")
            continue
        finals = [r["final"] for r in ok]
        rows.append(f"| {variant} | {len(ok)}{f' ({failed} failed)' if failed else ''} | "
                    f"{statistics.median(finals):.3f} | {min(finals):.3f} | {max(finals):.3f} | "
                    f"{statistics.median(r['best'] for r in ok):.3f} | "
                    f"{statistics.median(r['seconds'] for r in ok):.0f} | {max(r['epsilon'] for r in ok):.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--seeds", nargs="+", type=int, help="fixed dp_noise_seed values (same for every variant)")
    keys.add_argument("--fresh", type=int, help="this many runs with fresh noise keys (the default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/main_job_sweep.json"))
    args = parser.parse_args(argv)
    seeds = args.seeds or [None] * (args.fresh or 5)
    work = [(v, s) for v in args.variants for s in seeds]
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda vs: run_one(*vs, args.threads), work):
            results.append(result)
            shown = result.get("error") or f"final {result['final']:.3f} best {result['best']:.3f} " \
                                             f"{result['seconds']:.0f} s curve {result['curve']}"
            print(f"{result['variant']} seed={result['seed']}: {shown}", flush=True)
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": _cpu(), "jobs": args.jobs, "threads": args.threads,
                                     "results": results}, indent=1))
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
