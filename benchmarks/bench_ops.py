"""CPU benchmarks of the six ``torch.ops.fedlora`` ops against their twins and the baselines to beat.

Usage (from the repository root, so that ``fedlora_ext`` resolves to the installed package)::

    python benchmarks/bench_ops.py                       # full run, threads 1 and 2 (~3-5 min)
    python benchmarks/bench_ops.py --quick               # tiny smoke run (seconds)
    python benchmarks/bench_ops.py --cases dp_clip_noise --threads 1 --repeats 11

Every case builds its inputs outside the timed region, then times the fused op, its pure-PyTorch
twin and the case's baselines (median of ``--repeats`` runs after warm-up) at each thread count.
In-place ops run on the same (mutating) inputs every run; nothing is cloned inside a timed region.
See benchmarks/README.md for the columns and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import fnmatch
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, next to this file
import harness  # noqa: E402
import targets  # noqa: E402
from harness import BenchConfig, BenchResult, make_result, time_ms  # noqa: E402

fedlora_ext = harness.import_installed_fedlora()
from fedlora_ext import ops, reference  # noqa: E402

SEED, OFFSET = 0x5EED_F00D, 7  # fixed: every run does the same work
F32 = 4  # bytes


@dataclass
class Context:
    """Run-wide settings and state shared by the cases."""

    repeats: int
    slow_repeats: int
    compile_timeout: float
    quick: bool
    cache: str
    monitor: harness.OtherCpu
    compile_failures: dict[str, str] = field(default_factory=dict)
    copy_probes: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``build(params)`` makes its inputs once, ``run`` times it at one thread count."""

    op: str
    case: str
    shapes: str
    params: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], dict]
    run: Callable[["Case", dict, int, Context], BenchResult]

    @property
    def name(self) -> str:
        return f"{self.op}/{self.case}"


# ------------------------------------------------------------------------------------ torch.compile


class _CompileTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` inside torch swallows it."""


def compiled_twin(ctx: Context, op: str, twin: Callable, args: tuple) -> tuple[Callable | None, str]:
    """``torch.compile(twin)`` compiled (by one call on ``args``) outside any timed region.

    Inductor's C++ kernels are specialised to the current thread count, so every call starts from a
    reset dynamo. Compilation runs under a ``ctx.compile_timeout`` alarm; a failure or timeout is
    remembered per op (later thread counts / sizes skip it) and returned as the note.

    Returns:
        ``(compiled_fn, "")`` or ``(None, reason)``.
    """
    if ctx.compile_timeout <= 0:
        return None, "torch.compile skipped (--quick or --compile-timeout 0)"
    if op in ctx.compile_failures:
        return None, ctx.compile_failures[op]
    torch._dynamo.reset()

    def on_alarm(signum, frame):
        raise _CompileTimeout()

    ctx.monitor.pause()  # the compiler's subprocesses would count as other processes
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, ctx.compile_timeout)
    start = time.perf_counter()
    try:
        fn = torch.compile(twin)
        fn(*args)
        return fn, ""
    except _CompileTimeout:
        reason = f"torch.compile(twin) did not finish in {ctx.compile_timeout:.0f}s (aborted)"
    except Exception as error:  # noqa: BLE001 - any compiler failure becomes a note
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        reason = f"torch.compile(twin) failed after {time.perf_counter() - start:.0f}s: {type(error).__name__}: {first_line}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ctx.monitor.resume()
    torch._dynamo.reset()
    gc.collect()
    ctx.compile_failures[op] = reason
    return None, reason


def _config(case: Case, threads: int, ctx: Context, *, main_bytes: int, bytes_moved: int) -> BenchConfig:
    return BenchConfig(
        op=case.op,
        case=case.case,
        shapes=case.shapes,
        threads=threads,
        dtype=str(case.params.get("dtype", torch.float32)).removeprefix("torch."),
        repeats=ctx.repeats,
        main_bytes=main_bytes,
        bytes_moved=bytes_moved,
    )


def _time_case(
    ctx: Context,
    cfg: BenchConfig,
    fns: dict[str, Callable[[], Any]],
    *,
    setups: Mapping[str, Callable[[], Any]] | None = None,
    floor_reads: int = 0,
    extra: Mapping[str, Any] | None = None,
    note: str = "",
    twin_ms: float | None = None,
) -> BenchResult:
    """Time ``fns`` ("fused", "twin" unless ``twin_ms`` is given, baselines) interleaved with a copy
    probe at ``cfg.main_bytes``; the floor, when asked, is ``floor_reads`` reads of the main input at
    that copy bandwidth."""
    probe = harness.CopyProbe(cfg.main_bytes)
    times = harness.time_interleaved({**fns, "copy": probe}, repeats=ctx.repeats, setups=setups, cache=ctx.cache)
    del probe.src, probe.dst
    ms = harness.medians(times)
    copy = probe.gbps(ms.pop("copy"))
    ctx.copy_probes.append({"bytes": probe.nbytes, "threads": cfg.threads, "case": cfg.name, "gbps": round(copy, 3)})
    fused_ms, twin = ms.pop("fused"), ms.pop("twin", twin_ms)
    return make_result(
        cfg,
        fused_ms=fused_ms,
        twin_ms=twin,
        baselines_ms=ms,
        copy_gbps=copy,
        floor_ms=floor_reads * cfg.main_bytes / (copy * 1e9) * 1e3 if floor_reads else None,
        extra=extra,
        note=note,
        samples_ms=times,
    )


# ------------------------------------------------------------------------------------ dp_clip_noise


def lora_shapes(layers: int, hidden: int, rank: int) -> list[tuple[int, int]]:
    """LoRA factor shapes of ``layers`` x {q, v} x {A [r, h], B [h, r]}."""
    return [s for _ in range(layers) for _ in ("q", "v") for s in ((rank, hidden), (hidden, rank))]


def build_per_sample(p: Mapping[str, Any]) -> dict:
    torch.manual_seed(0)
    shapes = lora_shapes(p["layers"], p["hidden"], p["rank"])
    grads = [torch.randn(p["batch"], *s) * 0.05 for s in shapes]  # per-sample norms ~ 44 > max_norm: clips
    return {"grads": grads, "shapes": shapes}


def run_dp_clip_noise(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    grads, batch = st["grads"], case.params["batch"]
    g_bytes = sum(g.numel() for g in grads) * F32
    cfg = _config(case, threads, ctx, main_bytes=g_bytes, bytes_moved=2 * g_bytes + g_bytes // batch)
    args = (grads, 1.0, 1.0, float(batch), SEED, OFFSET)
    err = harness.max_abs_err(ops.dp_clip_noise(*args), reference.dp_clip_noise(*args))

    # opacus 1.6 DPOptimizer on the same per-sample grads: exactly the three step pieces are timed.
    opacus_step, reset_opacus = harness.opacus_dp_step(grads, batch)

    fns = {
        "fused": lambda: ops.dp_clip_noise(*args),
        "twin": lambda: reference.dp_clip_noise(*args),
        "opacus DPOptimizer": opacus_step,
    }
    compiled, note = compiled_twin(ctx, case.op, reference.dp_clip_noise, args)
    fns["compile(twin)"] = (lambda: compiled(*args)) if compiled else None
    result = _time_case(
        ctx, cfg, _drop_none(fns), setups={"opacus DPOptimizer": reset_opacus}, floor_reads=2,
        extra={"max_abs_err_vs_twin": err, "per_sample_MiB": g_bytes / 2**20}, note=note,
    )
    return _with_skipped(result, fns)  # the opacus parameters go with the closures


def run_per_sample_norms(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    grads = st["grads"]
    g_bytes = sum(g.numel() for g in grads) * F32
    cfg = _config(case, threads, ctx, main_bytes=g_bytes, bytes_moved=g_bytes)
    err = harness.max_abs_err(ops.per_sample_norms(grads), reference.per_sample_norms(grads))
    fns = {"fused": lambda: ops.per_sample_norms(grads), "twin": lambda: reference.per_sample_norms(grads)}
    return _time_case(ctx, cfg, fns, floor_reads=1, extra={"max_abs_err_vs_twin": err})


def _drop_none(fns: dict) -> dict:
    return {k: v for k, v in fns.items() if v is not None}


def _with_skipped(result: BenchResult, fns: dict) -> BenchResult:
    """Keep a ``None`` entry for every skipped baseline, so the table and JSON show it."""
    skipped = {k: None for k, v in fns.items() if v is None}
    if not skipped:
        return result
    return dataclasses.replace(
        result,
        baselines_ms={**result.baselines_ms, **skipped},
        speedups={**result.speedups, **skipped},
    )


# ------------------------------------------------------------------------------------ weighted_sum


def build_weighted_sum(p: Mapping[str, Any]) -> dict:
    torch.manual_seed(1)
    xs = [torch.randn(p["rows"], p["rank"]) for _ in range(p["K"])]
    w = torch.rand(p["K"])
    return {"xs": xs, "w": w / w.sum()}


def run_weighted_sum(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    xs, w, rank = st["xs"], st["w"], case.params["rank"]
    in_bytes = sum(x.numel() for x in xs) * F32
    cfg = _config(case, threads, ctx, main_bytes=in_bytes, bytes_moved=in_bytes + xs[0].numel() * F32)
    args = (xs, w, 1, rank)
    err = harness.max_abs_err(ops.weighted_sum(*args), reference.weighted_sum(*args))
    compiled, note = compiled_twin(ctx, case.op, reference.weighted_sum, args)
    fns = {
        "fused": lambda: ops.weighted_sum(*args),
        "twin": lambda: reference.weighted_sum(*args),
        "compile(twin)": (lambda: compiled(*args)) if compiled else None,
    }
    result = _time_case(ctx, cfg, _drop_none(fns), extra={"max_abs_err_vs_twin": err}, note=note)
    return _with_skipped(result, fns)


# ------------------------------------------------------------------------------------ stacked_delta(_)


def build_stacked(p: Mapping[str, Any]) -> dict:
    torch.manual_seed(2)
    m, n, K, r, dtype = p["m"], p["n"], p["K"], p["r"], p.get("dtype", torch.float32)
    Bs = [(torch.randn(m, r) * 0.02).to(dtype) for _ in range(K)]
    As = [(torch.randn(r, n) * 0.02).to(dtype) for _ in range(K)]
    w = torch.rand(K)
    w = w / w.sum()
    st = {"W": (torch.randn(m, n) * 0.02).to(dtype), "Bs": Bs, "As": As, "w": w}
    # the addmm baseline's factors (in W's dtype): weights folded into B, concatenated once, outside the
    # timed region
    st["B_cat"] = torch.cat([wk * B for wk, B in zip(w.tolist(), Bs)], dim=1).contiguous()
    st["A_cat"] = torch.cat(As, dim=0).contiguous()
    return st


def _stacked_bytes(p: Mapping[str, Any], w_passes: int) -> int:
    size = p.get("dtype", torch.float32).itemsize
    return (w_passes * p["m"] * p["n"] + (p["m"] + p["n"]) * p["K"] * p["r"]) * size


def run_stacked_delta_inplace(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    p = case.params
    W, Bs, As, w, scale = st["W"], st["Bs"], st["As"], st["w"], p["scale"]
    B_cat, A_cat = st["B_cat"], st["A_cat"]
    cfg = _config(case, threads, ctx, main_bytes=W.numel() * W.element_size(), bytes_moved=_stacked_bytes(p, 2))

    fns, err = harness.stacked_delta_inplace_variants(W, Bs, As, w, scale, B_cat, A_cat)
    result = _time_case(ctx, cfg, fns, extra={"max_abs_err_vs_twin": err})
    flops = 2 * p["m"] * p["n"] * p["K"] * p["r"] + 2 * p["m"] * p["n"]
    ratio = result.fused_ms / result.baselines_ms["addmm_(pre-cat)"]
    extra = {"fused/addmm": ratio, "fused_GFLOPs": flops / (result.fused_ms * 1e6), **result.extra}
    return dataclasses.replace(result, extra=extra)


def run_stacked_delta(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    p = case.params
    Bs, As, w, scale = st["Bs"], st["As"], st["w"], p["scale"]
    B_cat, A_cat = st["B_cat"], st["A_cat"]
    cfg = _config(case, threads, ctx, main_bytes=p["m"] * p["n"] * F32, bytes_moved=_stacked_bytes(p, 1))
    err = harness.max_abs_err(ops.stacked_delta(Bs, As, w, scale), reference.stacked_delta(Bs, As, w, scale))
    fns = {
        "fused": lambda: ops.stacked_delta(Bs, As, w, scale),
        "twin": lambda: reference.stacked_delta(Bs, As, w, scale),
        "mm(pre-cat)*scale": lambda: torch.mm(B_cat, A_cat).mul_(scale),
    }
    result = _time_case(ctx, cfg, fns, extra={"max_abs_err_vs_twin": err})
    ratio = result.fused_ms / result.baselines_ms["mm(pre-cat)*scale"]
    return dataclasses.replace(result, extra={"fused/mm": ratio, **result.extra})


# ------------------------------------------------------------------------------------ gaussian_noise_


def build_noise(p: Mapping[str, Any]) -> dict:
    return {"x": torch.zeros(p["numel"])}


def run_gaussian_noise(case: Case, st: dict, threads: int, ctx: Context) -> BenchResult:
    x = st["x"]
    nbytes = x.numel() * F32
    cfg = _config(case, threads, ctx, main_bytes=nbytes, bytes_moved=2 * nbytes)  # read + write x

    head = min(x.numel(), 1 << 20)  # the stream is per element, so a prefix checks the kernel cheaply
    a, b = x[:head].clone(), x[:head].clone()
    ops.gaussian_noise_([a], 1.0, SEED, OFFSET)
    reference.gaussian_noise_([b], 1.0, SEED, OFFSET)
    err = harness.max_abs_err(a, b)
    del a, b

    # the twin takes seconds per call: timed on its own, with --slow-repeats runs
    twin_ms = time_ms(
        lambda: reference.gaussian_noise_([x], 1.0, SEED, OFFSET), repeats=ctx.slow_repeats, warmup=1, cache=ctx.cache
    )
    y = torch.empty_like(x)  # what a user writes without the op: draw the noise, then add it
    fns = {"fused": lambda: ops.gaussian_noise_([x], 1.0, SEED, OFFSET), "Tensor.normal_": lambda: x.normal_(),
           "normal_+add_": lambda: x.add_(y.normal_())}
    return _time_case(ctx, cfg, fns, twin_ms=twin_ms, extra={"max_abs_err_vs_twin": err, "twin_repeats": ctx.slow_repeats})


# ------------------------------------------------------------------------------------ case list


def make_cases(quick: bool) -> list[Case]:
    """The full case list, or tiny shapes for ``--quick`` (same code paths, seconds in all)."""
    layers, hidden = (2, 256) if quick else (24, 1024)
    batches = (4,) if quick else (4, 32)
    lora = f"{layers}x{{q,v}}x{{A[8,{hidden}],B[{hidden},8]}}"
    cases = []
    for b in batches:
        p = {"batch": b, "layers": layers, "hidden": hidden, "rank": 8}
        cases.append(Case("dp_clip_noise", f"B{b}", f"{4 * layers} tensors {lora}, batch {b}", p, build_per_sample, run_dp_clip_noise))
    for b in batches:
        p = {"batch": b, "layers": layers, "hidden": hidden, "rank": 8}
        cases.append(Case("per_sample_norms", f"B{b}", f"{4 * layers} tensors {lora}, batch {b}", p, build_per_sample, run_per_sample_norms))
    rows = 256 if quick else 4096
    for K in (4,) if quick else (10, 100):
        p = {"K": K, "rows": rows, "rank": 16}
        cases.append(Case("weighted_sum", f"K{K}", f"{K} x [{rows}, 16], [K] weights, rank_dim 1", p, build_weighted_sum, run_weighted_sum))
    sizes = (256,) if quick else (1024, 4096)
    ranks = ((4, 8),) if quick else ((2, 8), (10, 8), (40, 16))  # K r = 16, 80, 640
    for dtype in (torch.float32, torch.bfloat16):
        suffix = "" if dtype == torch.float32 else "_bf16"
        for m in sizes:
            for K, r in ranks:
                p = {"m": m, "n": m, "K": K, "r": r, "scale": 2.0, "dtype": dtype}
                shapes = f"W[{m},{m}], {K} x (B[{m},{r}], A[{r},{m}]) {str(dtype).removeprefix('torch.')}"
                cases.append(Case("stacked_delta_", f"m{m}_Kr{K * r}{suffix}", shapes, p, build_stacked, run_stacked_delta_inplace))
    m, (K, r) = (256, (4, 8)) if quick else (4096, (10, 8))
    p = {"m": m, "n": m, "K": K, "r": r, "scale": 2.0}
    cases.append(Case("stacked_delta", f"m{m}_Kr{K * r}", f"{K} x (B[{m},{r}], A[{r},{m}]) -> [{m},{m}]", p, build_stacked, run_stacked_delta))
    numel = 1 << 20 if quick else 10_000_000
    cases.append(Case("gaussian_noise_", f"N{numel // 1000}k", f"[{numel}] float32", {"numel": numel}, build_noise, run_gaussian_noise))
    return cases


def select(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """Cases whose op or ``op/case`` matches a pattern (exact op name or a glob such as ``stacked*``)."""
    if not patterns:
        return cases
    return [c for c in cases if any(pat == c.op or fnmatch.fnmatchcase(c.name, pat) or fnmatch.fnmatchcase(c.op, pat) for pat in patterns)]


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values (default 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant; the median is reported (default 7)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs of the very slow gaussian_noise_ twin (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats, no torch.compile: a smoke run")
    parser.add_argument("--cases", nargs="+", metavar="PATTERN", help="ops or op/case globs, e.g. dp_clip_noise 'stacked_delta_/m4096*'")
    parser.add_argument("--compile-timeout", type=float, default=None, help="seconds allowed per torch.compile baseline (default 60, 0 = skip; --quick: 0)")
    parser.add_argument("--json", default=None, help=f"output JSON (default {harness.DEFAULT_JSON.relative_to(harness.REPO_ROOT)}; with --cpu-path P: ops_cpu_P.json)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="before each case, wait up to S seconds for other processes to go quiet (default 0)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm", help="warm: each timed run follows a run of the same variant (default); cold: a 512 MB cache flush")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    harness.add_cpu_path_argument(parser)
    args = parser.parse_args(argv)
    harness.use_cpu_path(args.cpu_path)
    faulthandler.enable()  # a rebuild that overwrites _C in place crashes this process: say where

    repeats = min(args.repeats, 3) if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    compile_timeout = args.compile_timeout if args.compile_timeout is not None else (0.0 if args.quick else 60.0)
    cases = select(make_cases(args.quick), args.cases)
    if args.list or not cases:
        for c in cases:
            print(f"{c.name:<32} {c.shapes}")
        return 0 if cases else 1

    ctx = Context(repeats=repeats, slow_repeats=max(1, min(args.slow_repeats, repeats)), compile_timeout=compile_timeout, quick=args.quick, cache=args.cache, monitor=harness.OtherCpu())
    header = harness.machine_info(fedlora_ext, args.threads)
    header.update(repeats=repeats, slow_repeats=ctx.slow_repeats, quick=args.quick, cache=args.cache, compile_timeout_s=compile_timeout)
    start = time.perf_counter()
    header["copy_gbps_1GiB"] = {}
    for t in args.threads:
        torch.set_num_threads(t)
        header["copy_gbps_1GiB"][str(t)] = round(harness.copy_gbps(harness.GIB, repeats=min(repeats, 5)), 2)
    print(f"fedlora_ext {fedlora_ext.__file__}  torch {torch.__version__}  load {header['loadavg_start']}")
    print(harness.describe_cpu(header))
    print(f"copy bandwidth at 1 GiB (GB/s, read+write): {header['copy_gbps_1GiB']}  repeats {repeats}  cache {args.cache}\n")

    results: list[BenchResult] = []
    monitor = ctx.monitor
    for case in cases:
        state = case.build(case.params)
        for t in args.threads:
            torch.set_num_threads(t)
            if args.wait_idle > 0:
                monitor.wait_for_idle(args.wait_idle)
            monitor.start()
            result = case.run(case, state, t, ctx)
            # other processes on this 2-core machine skew the timings: record how much CPU they took
            result = dataclasses.replace(result, other_cores=monitor.stop())
            results.append(result)
            harness.print_table([result], header=len(results) == 1)
        del state
        gc.collect()

    header["copy_probes"] = ctx.copy_probes
    header["loadavg_end"] = os.getloadavg()
    header["elapsed_s"] = round(time.perf_counter() - start, 1)
    end_lib = harness.native_library_fingerprint(fedlora_ext)
    header["native_library_end"] = end_lib
    # a reinstall of the same binary only touches the mtime; compare the contents
    header["native_library_changed_during_run"] = end_lib.get("sha256_16") != header["native_library"].get("sha256_16")
    target_rows = [] if args.quick else targets.evaluate(results)
    header["targets"] = target_rows

    print(f"\nSummary ({harness.describe_cpu(header)})")
    harness.print_table(results)
    targets.print_rows(target_rows)
    busy = [r.config.name + f"@{r.config.threads}" for r in results if (r.other_cores or 0) > 0.3]
    if busy:
        print(f"\nWARNING: other processes used > 0.3 cores during {', '.join(busy)}; those timings are skewed.")
    if header["native_library_changed_during_run"]:
        print("\nWARNING: the fedlora_ext native library on disk changed during the run (this process keeps the one it"
              " loaded, see native_library in the JSON header); re-run to measure the new build.")
    path = harness.write_json(args.json or harness.json_for_path(harness.DEFAULT_JSON, args.cpu_path), header, results)
    print(f"\nwrote {path}  ({header['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
