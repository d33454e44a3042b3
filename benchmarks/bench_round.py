"""End-to-end benchmark of federated rounds, non-private and private: the main job's preset, and SFT.

Usage (from the repository root)::

    python benchmarks/bench_round.py                 # both cases, 3 rounds per variant, 2 threads
    python benchmarks/bench_round.py --rounds 2 --threads 1 --preset default
    python benchmarks/bench_round.py --cases sft     # only the SFT case ('sft/private': one variant)
    python benchmarks/bench_round.py --quick         # small versions of both cases: a smoke run
    python benchmarks/bench_round.py --wait-idle 30  # on a shared machine: wait for a quiet second first
    python benchmarks/bench_round.py --list          # the selected case/variant names

Cases (each run without and with DP-SGD, the variants ``non_private`` and ``private``):

* ``preset``: a round of ``--preset`` (default: the main job, MiniLM on BBC News topics); private at
  the preset's own DP setting, or epsilon 8 if it has none. ``--quick``: tiny-bert, 120 articles.
* ``sft``: a round of instruction tuning (``task="sft"``, FedIT) of the tiny Llama (the packaged MiniLM
  tokenizer, vocab 30,522) on BBC News as instructions ("Which topic is this article about? ..." ->
  the topic): 400 examples, seq_len 128, 4 clients, 2 local steps of batch 8, 32 evaluation examples;
  private: noise multiplier 1.0 with a fixed noise seed. ``--quick``: 80 examples, seq_len 64.
  It also reports tokens trained per second: the non-padding tokens (attention-mask sum) of every
  batch the clients' local steps trained on, counted exactly by wrapping the ``summed_loss`` the
  client's SFT steps call once per step, over the round's local training seconds.

Each round's seconds are split as the simulator measures them: local training (forward, backward and
optimizer steps of every sampled client, per-sample gradient hooks included), of which the DP step
(clip + noise: one ``dp_clip_noise`` per local step), the aggregation, and the evaluation. The table
shows medians over the rounds; the JSON keeps every round. Model loading and tokenising are outside.
"""

from __future__ import annotations

import argparse
import fnmatch
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
from fedlora_ext.core.config import FedConfig  # noqa: E402
from fedlora_ext.federated import client as client_module  # noqa: E402
from fedlora_ext.federated import preset  # noqa: E402
from fedlora_ext.federated.simulation import Simulation  # noqa: E402
from fedlora_ext.app.jobs import quiet_libraries  # noqa: E402

DEFAULT_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "round_cpu.json"
PARTS = ("seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval")
CASES = ("preset", "sft")
VARIANTS = ("non_private", "private")


class TokenCounter:
    """Counts what the clients' local steps train on: non-padding tokens (the ``attention_mask`` sum),
    examples and steps of every batch passed to ``summed_loss``.

    Both SFT training paths of ``LocalTrainer`` (non-private: each example's mean over its response
    tokens; DP-SGD: the sum of per-sample losses) call ``fedlora_ext.federated.client.summed_loss`` once
    per local step with the step's batch; the evaluation does not. Inside the ``with`` block that name
    is wrapped; it is restored on exit. (A classification round without DP does not call it: the counter
    then stays at 0 and the caller falls back to an estimate.) The count adds one ``mask.sum()`` per step
    to the timed training, microseconds against a step of ~0.1-1 s."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = self.examples = self.steps = 0

    def __enter__(self):  # -> the counter
        self._original = original = client_module.summed_loss

        def counting_summed_loss(model, batch):
            mask = batch["attention_mask"]
            self.tokens += int(mask.sum())
            self.examples += int(mask.shape[0])
            self.steps += 1
            return original(model, batch)

        client_module.summed_loss = counting_summed_loss
        return self

    def __exit__(self, *exc) -> None:
        client_module.summed_loss = self._original


def case_configs(name: str, args) -> dict[str, FedConfig]:
    """The ``non_private`` and ``private`` configurations of a case."""
    if name == "preset":
        base = preset(args.preset)
        if args.quick:
            base = base.replace(model="tiny-bert", max_examples=120, num_clients=3, local_steps=2)
        return {"non_private": base.replace(dp_epsilon=None, dp_noise_multiplier=None),
                "private": base if base.sample_dp else base.replace(dp_epsilon=8.0)}
    if name == "sft":
        size = {"max_examples": 80, "seq_len": 64} if args.quick else {"max_examples": 400, "seq_len": 128}
        # rounds: one more than measured, so that no measured round is the run's last (which evaluates the
        # whole test split instead of the eval_examples subset)
        base = FedConfig(method="fedit", task="sft", model="tiny-llama", dataset="bbc_news", num_clients=4,
                         participation=1.0, local_steps=2, batch_size=8, eval_examples=32, seed=0,
                         rounds=args.rounds + 1, **size)
        return {"non_private": base,
                "private": base.replace(dp_noise_multiplier=1.0, dp_noise_seed=0, dp_max_grad_norm=1.0)}
    raise ValueError(f"unknown case {name!r}; expected one of {', '.join(CASES)}")


def select(patterns: list[str] | None) -> list[tuple[str, str]]:
    """(case, variant) pairs matching ``patterns`` (case names, or ``case/variant`` globs), in order."""
    pairs = [(c, v) for c in CASES for v in VARIANTS]
    if not patterns:
        return pairs
    return [(c, v) for c, v in pairs if any(p == c or fnmatch.fnmatchcase(f"{c}/{v}", p)
                                            or fnmatch.fnmatchcase(c, p) for p in patterns)]


def estimated_tokens(config: FedConfig, simulation: Simulation, clients: int) -> float:
    """``clients x local_steps x batch_size x`` the mean attention-mask sum of the training data: what a
    round trains on when every batch is full (DP-SGD: Poisson batches of that expected size)."""
    return clients * config.local_steps * config.batch_size * mean_mask_sum(simulation.train_data)


def mean_mask_sum(data) -> float:
    """The mean number of non-padding tokens per example of a tokenised split."""
    return float(torch.as_tensor(data[:]["attention_mask"]).sum(1).float().mean())


def measure(config: FedConfig, rounds: int, count_tokens: bool = False) -> tuple[list[dict], dict]:
    """Every round's seconds (and, with ``count_tokens``, tokens trained), and facts about the data."""
    simulation = Simulation(config)
    facts = {"train_examples": len(simulation.train_data), "test_examples": len(simulation.test_data),
             "client_examples": [c.num_examples for c in simulation.clients]}
    if count_tokens:
        facts["mean_attention_mask_sum"] = mean_mask_sum(simulation.train_data)
    rows = []
    counter = TokenCounter()
    for r in range(rounds):
        counter.reset()
        with counter:
            metrics = simulation.step(r)
        row = {k: metrics[k] for k in PARTS} | {"clients": len(metrics["clients"]),
                                                 "test_examples": metrics.get("test_examples")}
        if count_tokens:
            estimate = estimated_tokens(config, simulation, row["clients"])
            measured = counter.steps > 0
            tokens = counter.tokens if measured else estimate
            row.update(tokens=tokens, tokens_source="measured" if measured else "estimate",
                       tokens_estimate=estimate, examples=counter.examples, steps=counter.steps,
                       tokens_per_s=tokens / row["seconds_train"] if row["seconds_train"] > 0 else None)
        rows.append(row)
    return rows, facts


def describe(name: str, config: FedConfig, threads: int) -> str:
    what = (f"SFT (instructions) with {config.method}" if config.task == "sft" else config.method)
    return (f"[{name}] {what} on {config.dataset} with {config.model}, {config.num_clients} clients x "
            f"{config.participation:g}, {config.local_steps} local steps of batch {config.batch_size} x "
            f"{config.seq_len}, max_examples {config.max_examples}, eval_examples {config.eval_examples}; "
            f"{threads} threads")


def dp_label(config: FedConfig) -> str:
    if not config.sample_dp:
        return "-"
    if config.dp_epsilon is not None:
        return f"eps {config.dp_epsilon:g}"
    return f"sigma {config.dp_noise_multiplier:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="the preset of the `preset` case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", metavar="PATTERN",
                        help=f"cases ({', '.join(CASES)}) or case/variant globs, e.g. sft 'preset/private'")
    parser.add_argument("--quick", action="store_true",
                        help="small versions (preset: tiny-bert on 120 articles; sft: 80 examples, seq_len 64), "
                             "2 rounds")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each variant, wait up to S seconds for other processes to use < 0.2 cores")
    parser.add_argument("--list", action="store_true", help="print the selected case/variant names and exit")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    selected = select(args.cases)
    if args.list or not selected:
        for case, variant in selected:
            print(f"{case}/{variant}")
        if not selected:
            print(f"no case matches {args.cases}; cases: {', '.join(f'{c}/{v}' for c in CASES for v in VARIANTS)}",
                  file=sys.stderr)
        return 0 if selected else 1
    torch.set_num_threads(args.threads)
    quiet_libraries()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    header = harness.machine_info(fedlora_ext, [args.threads])
    header.update(preset=args.preset, quick=args.quick, rounds=args.rounds, cases=[f"{c}/{v}" for c, v in selected])
    columns = (f"{'case/variant':<20} {'DP':>9} {'round s':>8} {'train s':>8} {'(DP step)':>10} {'aggregate s':>12} "
               f"{'eval s':>8} {'tokens':>8} {'tok/s':>8} {'oth':>4}")
    results: dict[str, dict] = {}
    for case in CASES:
        variants = [v for c, v in selected if c == case]
        if not variants:
            continue
        configs = case_configs(case, args)
        sft = configs["non_private"].task == "sft"
        print(describe(case, configs["non_private"], args.threads))
        if sft:
            print("tokens: non-padding tokens the clients' local steps trained on per round (measured); "
                  "tok/s = tokens / train s; oth: cores other processes used meanwhile")
        print(columns)
        entry = results[case] = {"config": configs["non_private"].to_dict(), "variants": {}}
        for variant in variants:
            config = configs[variant]
            waited = harness.OtherCpu().wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
            torch.manual_seed(config.seed)
            started = time.perf_counter()
            other = harness.OtherCpu()  # cores other processes used meanwhile (setup included)
            rows, facts = measure(config, args.rounds, count_tokens=sft)
            other_cores = other.stop()
            med = {k: statistics.median(r[k] for r in rows) for k in PARTS}
            if sft:
                med["tokens"] = statistics.median(r["tokens"] for r in rows)
                med["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
            entry["variants"][variant] = {"dp": dp_label(config), "median": med, "rounds": rows, "data": facts,
                                          "other_cores": other_cores, "other_cores_before": waited,
                                          "wall_s_with_setup": time.perf_counter() - started,
                                          "config_changes": {k: v for k, v in config.to_dict().items()
                                                             if entry["config"].get(k) != v}}
            tok = f"{med['tokens']:>8.0f} {med['tokens_per_s']:>8.0f}" if sft else f"{'-':>8} {'-':>8}"
            print(f"{case + '/' + variant:<20} {dp_label(config):>9} {med['seconds']:>8.2f} {med['seconds_train']:>8.2f} "
                  f"{med['seconds_dp']:>10.3f} {med['seconds_aggregate']:>12.4f} {med['seconds_eval']:>8.2f} {tok} "
                  f"{'-' if other_cores is None else format(other_cores, '.1f'):>4}")
        if set(VARIANTS) <= set(entry["variants"]):
            v = entry["variants"]
            ratio = v["private"]["median"]["seconds_train"] / v["non_private"]["median"]["seconds_train"]
            entry["private_over_non_private_train"] = ratio
            print(f"private / non-private local training: {ratio:.2f}x")
        if sft:
            for variant, v in entry["variants"].items():
                sources = sorted({r["tokens_source"] for r in v["rounds"]})
                estimate = statistics.median(r["tokens_estimate"] for r in v["rounds"])
                print(f"{variant}: tokens {'/'.join(sources)}; estimate clients x local_steps x batch x mean mask "
                      f"sum ({v['data']['mean_attention_mask_sum']:.1f}) = {estimate:.0f}; "
                      f"{statistics.median(r['steps'] for r in v['rounds']):g} steps, "
                      f"{statistics.median(r['examples'] for r in v['rounds']):g} examples per round")
        print()
    path = Path(args.json or (DEFAULT_JSON.with_name("round_cpu_quick.json") if args.quick else DEFAULT_JSON))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results, "written": time.ctime(),
                                "loadavg": os.getloadavg()}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
