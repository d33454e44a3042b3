"""Soak test: a long run with failing clients, killed and resumed, against the same run uninterrupted.

    python benchmarks/soak.py                   # 200 rounds, 30% failures, SIGKILL + resume every 50
    python benchmarks/soak.py --rounds 40 --every 10   # a short version

1. The uninterrupted run, in this process: the resident memory after every round (the run must not
   grow: its slope over the second half is reported, and the check is that the last round's RSS is
   within ``--rss-slack`` MiB of the RSS at 25% of the rounds).
2. The same run as `fedlora run` processes: each one is killed with SIGKILL once its checkpoint
   reaches the next multiple of ``--every`` rounds, and `fedlora run --resume` continues it.
3. The final adapters must be bitwise equal and the metrics (times aside) identical.

Prints a table and writes JSON (``--json``): rounds, failures injected, resumes, mismatches (must be 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMES = {"seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval"}


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flags(args) -> list[str]:
    return ["--method", args.method, "--model", "tiny-bert", "--dataset", "synthetic", "--clients", str(args.clients),
            "--rounds", str(args.rounds), "--local-steps", "1", "--participation", "0.5", "--epsilon", "8",
            "--set", f"client_failure_rate={args.failure_rate}", "--set", "min_clients=2", "--set", "dp_noise_seed=1",
            "--set", "num_examples=400", "--set", "seq_len=16", "--set", "batch_size=16", "--set", "rank=4", "--quiet"]


def uninterrupted(args, out: Path) -> list[float]:
    from fedlora_ext.app.cli import _config, build_parser
    from fedlora_ext.federated.simulation import Simulation

    logging.getLogger("fedlora_ext").setLevel(logging.ERROR)  # a warning per injected failure otherwise
    config = _config(build_parser().parse_args(["run", *flags(args), "--out", str(out)]))
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    memory: list[float] = []
    sim.run(progress=False, on_round=lambda metrics: memory.append(rss_mib()))
    return memory


def killed_and_resumed(args, out: Path) -> int:
    """Runs the job in processes killed every ``args.every`` rounds; returns the resumes done."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "fedlora_ext", "run"]
    command, resumes = [*base, *flags(args), "--out", str(out)], 0
    for stop in range(args.every, args.rounds, args.every):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        index = out / "checkpoint.json"
        while process.poll() is None:
            if index.exists() and json.loads(index.read_text())["rounds_done"] >= stop:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait()
        if process.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run ended before round {stop} (code {process.returncode}): "
                               f"{process.stderr.read().decode()[-2000:]}")
        command, resumes = [*base, "--resume", str(out), "--quiet"], resumes + 1
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resumes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="kill and resume every this many rounds")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--method", default="fedit")
    parser.add_argument("--rss-slack", type=float, default=64.0, help="MiB the RSS may grow from 25%% to the end")
    parser.add_argument("--json", default="soak.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        whole, cut = Path(tmp) / "whole", Path(tmp) / "cut"
        started = time.perf_counter()
        memory = uninterrupted(args, whole)
        seconds_whole = time.perf_counter() - started
        started = time.perf_counter()
        resumes = killed_and_resumed(args, cut)
        seconds_cut = time.perf_counter() - started
        a, b = load_file(str(whole / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
        tensor_mismatches = sorted(set(a) ^ set(b)) + [n for n in set(a) & set(b) if not torch.equal(a[n], b[n])]
        history = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
        resumed = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
        metric_mismatches = sum({k: v for k, v in x.items() if k not in TIMES} != {k: v for k, v in y.items() if k not in TIMES}
                                for x, y in zip(history, resumed)) + abs(len(history) - len(resumed))

    quarter = memory[len(memory) // 4]
    half = memory[len(memory) // 2:]
    slope = (half[-1] - half[0]) / max(len(half) - 1, 1)
    result = {
        "rounds": args.rounds, "clients": args.clients, "failure_rate": args.failure_rate, "method": args.method,
        "failures_injected": sum(len(m.get("failed", {})) for m in history),
        "rounds_skipped": sum("skipped" in m for m in history),
        "resumes": resumes, "adapter_mismatches": len(tensor_mismatches), "metric_mismatches": metric_mismatches,
        "rss_mib_first": memory[0], "rss_mib_quarter": quarter, "rss_mib_last": memory[-1],
        "rss_mib_per_round_second_half": slope, "memory_flat": memory[-1] - quarter <= args.rss_slack,
        "seconds_uninterrupted": seconds_whole, "seconds_killed_and_resumed": seconds_cut,
    }
    width = max(map(len, result))
    print(f"soak: {args.rounds} rounds of {args.method} on tiny-bert, {args.clients} clients, "
          f"{args.failure_rate:.0%} failures, SIGKILL + resume every {args.every} rounds")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value:.3f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    Path(args.json).write_text(json.dumps(result, indent=2))
    ok = not tensor_mismatches and not metric_mismatches and result["memory_flat"]
    print("soak:", "PASS" if ok else "FAIL", f"(JSON: {args.json})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
