"""FlexLoRA's and FedSVD's server SVD at LLM shapes: the stacked-factor SVD against a dense SVD.

The sum sum_k w_k B_k A_k of K clients' rank-r factors (m x n, rank <= R = K r) has its SVD computed two
ways: ``fedlora_ext.strategies.lowrank.stacked_svd`` (QR of the stacked factors and an SVD of the
R x R core, float64, never forming the m x n matrix) and ``torch.linalg.svd`` of the dense m x n sum
(float32, and float64 as the accuracy reference; forming the sum is not timed). Times are CPU seconds
of the process by default (``--clock process``: at one thread, what the work costs even on a busy
machine), the stacked path's the median of ``--repeats`` runs. Errors of the stacked
path against the float64 dense SVD: max_i |S_i - S_ref_i| / S_ref_max, and
||U diag(S) Vh - sum||_F / ||sum||_F against the float64 sum.

Cases: one m x n layer (default 4096 x 4096, K = 10, r = 16), and Llama-2-7B's 32 layers x
(q, k, v, o [4096 x 4096], gate, up [11008 x 4096], down [4096 x 11008]): the stacked path runs on
all 224 matrices; the dense SVD on one matrix per shape, its time multiplied by the number of
matrices of that shape (extrapolated, and marked so in the table).

    python benchmarks/bench_svd.py                      # both cases, 1 thread (~10 min on 2 cores)
    python benchmarks/bench_svd.py --skip-llama --m 2048 --n 2048
    python benchmarks/bench_svd.py --threads 2 --json benchmarks/results/svd.json

It times the checkout's ``lowrank.py`` (pure PyTorch, no native library): the source tree is put first
on ``sys.path``.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from fedlora_ext.strategies import lowrank  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "svd_cpu.json"
#: Llama-2-7B's adapted matrices per layer as (name, out m, in n)
LLAMA_7B = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
            ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def client_factors(m: int, n: int, clients: int, rank: int, seed: int):
    """K clients' float32 factors (B_k ~ trained, non-zero) and weights p_k s_k (s = 2: alpha 32, r 16)."""
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, rank, generator=g) / rank ** 0.5 for _ in range(clients)]
    As = [torch.randn(rank, n, generator=g) / n ** 0.5 for _ in range(clients)]
    counts = torch.randint(50, 500, (clients,), generator=g).double()
    return Bs, As, (counts / counts.sum() * 2.0).tolist()


def dense_sum(Bs, As, weights, dtype) -> torch.Tensor:
    return sum(w * (B.to(dtype) @ A.to(dtype)) for w, B, A in zip(weights, Bs, As))


#: what a timing measures: ``process`` = CPU seconds of this process (``time.process_time``; with one
#: thread it is what the computation costs, whatever else the shared machine runs), ``wall`` = elapsed
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["process"]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` runs after one warm-up (none for a single run), and the last result."""
    out = fn() if repeats > 1 else None
    times = []
    for _ in range(repeats):
        started = CLOCK()
        out = fn()
        times.append(CLOCK() - started)
    return statistics.median(times), out


def errors(U, S, Vh, S_ref, exact) -> tuple[float, float]:
    s_err = float((S - S_ref[: S.shape[0]]).abs().max() / S_ref.max())
    w_err = float(torch.linalg.norm((U * S) @ Vh - exact) / torch.linalg.norm(exact))
    return s_err, w_err


def one_layer(m: int, n: int, clients: int, rank: int, repeats: int, dense_repeats: int) -> dict:
    Bs, As, w = client_factors(m, n, clients, rank, seed=0)
    cheap_s, (U, S, Vh) = timed(lambda: lowrank.stacked_svd(Bs, As, w), repeats)
    exact = dense_sum(Bs, As, w, torch.float64)
    f64_s, (_, S_ref, _) = timed(lambda: torch.linalg.svd(exact, full_matrices=False), dense_repeats)
    dense32 = exact.float()
    f32_s, _ = timed(lambda: torch.linalg.svd(dense32, full_matrices=False), dense_repeats)
    s_err, w_err = errors(U, S, Vh, S_ref, exact)
    return {"case": f"{m}x{n}", "m": m, "n": n, "matrices": 1, "K": clients, "r": rank, "stacked_s": cheap_s,
            "dense_f32_s": f32_s, "dense_f64_s": f64_s, "extrapolated": False, "s_rel_err": s_err,
            "update_rel_err": w_err}


def llama(layers: int, clients: int, rank: int, dense_repeats: int) -> dict:
    """The stacked path over every adapted matrix of ``layers`` layers (each timed once, summed); the
    dense SVD and the errors on the first layer's matrix of each distinct shape, times its count."""
    stacked, shapes = 0.0, {}
    for layer in range(layers):
        for j, (name, m, n) in enumerate(LLAMA_7B):
            Bs, As, w = client_factors(m, n, clients, rank, seed=1000 * layer + j)
            started = CLOCK()
            U, S, Vh = lowrank.stacked_svd(Bs, As, w)
            stacked += CLOCK() - started
            shapes.setdefault((m, n), {"count": 0, "example": None})
            shapes[(m, n)]["count"] += 1
            if shapes[(m, n)]["example"] is None:
                shapes[(m, n)]["example"] = (Bs, As, w, U, S, Vh)
    f32_total, f64_total, s_err, w_err, per_shape = 0.0, 0.0, 0.0, 0.0, []
    for (m, n), entry in shapes.items():
        Bs, As, w, U, S, Vh = entry["example"]
        exact = dense_sum(Bs, As, w, torch.float64)
        f64_s, (_, S_ref, _) = timed(lambda: torch.linalg.svd(exact, full_matrices=False), dense_repeats)
        dense32 = exact.float()
        f32_s, _ = timed(lambda: torch.linalg.svd(dense32, full_matrices=False), dense_repeats)
        e_s, e_w = errors(U, S, Vh, S_ref, exact)
        s_err, w_err = max(s_err, e_s), max(w_err, e_w)
        f32_total += entry["count"] * f32_s
        f64_total += entry["count"] * f64_s
        per_shape.append({"m": m, "n": n, "count": entry["count"], "dense_f32_s": f32_s, "dense_f64_s": f64_s,
                          "s_rel_err": e_s, "update_rel_err": e_w})
    return {"case": f"llama-7b x{layers} layers", "matrices": sum(e["count"] for e in shapes.values()), "K": clients,
            "r": rank, "stacked_s": stacked, "dense_f32_s": f32_total, "dense_f64_s": f64_total,
            "extrapolated": True, "s_rel_err": s_err, "update_rel_err": w_err, "per_shape": per_shape}


def print_row(r: dict) -> None:
    mark = "*" if r["extrapolated"] else ""
    print(f"{r['case']:>22} {r['matrices']:>5} {r['K']:>3} {r['r']:>3} {r['stacked_s']:>11.3f} "
          f"{r['dense_f32_s']:>11.2f}{mark:1} {r['dense_f64_s']:>11.2f}{mark:1} "
          f"{r['dense_f32_s'] / r['stacked_s']:>8.0f}x {r['dense_f64_s'] / r['stacked_s']:>8.0f}x "
          f"{r['s_rel_err']:>10.1e} {r['update_rel_err']:>10.1e}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=10, help="K")
    parser.add_argument("--rank", type=int, default=16, help="r of every client")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the stacked path (median)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed runs of each dense SVD (median)")
    parser.add_argument("--llama-layers", type=int, default=32)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="process",
                        help="process: CPU seconds of this process (default; fair on a busy machine at 1 thread); "
                             "wall: elapsed seconds")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    header = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "torch": torch.__version__,
              "threads": args.threads, "clock": args.clock, "cpu_model": cpu_model(), "os_cpu_count": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "lowrank_file": lowrank.__file__}
    print(f"CPU: {header['cpu_model']}; torch {torch.__version__}; {args.threads} thread(s); {args.clock} seconds; "
          f"load average at start {header['loadavg_start'][0]:.2f}")
    print(f"{'case':>22} {'mats':>5} {'K':>3} {'r':>3} {'stacked s':>11} {'dense f32 s':>12} {'dense f64 s':>12} "
          f"{'vs f32':>9} {'vs f64':>9} {'S rel err':>10} {'dW rel err':>10}")
    results = [one_layer(args.m, args.n, args.clients, args.rank, args.repeats, args.dense_repeats)]
    print_row(results[-1])
    if not args.skip_llama:
        results.append(llama(args.llama_layers, args.clients, args.rank, args.dense_repeats))
        print_row(results[-1])
        print("* dense: one matrix per shape timed, multiplied by the number of matrices of that shape")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    header["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
