"""Benchmark template for the ``torch.ops.fedlora`` CPU kernels (pytorch/ao style).

One frozen :class:`BenchConfig` describes a case at one thread count; one frozen :class:`BenchResult`
holds its timings (median of ``repeats`` runs after warm-up, the variants interleaved round-robin,
inputs built outside the timed region) and what is derived from them: speedups, bytes moved, GB/s
and the fraction of the copy bandwidth measured at the same working-set size. :class:`OtherCpu`
records how much CPU other processes took meanwhile; :func:`print_table` and :func:`write_json`
report it all.

Run the benchmarks from the repository root as ``python benchmarks/<script>.py`` so that
``import fedlora_ext`` resolves to the installed package (see :func:`import_installed_fedlora`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "ops_cpu.json"
GIB = 1 << 30


def import_installed_fedlora():
    """Import ``fedlora_ext`` from site-packages, not from the source tree (which has no ``_C``).

    ``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, not the repo root, but
    ``python -c`` or ``PYTHONPATH=.`` would shadow the installed package; drop those entries first.

    Returns:
        The imported ``fedlora_ext`` module, with its native library loaded.
    """
    shadowing = {"", ".", str(REPO_ROOT)}
    sys.path[:] = [p for p in sys.path if p not in shadowing and Path(p or ".").resolve() != REPO_ROOT]
    import fedlora_ext

    if not fedlora_ext.native_available():
        raise SystemExit(f"fedlora_ext at {fedlora_ext.__file__} has no native library; install the package first")
    return fedlora_ext


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark case at one thread count.

    Attributes:
        op: the ``torch.ops.fedlora`` op, e.g. ``"dp_clip_noise"``.
        case: short case id, unique within the op, e.g. ``"B32"``.
        shapes: human-readable shapes of the inputs.
        threads: ``torch.set_num_threads`` value for the run.
        dtype: input dtype name.
        repeats: timed runs per variant (the median is reported).
        main_bytes: bytes of the case's main input, the size at which copy bandwidth is probed.
        bytes_moved: bytes the op must read + write at least (for GB/s); 0 when not meaningful.
    """

    op: str
    case: str
    shapes: str
    threads: int
    dtype: str = "float32"
    repeats: int = 7
    main_bytes: int = 0
    bytes_moved: int = 0

    @property
    def name(self) -> str:
        return f"{self.op}/{self.case}"


@dataclass(frozen=True)
class BenchResult:
    """Timings of one :class:`BenchConfig` and what follows from them (all times are medians, ms).

    Attributes:
        config: the case.
        fused_ms: the fedlora op.
        twin_ms: its pure-PyTorch twin (``None`` when skipped).
        baselines_ms: every extra baseline by name (``None`` where it failed or was skipped).
        speedup_vs_twin: ``twin_ms / fused_ms``.
        speedups: ``baseline_ms / fused_ms`` per baseline; ``> 1`` means the fused op is faster.
        bytes_moved: see :class:`BenchConfig`.
        gbps: ``bytes_moved / fused time`` in GB/s (1e9 bytes).
        copy_gbps: ``dst.copy_(src)`` bandwidth at ``main_bytes`` (counting read + write).
        frac_copy_bw: ``gbps / copy_gbps``.
        floor_ms: a memory-traffic lower bound for the case, when one is defined.
        floor_ratio: ``fused_ms / floor_ms``.
        other_cores: CPU (in cores) used by other processes while the case ran; near 0 for clean numbers.
        extra: case-specific numbers (ratios, repeats used for slow baselines, ...).
        note: free text (compile failures, skipped baselines, ...).
        samples_ms: every timed run per variant (JSON only), to judge the spread behind a median.
    """

    config: BenchConfig
    fused_ms: float
    twin_ms: float | None = None
    baselines_ms: Mapping[str, float | None] = field(default_factory=dict)
    speedup_vs_twin: float | None = None
    speedups: Mapping[str, float | None] = field(default_factory=dict)
    bytes_moved: int = 0
    gbps: float | None = None
    copy_gbps: float | None = None
    frac_copy_bw: float | None = None
    floor_ms: float | None = None
    floor_ratio: float | None = None
    other_cores: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    samples_ms: Mapping[str, list[float]] = field(default_factory=dict)


def opacus_dp_step(grads: list[torch.Tensor], batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """opacus 1.6 ``DPOptimizer`` over parameters shaped like ``grads[j].shape[1:]``, on their device.

    Returns ``(step, reset)``: ``step`` runs exactly ``clip_and_accumulate(); add_noise(); scale_grad()``
    (flat clipping, mean reduction, noise multiplier 1, max norm 1, expected batch size ``batch``);
    ``reset`` (untimed) clears what the previous step accumulated and re-attaches the per-sample grads.
    """
    from opacus.optimizers import DPOptimizer

    params = [torch.nn.Parameter(torch.zeros(g.shape[1:], device=g.device)) for g in grads]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=batch)

    def reset() -> None:
        for param, g in zip(params, grads):
            param.summed_grad = None
            param.grad = None
            if hasattr(g, "_processed"):
                del g._processed
            param.grad_sample = g

    def step() -> None:
        optimizer.clip_and_accumulate()
        optimizer.add_noise()
        optimizer.scale_grad()

    return step, reset


def max_abs_err(a, b) -> float:
    """Largest absolute difference between two tensors, or two lists of them (0 for empty ones)."""
    if isinstance(a, torch.Tensor):
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return max((max_abs_err(x, y) for x, y in zip(a, b)), default=0.0)


def stacked_delta_inplace_variants(W, Bs, As, w, scale, B_cat, A_cat) -> tuple[dict[str, Callable[[], Any]], float]:
    """What the CPU and GPU benchmarks time for ``stacked_delta_`` (the fused op, its twin, and one
    ``addmm_`` on factors concatenated beforehand), and the op's largest error against the twin,
    checked on copies of ``W`` outside any timed region."""
    from fedlora_ext import ops, reference

    W_f, W_t = W.clone(), W.clone()
    ops.stacked_delta_(W_f, Bs, As, w, scale)
    reference.stacked_delta_(W_t, Bs, As, w, scale)
    err = max_abs_err(W_f, W_t)
    del W_f, W_t
    fns = {
        "fused": lambda: ops.stacked_delta_(W, Bs, As, w, scale),
        "twin": lambda: reference.stacked_delta_(W, Bs, As, w, scale),
        "addmm_(pre-cat)": lambda: W.addmm_(B_cat, A_cat, alpha=scale),
    }
    return fns, err


def make_result(
    config: BenchConfig,
    *,
    fused_ms: float,
    twin_ms: float | None = None,
    baselines_ms: Mapping[str, float | None] | None = None,
    copy_gbps: float | None = None,
    floor_ms: float | None = None,
    extra: Mapping[str, Any] | None = None,
    note: str = "",
    samples_ms: Mapping[str, list[float]] | None = None,
) -> BenchResult:
    """Build a :class:`BenchResult`, deriving the speedups, GB/s and ratios from the timings."""
    baselines_ms = dict(baselines_ms or {})
    speedups = {k: (v / fused_ms if v is not None else None) for k, v in baselines_ms.items()}
    gbps = config.bytes_moved / (fused_ms * 1e-3) / 1e9 if config.bytes_moved else None
    return BenchResult(
        config=config,
        fused_ms=fused_ms,
        twin_ms=twin_ms,
        baselines_ms=baselines_ms,
        speedup_vs_twin=twin_ms / fused_ms if twin_ms is not None else None,
        speedups=speedups,
        bytes_moved=config.bytes_moved,
        gbps=gbps,
        copy_gbps=copy_gbps,
        frac_copy_bw=gbps / copy_gbps if gbps is not None and copy_gbps else None,
        floor_ms=floor_ms,
        floor_ratio=fused_ms / floor_ms if floor_ms else None,
        extra=dict(extra or {}),
        note=note,
        samples_ms={k: [round(v, 4) for v in vs] for k, vs in (samples_ms or {}).items()},
    )


# ---------------------------------------------------------------------------------------------- timing


class CacheFlush:
    """Writes a buffer twice the size of L3 (260 MB here), evicting every input: a cold-cache run."""

    def __init__(self, nbytes: int = 512 << 20):
        self.buffer = torch.empty(nbytes // 4, dtype=torch.float32)
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.buffer.fill_(float(self.count))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    setups: Mapping[str, Callable[[], Any]] | None = None,
    cache: str = "warm",
) -> dict[str, list[float]]:
    """Wall times (ms) of every ``fns[name]()``, the variants run round-robin.

    Round-robin (fused, baseline, copy, fused, baseline, copy, ...) rather than one variant after
    the other: this VM drifts between fast and slow phases lasting seconds, and interleaving puts
    every variant through the same phases, so ratios of medians stay stable from run to run.
    Each timed run is preceded, untimed, by one of two things so that every variant starts from the
    same cache state whatever ran before it:

    * ``cache="warm"`` (default): a run of the same variant, so its own working set is in cache, as
      in back-to-back repeats;
    * ``cache="cold"``: a :class:`CacheFlush`, so its inputs come from memory.

    Args:
        fns: the timed calls by name; their inputs must already exist (build them outside).
        repeats: timed rounds (take :func:`statistics.median` of each list).
        warmup: untimed rounds first (allocator, caches, lazy init).
        setups: per name, called untimed before every run of that variant (e.g. to reset state).
        cache: ``"warm"`` or ``"cold"``, see above.

    Returns:
        ``{name: [ms, ...]}`` with ``repeats`` samples each.
    """
    if cache not in ("warm", "cold"):
        raise ValueError(f"cache must be 'warm' or 'cold', got {cache!r}")
    setups = setups or {}
    flush = CacheFlush() if cache == "cold" else None
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for round_ in range(warmup + max(1, repeats)):
            for name, fn in fns.items():
                setup = setups.get(name)
                if flush is not None:
                    flush()
                elif round_ >= warmup and len(fns) > 1:  # re-warm: another variant ran since our last run
                    if setup is not None:
                        setup()
                    fn()
                if setup is not None:
                    setup()
                start = time.perf_counter_ns()
                fn()
                elapsed = (time.perf_counter_ns() - start) * 1e-6
                if round_ >= warmup:
                    times[name].append(elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_ms(
    fn: Callable[[], Any],
    *,
    repeats: int = 7,
    warmup: int = 2,
    setup: Callable[[], Any] | None = None,
    cache: str = "warm",
) -> float:
    """Median wall time of ``fn()`` in milliseconds: one variant of :func:`time_interleaved`."""
    times = time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, setups={"fn": setup} if setup else None, cache=cache)
    return statistics.median(times["fn"])


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(samples) for name, samples in times.items()}


class CopyProbe:
    """``dst.copy_(src)`` over ``nbytes``: a variant to time next to a case (read + write = 2 x bytes).

    Copy bandwidth depends on the working set (this machine's L2 is 2 MiB per core, L3 260 MB), so
    each case probes at the byte volume of its main input, interleaved with its own timings.
    """

    def __init__(self, nbytes: int):
        numel = max(1, int(nbytes) // 4)
        self.src = torch.ones(numel, dtype=torch.float32)  # filled, so its pages are touched
        self.dst = torch.zeros_like(self.src)
        self.nbytes = numel * 4

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def gbps(self, ms: float) -> float:
        return 2 * self.nbytes / (ms * 1e-3) / 1e9


def copy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Stand-alone copy bandwidth (GB/s, read + write) at ``nbytes`` and the current thread count."""
    probe = CopyProbe(nbytes)
    return probe.gbps(time_ms(probe, repeats=repeats))


class OtherCpu:
    """Cores' worth of CPU used by everything but this process (hypervisor steal included).

    This machine has 2 cores, and a build or test run elsewhere skews the timings, the 2-thread ones
    most. ``start()`` / ``stop()`` bracket a case (``pause()`` / ``resume()`` leave a part out);
    :meth:`wait_for_idle` waits for a quiet window.
    Reads ``/proc/stat`` (Linux); elsewhere every measure is ``None``.
    """

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self):
        self.start()

    @classmethod
    def _sample(cls) -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = os.times()
        mine = own.user + own.system + own.children_user + own.children_system
        return (user + nice + system + irq + softirq + steal) / cls._TICK, mine, time.monotonic()

    def start(self) -> None:
        """Start a fresh measure."""
        self._busy = self._wall = 0.0
        self._mark = self._sample()

    def pause(self) -> None:
        """Leave out what follows (e.g. a torch.compile, whose compiler subprocesses look like others)."""
        end = self._sample()
        if end is not None and self._mark is not None:
            busy, mine, wall = (e - s for e, s in zip(end, self._mark))
            self._busy += busy - mine
            self._wall += wall
        self._mark = None

    def resume(self) -> None:
        self._mark = self._sample()

    def stop(self) -> float | None:
        """Average cores used by others over the measured (not paused) time since :meth:`start`."""
        self.pause()
        return max(0.0, self._busy / self._wall) if self._wall > 0 else None

    def wait_for_idle(self, max_wait_s: float, threshold: float = 0.2, window_s: float = 1.0) -> float | None:
        """Sleep in ``window_s`` windows until others use < ``threshold`` cores or ``max_wait_s`` passes."""
        deadline = time.monotonic() + max_wait_s
        while True:
            self.start()
            time.sleep(window_s)
            other = self.stop()
            if other is None or other < threshold or time.monotonic() >= deadline:
                return other


# ------------------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[BenchResult], file=None, header: bool = True) -> None:
    """Print one block per result: the fused op and twin, then one line per extra baseline.

    Columns: ``fused``/``twin``/``base`` are median ms; ``x`` is ``other_ms / fused_ms`` (> 1: the
    fused op is faster); ``GB/s`` is ``bytes_moved / fused time``; ``%copy`` is that over the copy
    bandwidth at the case's working-set size; ``floor x`` is ``fused_ms / floor_ms``; ``oth`` is the
    CPU (cores) other processes used meanwhile.
    """
    file = file or sys.stdout
    line = (
        f"{'op/case':<28} {'thr':>3} {'fused ms':>10} {'vs':<22} {'ms':>10} {'x':>7} "
        f"{'GB/s':>7} {'%copy':>6} {'floor x':>7} {'oth':>4}  note"
    )
    if header:
        print(line, file=file)
        print("-" * len(line), file=file)
    for r in results:
        c = r.config
        rows = [("twin", r.twin_ms, r.speedup_vs_twin)]
        rows += [(name, ms, r.speedups.get(name)) for name, ms in r.baselines_ms.items()]
        for i, (name, ms, speedup) in enumerate(rows):
            first = i == 0
            print(
                f"{(c.name if first else ''):<28} {(c.threads if first else ''):>3} "
                f"{(_fmt(r.fused_ms, '.3f') if first else ''):>10} {name:<22} {_fmt(ms, '.3f'):>10} "
                f"{_fmt(speedup, '.2f'):>7} "
                f"{(_fmt(r.gbps, '.1f') if first else ''):>7} "
                f"{(_fmt(None if r.frac_copy_bw is None else 100 * r.frac_copy_bw, '.0f') if first else ''):>6} "
                f"{(_fmt(r.floor_ratio, '.2f') if first else ''):>7} "
                f"{(_fmt(r.other_cores, '.1f') if first else ''):>4}  "
                f"{(r.note if first else '')}",
                file=file,
            )
        if r.extra:
            extras = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
            print(f"{'':<28} {'':>3} {'':>10} [{extras}]", file=file)
    file.flush()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def native_library_fingerprint(fedlora_ext) -> dict[str, Any]:
    """Path, size, mtime and sha256 of the loaded ``_C`` library (to catch a rebuild during a run)."""
    path = Path(fedlora_ext._C.__file__)
    try:
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as error:
        return {"path": str(path), "error": str(error)}
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stat.st_mtime)),
        "sha256_16": digest,
    }


def _git_head() -> str | None:
    """The source tree's commit (``+dirty`` with local changes); the installed build may differ."""
    try:
        run = lambda *cmd: subprocess.run(["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# --cpu-path: the environment that makes fedlora's kernels and torch's baselines (ATen's vectorised loops,
# MKL's GEMMs, oneDNN) all run one vector ISA, so an AVX-512 machine also measures what an AVX2 CPU runs.
CPU_PATH_ENV = {
    "avx512": {"FEDLORA_CPU_PATH": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"FEDLORA_CPU_PATH": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "scalar": {"FEDLORA_CPU_PATH": "scalar", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
               "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def add_cpu_path_argument(parser) -> None:
    """``--cpu-path``: which vector code path to measure (see :func:`use_cpu_path`)."""
    parser.add_argument("--cpu-path", choices=("auto", *CPU_PATH_ENV), default="auto",
                        help="vector ISA of fedlora's CPU kernels and of torch's baselines: avx512, avx2 or scalar "
                             "(default auto: the best this CPU runs). Re-runs the script once with that environment.")


def use_cpu_path(path: str) -> None:
    """Make this process run ``path``'s code: the environment of :data:`CPU_PATH_ENV`, set before torch
    reads it, so the script re-executes itself once with it (a no-op for ``auto`` or when already set)."""
    if path == "auto":
        return
    env = CPU_PATH_ENV[path]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def cpu_path_info(fedlora_ext) -> dict[str, Any]:
    """The code paths this run takes: fedlora's CPU kernels, ATen's vectorised loops, MKL's ISA cap."""
    info = fedlora_ext.build_info()
    return {
        "fedlora": info.get("cpu_path", "unknown"),
        "fedlora_supported": info.get("cpu_paths", []),
        "aten": torch.backends.cpu.get_cpu_capability(),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "(best)"),
    }


def describe_cpu(header: Mapping[str, Any]) -> str:
    """One line for a table heading: CPU model, vector extensions, the kernel paths taken."""
    paths = header["cpu_path"]
    return (f"CPU {header['cpu_model']} [{' '.join(header['cpu_flags']) or 'no AVX'}]  kernel path: fedlora "
            f"{paths['fedlora']}, aten {paths['aten']}, mkl {paths['mkl_enable_instructions']}")


def json_for_path(default: Path, path: str) -> Path:
    """The default JSON of a run on ``path``: ``<name>_<path>.json`` beside ``default`` (auto: ``default``)."""
    return default if path == "auto" else default.with_name(f"{default.stem}_{path}{default.suffix}")


def machine_info(fedlora_ext, threads: list[int]) -> dict[str, Any]:
    """Versions, CPU and build facts for the JSON header."""
    info: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "torch_default_threads": torch.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_path": cpu_path_info(fedlora_ext),
        "machine": platform.machine(),
        "fedlora_ext_file": fedlora_ext.__file__,
        "build_info": fedlora_ext.build_info(),
        "native_library": native_library_fingerprint(fedlora_ext),
        "loadavg_start": os.getloadavg(),
        "git_head": _git_head(),
    }
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:
        info["opacus"] = None
    return info


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, BenchConfig):
            out["name"] = obj.name
        return out
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def write_json(path: str | os.PathLike, header: Mapping[str, Any], results: list[BenchResult]) -> Path:
    """Write ``{"header": ..., "results": [...]}`` to ``path`` (parents created) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"header": _jsonable(header), "results": [_jsonable(r) for r in results]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
