"""GPU benchmarks of the ``torch.ops.fedlora`` CUDA kernels against their twins and the baselines of
issue 3, each figure next to its roofline.

Usage (from the repository root, with the package built against the CUDA torch)::

    python benchmarks/bench_gpu.py                         # full run (~1-2 min on an H100)
    python benchmarks/bench_gpu.py --cases dp_clip_noise --repeats 50
    python benchmarks/bench_gpu.py --device cpu --quick    # dry run of the code path on a CPU machine

Two times per variant, medians after warm-up, variants interleaved round-robin, inputs built outside
the timed region:

* ``dev ms``, device time: CUDA events around one call. Before each call, untimed, the L2 cache is
  flushed (a write of 4x its size) and the stream is kept busy by ``torch.cuda._sleep`` for longer
  than the call takes the host to enqueue, so the events time the GPU work alone.
* ``wall ms``, end to end: ``synchronize(); t0; call; synchronize(); t1``, host overhead and launch
  latency included, L2 flushed before.

Once per run it measures the device copy bandwidth (``dst.copy_(src)`` of 1 GiB, counting 2 GiB moved)
and the ``torch.mm`` rate (8192^3, float32 and bfloat16); each case's roofline is
``max(bytes / copy bandwidth, FLOPs / matmul rate)``. See benchmarks/README.md, "GPU report (issue 3)".
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, next to this file
import harness  # noqa: E402
from harness import BenchConfig, BenchResult, make_result  # noqa: E402

DEFAULT_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "ops_gpu.json"
DRY_RUN_JSON = harness.REPO_ROOT / "benchmarks" / "results" / "ops_gpu_dryrun.json"
SEED, OFFSET = 0x5EED_F00D, 7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPACUS_EQUIVALENT = "opacus-equivalent torch (NOT opacus)"


# ------------------------------------------------------------------------------------------- timing


class Timer:
    """Device and end-to-end times (ms) of variants run round-robin; see the module docstring."""

    def __init__(self, device: str, warmup: int):
        self.cuda = device.startswith("cuda")
        self.warmup = warmup
        self.host_bound = 0  # timed calls whose host enqueue outlasted the sleep before them
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.flush_buffer = torch.empty(max(4 * l2, 256 << 20) // 4, dtype=torch.float32, device=device)
            self.cycles_per_ms = self._calibrate_sleep()

    @staticmethod
    def _calibrate_sleep() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        return 20_000_000 / start.elapsed_time(end)

    def _prepare(self, setup: Callable[[], Any] | None) -> None:
        if setup is not None:
            setup()
        if self.cuda:
            self.flush_buffer.zero_()

    def time(
        self,
        fns: Mapping[str, Callable[[], Any]],
        repeats: Mapping[str, int],
        setups: Mapping[str, Callable[[], Any]] | None = None,
    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """``(device_ms, wall_ms)``: per variant, ``repeats[name]`` samples of each."""
        setups = setups or {}
        device = {n: [] for n in fns}
        wall = {n: [] for n in fns}
        enqueue_ms = {n: 0.0 for n in fns}
        rounds = self.warmup + max(repeats.values())
        for r in range(rounds):  # device time
            pending = []
            for name, fn in fns.items():
                if r >= self.warmup + repeats[name]:
                    continue
                self._prepare(setups.get(name))
                if not self.cuda:
                    t0 = time.perf_counter()
                    fn()
                    if r >= self.warmup:
                        device[name].append((time.perf_counter() - t0) * 1e3)
                    continue
                sleep_ms = 1.5 * enqueue_ms[name] + 0.05
                torch.cuda._sleep(int(sleep_ms * self.cycles_per_ms))
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                host = (time.perf_counter() - t0) * 1e3
                if r < self.warmup:
                    enqueue_ms[name] = host  # the last warm-up call: lazy initialisation is done
                else:
                    self.host_bound += host > sleep_ms
                    pending.append((name, start, end))
            if self.cuda:
                torch.cuda.synchronize()
            for name, start, end in pending:
                device[name].append(start.elapsed_time(end))
        for r in range(self.warmup + max(repeats.values())):  # end to end
            for name, fn in fns.items():
                if r >= self.warmup + repeats[name]:
                    continue
                self._prepare(setups.get(name))
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                if r >= self.warmup:
                    wall[name].append((time.perf_counter() - t0) * 1e3)
        return device, wall

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Context:
    """Run-wide settings and the measured machine rates."""

    device: str
    quick: bool
    repeats: int
    slow_repeats: int
    timer: Timer
    copy_gbps: float = 0.0
    mm_tflops: dict[str, float] = field(default_factory=dict)
    opacus: str | None = None  # opacus version, None when it is not importable

    def measure(
        self,
        *,
        op: str,
        case: str,
        shapes: str,
        dtype: torch.dtype,
        fns: dict[str, Callable[[], Any]],
        bytes_moved: int,
        floor_bytes: int | None = None,
        flops: int = 0,
        setups: Mapping[str, Callable[[], Any]] | None = None,
        slow: tuple[str, ...] = (),
        extra: Mapping[str, Any] | None = None,
        note: str = "",
    ) -> BenchResult:
        """Time ``fns`` ("fused", "twin", baselines) and derive GB/s, TFLOP/s and the roofline."""
        repeats = {n: (self.slow_repeats if n in slow else self.repeats) for n in fns}
        before = self.timer.host_bound
        device, wall = self.timer.time(fns, repeats, setups)
        dev_ms = {n: statistics.median(v) for n, v in device.items()}
        wall_ms = {n: statistics.median(v) for n, v in wall.items()}
        floor_bytes = bytes_moved if floor_bytes is None else floor_bytes
        dtype_name = str(dtype).removeprefix("torch.")
        mem_floor = floor_bytes / (self.copy_gbps * 1e9) * 1e3
        rate = self.mm_tflops.get(dtype_name)
        flop_floor = flops / (rate * 1e12) * 1e3 if flops and rate else 0.0
        fused = dev_ms.pop("fused")
        twin = dev_ms.pop("twin", None)
        cfg = BenchConfig(op=op, case=case, shapes=shapes, threads=torch.get_num_threads(), dtype=dtype_name,
                          repeats=self.repeats, main_bytes=floor_bytes, bytes_moved=bytes_moved)
        info = {
            "wall_ms": wall_ms,
            "wall_speedups": {n: v / wall_ms["fused"] for n, v in wall_ms.items() if n != "fused"},
            "mem_floor_ms": mem_floor,
            "flop_floor_ms": flop_floor or None,
            "flops": flops,
            "tflops": flops / (fused * 1e9) if flops else None,
            "frac_mm_rate": flops / (fused * 1e9) / rate if flops and rate else None,
            "roofline_frac": max(mem_floor, flop_floor) / fused,
            "host_bound_samples": self.timer.host_bound - before,
            **(extra or {}),
        }
        samples = {**device, **{f"wall:{n}": v for n, v in wall.items()}}
        return make_result(cfg, fused_ms=fused, twin_ms=twin, baselines_ms=dev_ms, copy_gbps=self.copy_gbps,
                           floor_ms=max(mem_floor, flop_floor), extra=info, note=note, samples_ms=samples)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------- calibration


def measure_rates(ctx: Context) -> dict[str, Any]:
    """Device copy bandwidth (GB/s, read + write) and ``torch.mm`` TFLOP/s per dtype, measured once."""
    numel = (16 << 20 if ctx.quick else harness.GIB) // 4
    src = torch.ones(numel, device=ctx.device)
    dst = torch.empty_like(src)
    device, _ = ctx.timer.time({"copy": lambda: dst.copy_(src)}, {"copy": ctx.repeats})
    copy_ms = statistics.median(device["copy"])
    ctx.copy_gbps = 2 * numel * 4 / (copy_ms * 1e-3) / 1e9
    del src, dst
    n = 256 if ctx.quick else 8192
    for name, dtype in DTYPES.items():
        a, b = (torch.randn(n, n, device=ctx.device).to(dtype) for _ in range(2))
        c = torch.empty(n, n, device=ctx.device, dtype=dtype)
        device, _ = ctx.timer.time({"mm": lambda: torch.mm(a, b, out=c)}, {"mm": ctx.repeats})
        ctx.mm_tflops[name] = 2 * n**3 / (statistics.median(device["mm"]) * 1e9)
        del a, b, c
    gc.collect()
    return {"copy_bytes": 2 * numel * 4, "copy_ms": copy_ms, "copy_gbps": ctx.copy_gbps, "mm_n": n,
            "mm_tflops": dict(ctx.mm_tflops), "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    op: str
    case: str
    params: Mapping[str, Any]
    run: Callable[..., BenchResult]

    @property
    def name(self) -> str:
        return f"{self.op}/{self.case}"


def lora_shapes(layers: int, hidden: int, rank: int) -> list[tuple[int, int]]:
    """LoRA factor shapes of ``layers`` x {q, v} x {A [r, h], B [h, r]}."""
    return [s for _ in range(layers) for _ in ("q", "v") for s in ((rank, hidden), (hidden, rank))]


def opacus_equivalent_step(grads, max_norm: float, noise_multiplier: float, denominator: float):
    """opacus 1.6 ``DPOptimizer.clip_and_accumulate(); add_noise(); scale_grad()`` (flat clipping, mean
    reduction, secure_mode off) in plain torch, op for op: per-tensor norms, stack, clamp, einsum,
    ``torch.normal``, add, divide. The stand-in when opacus is not installed; it is NOT opacus."""
    per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
    per_sample_norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)
    clip = (max_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
    outs = []
    for g in grads:
        summed = torch.einsum("i,i...", clip, g)
        noise = torch.normal(0.0, noise_multiplier * max_norm, size=summed.shape, device=g.device, dtype=g.dtype)
        grad = summed + noise
        grad /= denominator
        outs.append(grad)
    return outs, per_sample_norms


def case_dp_clip_noise(ctx: Context, case: Case, ops, reference) -> BenchResult:
    p = case.params
    torch.manual_seed(0)
    batch, shapes = p["batch"], lora_shapes(p["layers"], p["hidden"], 8)
    grads = [torch.randn(batch, *s, device=ctx.device) * 0.05 for s in shapes]  # norms ~ 44: every sample clips
    g_bytes = nbytes(grads)
    args = (grads, 1.0, 1.0, float(batch), SEED, OFFSET)
    fns = {
        "fused": lambda: ops.dp_clip_noise(*args),
        "twin": lambda: reference.dp_clip_noise(*args),
        OPACUS_EQUIVALENT: lambda: opacus_equivalent_step(grads, 1.0, 1.0, float(batch)),
    }
    setups = {}
    if ctx.opacus:
        opacus_step, reset_opacus = harness.opacus_dp_step(grads, batch)
        fns["opacus DPOptimizer"] = opacus_step
        setups["opacus DPOptimizer"] = reset_opacus
    err = harness.max_abs_err(ops.dp_clip_noise(*args), reference.dp_clip_noise(*args))
    eq_outs, eq_norms = opacus_equivalent_step(grads, 1.0, 0.0, float(batch))  # noise 0: comparable
    eq_err = max(harness.max_abs_err(ops.dp_clip_noise(grads, 1.0, 0.0, float(batch), SEED, OFFSET)[0], eq_outs),
                 harness.max_abs_err(ops.per_sample_norms(grads), eq_norms))
    return ctx.measure(
        op=case.op, case=case.case, dtype=torch.float32, fns=fns, setups=setups,
        shapes=f"{len(shapes)} tensors {p['layers']}x{{q,v}}x{{A[8,{p['hidden']}],B[{p['hidden']},8]}}, batch {batch}",
        bytes_moved=2 * g_bytes + g_bytes // batch, floor_bytes=2 * g_bytes,  # floor: two reads of the grads
        extra={"max_abs_err_vs_twin": err, "noiseless_err_vs_opacus_equivalent": eq_err,
               "per_sample_MiB": g_bytes / 2**20},
        note="" if ctx.opacus else "opacus not installed: the opacus baseline is the pure-torch equivalent",
    )


def case_per_sample_norms(ctx: Context, case: Case, ops, reference) -> BenchResult:
    p = case.params
    torch.manual_seed(0)
    shapes = lora_shapes(p["layers"], p["hidden"], 8)
    grads = [torch.randn(p["batch"], *s, device=ctx.device) for s in shapes]
    fns = {"fused": lambda: ops.per_sample_norms(grads), "twin": lambda: reference.per_sample_norms(grads),
           "opacus norms (torch)": lambda: torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], 1).norm(2, dim=1)}
    return ctx.measure(op=case.op, case=case.case, shapes=f"{len(shapes)} LoRA tensors, batch {p['batch']}",
                       dtype=torch.float32, fns=fns, bytes_moved=nbytes(grads),
                       extra={"max_abs_err_vs_twin": harness.max_abs_err(ops.per_sample_norms(grads), reference.per_sample_norms(grads))})


def case_weighted_sum(ctx: Context, case: Case, ops, reference) -> BenchResult:
    """One call on K clients of one factor shape ([d, r] B factors, rank_dim 1; [r, d] A factors, rank_dim 0)."""
    p = case.params
    torch.manual_seed(1)
    d, r, K, dtype = p["d"], p["r"], p["K"], p["dtype"]
    shape, rank_dim = ((d, r), 1) if p["factor"] == "B" else ((r, d), 0)
    xs = [torch.randn(shape, device=ctx.device).to(dtype) for _ in range(K)]
    w = torch.rand(K, device=ctx.device)
    w /= w.sum()
    args = (xs, w, rank_dim, r)
    fns = {"fused": lambda: ops.weighted_sum(*args), "twin": lambda: reference.weighted_sum(*args)}
    return ctx.measure(op=case.op, case=case.case, dtype=dtype,
                       shapes=f"{K} x {p['factor']} {list(shape)}, [K] weights, rank_dim {rank_dim}", fns=fns,
                       bytes_moved=nbytes(xs) + xs[0].numel() * xs[0].element_size(),
                       extra={"max_abs_err_vs_twin": harness.max_abs_err(ops.weighted_sum(*args), reference.weighted_sum(*args))})


def case_weighted_sum_adapter(ctx: Context, case: Case, ops, reference) -> BenchResult:
    """FedAvg of a whole adapter: layers x {q, v} x {A, B}, one call per factor, distinct clients."""
    p = case.params
    torch.manual_seed(2)
    d, r, K, layers = p["d"], p["r"], p["K"], p["layers"]
    modules = [([torch.randn(r, d, device=ctx.device) for _ in range(K)], 0) for _ in range(2 * layers)]
    modules += [([torch.randn(d, r, device=ctx.device) for _ in range(K)], 1) for _ in range(2 * layers)]
    w = torch.rand(K, device=ctx.device)
    w /= w.sum()

    def fused():
        return [ops.weighted_sum(xs, w, dim, r) for xs, dim in modules]

    def twin():
        return [reference.weighted_sum(xs, w, dim, r) for xs, dim in modules]

    in_bytes = sum(nbytes(xs) for xs, _ in modules)
    out_bytes = len(modules) * d * r * 4
    return ctx.measure(op=case.op, case=case.case, dtype=torch.float32, fns={"fused": fused, "twin": twin},
                       shapes=f"{layers} layers x {{q,v}} x {{A[{r},{d}], B[{d},{r}]}}: {len(modules)} calls of K = {K}",
                       bytes_moved=in_bytes + out_bytes, extra={"calls": len(modules), "input_GiB": in_bytes / 2**30})


def case_stacked_delta_inplace(ctx: Context, case: Case, ops, reference) -> BenchResult:
    p = case.params
    torch.manual_seed(3)
    m, n, K, r, dtype, scale = p["m"], p["n"], p["K"], p["r"], p["dtype"], 2.0
    Bs = [(torch.randn(m, r, device=ctx.device) * 0.02).to(dtype) for _ in range(K)]
    As = [(torch.randn(r, n, device=ctx.device) * 0.02).to(dtype) for _ in range(K)]
    w = torch.rand(K, device=ctx.device)
    w /= w.sum()
    W = (torch.randn(m, n, device=ctx.device) * 0.02).to(dtype)
    # the addmm baseline's factors: weights folded into B, concatenated once, outside the timed region
    B_cat = torch.cat([wk * B.float() for wk, B in zip(w.tolist(), Bs)], dim=1).to(dtype).contiguous()
    A_cat = torch.cat(As, dim=0).contiguous()
    fns, err = harness.stacked_delta_inplace_variants(W, Bs, As, w, scale, B_cat, A_cat)
    size = W.element_size()
    result = ctx.measure(op=case.op, case=case.case, dtype=dtype, fns=fns,
                         shapes=f"W[{m},{n}] += {K} x (B[{m},{r}] @ A[{r},{n}])",
                         bytes_moved=2 * m * n * size + (m + n) * K * r * size, flops=2 * m * n * K * r,
                         extra={"max_abs_err_vs_twin": err})
    return result


def case_gaussian_noise(ctx: Context, case: Case, ops, reference) -> BenchResult:
    p = case.params
    x = torch.zeros(p["numel"], device=ctx.device)
    head = min(x.numel(), 1 << 20)  # the stream is per element: a prefix checks the kernel cheaply
    a, b = x[:head].clone(), x[:head].clone()
    ops.gaussian_noise_([a], 1.0, SEED, OFFSET)
    reference.gaussian_noise_([b], 1.0, SEED, OFFSET)
    err = harness.max_abs_err(a, b)
    del a, b
    fns = {
        "fused": lambda: ops.gaussian_noise_([x], 1.0, SEED, OFFSET),
        "twin": lambda: reference.gaussian_noise_([x], 1.0, SEED, OFFSET),
        "Tensor.normal_": lambda: x.normal_(),
    }
    return ctx.measure(op=case.op, case=case.case,
                       shapes=f"[{p['numel']}] float32, std 1", dtype=torch.float32, fns=fns, slow=("twin",),
                       bytes_moved=2 * x.numel() * 4, extra={"max_abs_err_vs_twin": err, "twin_repeats": ctx.slow_repeats})


def make_cases(quick: bool) -> list[Case]:
    """Issue 3's cases, or tiny shapes with the same code paths for ``--quick``."""
    layers, hidden = (2, 256) if quick else (24, 1024)
    cases = [Case("dp_clip_noise", f"B{b}", {"batch": b, "layers": layers, "hidden": hidden}, case_dp_clip_noise)
             for b in ((4, 8) if quick else (32, 256))]
    b = 8 if quick else 256
    cases.append(Case("per_sample_norms", f"B{b}", {"batch": b, "layers": layers, "hidden": hidden}, case_per_sample_norms))
    d, K, adapter_layers = (256, 4, 2) if quick else (4096, 100, 32)
    for dtype in ("float32", "bfloat16"):
        for factor in ("B", "A"):
            p = {"d": d, "r": 16, "K": K, "factor": factor, "dtype": DTYPES[dtype]}
            shape = f"{d}x16" if factor == "B" else f"16x{d}"
            cases.append(Case("weighted_sum", f"{factor}{shape}_K{K}_{dtype}", p, case_weighted_sum))
    cases.append(Case("weighted_sum", f"adapter{adapter_layers}L_K{K}", {"d": d, "r": 16, "K": K, "layers": adapter_layers}, case_weighted_sum_adapter))
    m = 256 if quick else 4096
    for dtype in ("float32", "bfloat16"):
        for K, r in ((2, 8), (4, 16)) if quick else ((10, 8), (40, 16)):
            p = {"m": m, "n": m, "K": K, "r": r, "dtype": DTYPES[dtype]}
            cases.append(Case("stacked_delta_", f"m{m}_Kr{K * r}_{dtype}", p, case_stacked_delta_inplace))
    numel = 1 << 16 if quick else 100_000_000
    label = f"N{numel // 1_000_000}M" if numel >= 1_000_000 else f"N{numel}"
    cases.append(Case("gaussian_noise_", label, {"numel": numel}, case_gaussian_noise))
    return cases


# ------------------------------------------------------------------------------------------- report


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[BenchResult], ctx: Context, header: bool = True, file=None) -> None:
    """One block per case, one line per variant. ``x`` columns: variant time / fused time (> 1: fused is
    faster). ``floor`` = max(bytes / copy bandwidth, FLOPs / mm rate); ``%roof`` = floor / device time."""
    file = file or sys.stdout
    line = (f"{'op/case':<34} {'dtype':<8} {'variant':<38} {'dev ms':>9} {'wall ms':>9} {'x dev':>7} {'x wall':>7} "
            f"{'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>5} {'floor ms':>9} {'%roof':>6}")
    if header:
        print(line, file=file)
        print("-" * len(line), file=file)
    for r in results:
        c, x = r.config, r.extra
        wall = x["wall_ms"]
        rows = [("fused", r.fused_ms)] + ([("twin", r.twin_ms)] if r.twin_ms is not None else []) + list(r.baselines_ms.items())
        rate = ctx.mm_tflops.get(c.dtype)
        for i, (name, ms) in enumerate(rows):
            gbps = c.bytes_moved / (ms * 1e6) if ms else None
            tflops = x["flops"] / (ms * 1e9) if x["flops"] and ms else None
            print(
                f"{(c.name if i == 0 else ''):<34} {(c.dtype if i == 0 else ''):<8} {name:<38} {_f(ms, '.4f'):>9} "
                f"{_f(wall.get(name), '.4f'):>9} {_f(ms / r.fused_ms if i else None, '.2f'):>7} "
                f"{_f(wall[name] / wall['fused'] if i and name in wall else None, '.2f'):>7} {_f(gbps, '.0f'):>7} "
                f"{_f(100 * gbps / ctx.copy_gbps if gbps else None, '.0f'):>6} {_f(tflops, '.1f'):>8} "
                f"{_f(100 * tflops / rate if tflops and rate else None, '.0f'):>5} "
                f"{(_f(r.floor_ms, '.4f') if i == 0 else ''):>9} {_f(100 * r.floor_ms / ms if ms and r.floor_ms else None, '.0f'):>6}",
                file=file,
            )
        notes = [f"{k}={v:.3g}" for k, v in x.items() if k in ("max_abs_err_vs_twin", "noiseless_err_vs_opacus_equivalent") and v is not None]
        if x.get("host_bound_samples"):
            notes.append(f"host_bound_samples={x['host_bound_samples']}")
        if r.note:
            notes.append(r.note)
        if notes:
            print(f"{'':<34} {'':<8} [{', '.join(notes)}]", file=file)
    file.flush()


def evaluate_targets(results: list[BenchResult], ctx: Context) -> list[dict]:
    """Issue 3's targets, one row each: speedup over opacus end to end (host + GPU); the rest on device time."""
    rows = []

    def add(target: str, r: BenchResult, value: float | None, ok: Callable[[float], bool]) -> None:
        rows.append({"target": target, "case": r.config.name, "value": None if value is None else round(value, 3),
                     "met": None if value is None else bool(ok(value))})

    opacus_name = "opacus DPOptimizer" if ctx.opacus else OPACUS_EQUIVALENT
    for r in results:
        c = r.config
        if c.op == "dp_clip_noise":
            add(f"{c.name}: {opacus_name} / fused, end to end >= 10", r, r.extra["wall_speedups"].get(opacus_name), lambda v: v >= 10)
            add(f"{c.name}: floor (2 reads of grads) / fused >= 0.70", r, r.extra["roofline_frac"], lambda v: v >= 0.70)
        elif c.op == "weighted_sum" and c.dtype == "float32":
            add(f"{c.name}: GB/s / copy GB/s >= 0.80", r, r.frac_copy_bw, lambda v: v >= 0.80)
        elif c.op == "stacked_delta_":
            addmm = r.baselines_ms.get("addmm_(pre-cat)")
            add(f"{c.name}: addmm / fused >= 0.9", r, addmm / r.fused_ms if addmm else None, lambda v: v >= 0.9)
            add(f"{c.name}: twin / fused >= 1.5", r, r.speedup_vs_twin, lambda v: v >= 1.5)
    return rows


def print_targets(rows: list[dict], dry_run: bool) -> None:
    print("\nTargets (issue 3)" + ("  [DRY RUN: tiny shapes / not a GPU, the verdicts mean nothing]" if dry_run else ""))
    for row in rows:
        verdict = "NO VALUE" if row["met"] is None else ("MET    " if row["met"] else "NOT MET")
        print(f"  {verdict}  {row['target']:<78} value {row['value']}")


# ------------------------------------------------------------------------------------------- main


def gpu_info(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"device": device}
    props = torch.cuda.get_device_properties(device)
    return {"device": device, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_GiB": round(props.total_memory / 2**30, 1),
            "l2_MiB": getattr(props, "L2_cache_size", 0) / 2**20, "torch_cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: cpu times with perf_counter, a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats: checks the code path, measures nothing")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per variant and mode, median reported (default 30, >= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per variant first (default 5)")
    parser.add_argument("--slow-repeats", type=int, default=5, help="timed calls of the gaussian_noise_ twin (default 5)")
    parser.add_argument("--cases", nargs="+", metavar="PATTERN", help="ops or op/case globs, e.g. dp_clip_noise 'stacked_delta_/*bfloat16'")
    parser.add_argument("--json", default=None, help=f"output JSON (default {DEFAULT_JSON.relative_to(harness.REPO_ROOT)}; "
                                                      f"dry runs: {DRY_RUN_JSON.relative_to(harness.REPO_ROOT)})")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = parser.parse_args(argv)

    dry_run = args.quick or not args.device.startswith("cuda")
    cases = [c for c in make_cases(args.quick)
             if not args.cases or any(pat == c.op or fnmatch.fnmatchcase(c.name, pat) for pat in args.cases)]
    if args.list or not cases:
        print("\n".join(c.name for c in cases))
        return 0 if cases else 1
    if args.quick:
        args.repeats, args.warmup, args.slow_repeats = min(args.repeats, 3), min(args.warmup, 1), 1
    elif args.repeats < 20:
        parser.error("--repeats must be >= 20 outside --quick (issue 3: medians of >= 20 calls)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_gpu: torch {torch.__version__} sees no GPU; for a dry run use --device cpu --quick", file=sys.stderr)
        return 2

    fedlora_ext = harness.import_installed_fedlora()
    from fedlora_ext import ops, reference

    if args.device.startswith("cuda") and not fedlora_ext.build_info()["cuda"]:
        print(f"bench_gpu: {fedlora_ext.__file__} was built without CUDA kernels: {fedlora_ext.build_info()}", file=sys.stderr)
        return 2
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None

    start = time.perf_counter()
    ctx = Context(device=args.device, quick=args.quick, repeats=args.repeats, slow_repeats=args.slow_repeats,
                  timer=Timer(args.device, args.warmup), opacus=opacus_version)
    header = harness.machine_info(fedlora_ext, [torch.get_num_threads()])
    header.update(gpu=gpu_info(args.device), dry_run=dry_run, repeats=args.repeats, warmup=args.warmup,
                  slow_repeats=args.slow_repeats, rates=measure_rates(ctx),
                  opacus_baseline="opacus DPOptimizer" if opacus_version else OPACUS_EQUIVALENT)
    print(f"fedlora_ext {fedlora_ext.__file__}  torch {torch.__version__}  build_info {fedlora_ext.build_info()}")
    print(f"device {header['gpu']}")
    print(f"copy bandwidth {ctx.copy_gbps:.0f} GB/s (read+write, {header['rates']['copy_bytes'] / 2**30:.2f} GiB moved)   "
          f"torch.mm {', '.join(f'{k} {v:.1f} TFLOP/s' for k, v in ctx.mm_tflops.items())} (n = {header['rates']['mm_n']}, "
          f"float32 matmul precision {header['rates']['float32_matmul_precision']})")
    print(f"opacus: {opacus_version or f'not installed; the dp_clip_noise baseline is the {OPACUS_EQUIVALENT}'}   "
          f"repeats {args.repeats} (gaussian_noise_ twin {args.slow_repeats}), warm-up {args.warmup}"
          + ("   DRY RUN" if dry_run else "") + "\n")

    results: list[BenchResult] = []
    errors: dict[str, str] = {}
    for case in cases:
        try:
            result = case.run(ctx, case, ops, reference)
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others' numbers
            errors[case.name] = f"{type(error).__name__}: {error}"
            print(f"{case.name}: FAILED: {errors[case.name]}", file=sys.stderr)
            traceback.print_exc()
            continue
        finally:
            gc.collect()
            if ctx.timer.cuda:
                torch.cuda.empty_cache()
        results.append(result)
        print_table([result], ctx, header=len(results) == 1)

    rows = evaluate_targets(results, ctx)
    header.update(targets=rows, errors=errors, elapsed_s=round(time.perf_counter() - start, 1),
                  host_bound_samples=ctx.timer.host_bound)
    print("\nSummary")
    print_table(results, ctx)
    print_targets(rows, dry_run)
    path = harness.write_json(args.json or (DRY_RUN_JSON if dry_run else DEFAULT_JSON), header, results)
    print(f"\nwrote {path}  ({header['elapsed_s']} s)")
    if errors:
        print(f"bench_gpu: {len(errors)} case(s) FAILED: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
