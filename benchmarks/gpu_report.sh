#!/usr/bin/env bash
# The GPU report of issue 3 in one command, on a machine with an NVIDIA GPU, a CUDA build of torch and
# nvcc, run from anywhere (it works in the repository this file belongs to):
#
#   bash benchmarks/gpu_report.sh
#
#   build      pip install --no-build-isolation --no-deps --no-index -v <repo> against the installed CUDA
#              torch, for TORCH_CUDA_ARCH_LIST (default: the GPUs present, e.g. "9.0" on an H100 / H200)
#   info       fedlora_ext.build_info(); fails unless the CUDA kernels are compiled in, registered for all
#              six ops and agree with the twin on one call
#   tests-cuda pytest python_tests -m cuda -q
#   tests-all  pytest python_tests -q            (CPU and CUDA)
#   bench      python benchmarks/bench_gpu.py    (table, MET / NOT MET per target, benchmarks/results/ops_gpu.json)
#
# Exits non-zero if the build, the info check, either pytest run or the benchmark script fails; a NOT MET
# target is reported, not a failure. After a failed build or info check nothing else runs.
#
# Environment:
#   PYTHON                the interpreter whose torch is used (default: python3, else python)
#   TORCH_CUDA_ARCH_LIST  e.g. "9.0" or "8.0;9.0+PTX" (default: the compute capabilities of the GPUs present)
#   CUDACXX               nvcc (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#   GPU_REPORT_DIR        where logs and the JSON go (default: benchmarks/results/gpu_report)
#   GPU_REPORT_STEPS      steps to run, in order (default: "build info tests-cuda tests-all bench"); e.g. a
#                         second call on the same machine: GPU_REPORT_STEPS="info tests-all bench"
#   PYTEST_ARGS           extra arguments for both pytest runs (e.g. "-n 8" with pytest-xdist, "-x")
#   BENCH_ARGS            extra arguments for bench_gpu.py (e.g. "--cases dp_clip_noise")
#   PIP_ARGS              extra arguments for pip install (e.g. --break-system-packages on an
#                         externally managed Python; not needed in a virtual environment)
#   GPU_REPORT_DRY_RUN=1  a check of this script's plumbing on a machine without a GPU: a CPU torch is
#                         accepted, the info check does not require CUDA kernels, the cuda tests skip
#                         and the benchmarks run with --device cpu --quick. It measures nothing.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python || true)}"
steps="${GPU_REPORT_STEPS:-build info tests-cuda tests-all bench}"
export GPU_REPORT_DRY_RUN="${GPU_REPORT_DRY_RUN:-0}"
report_dir="${GPU_REPORT_DIR:-$repo/benchmarks/results/gpu_report}"
mkdir -p "$report_dir" && report_dir="$(cd "$report_dir" && pwd)"
# Python runs from an empty directory with absolute paths: a cwd of the repository root would put the
# source tree's fedlora_ext (which has no compiled _C) ahead of the installed one on sys.path.
neutral="$(mktemp -d "${TMPDIR:-/tmp}/fedlora-gpu-report.XXXXXX")"
trap 'rm -rf "$neutral"' EXIT
failures=()
summary=()

say() { printf '\n=== %s\n' "$*"; }
has_step() { [[ " $steps " == *" $1 "* ]]; }
py() { (cd "$neutral" && "$python" "$@"); }

if [[ -z "$python" ]]; then
  echo "gpu_report: no python on PATH (set PYTHON)" >&2
  exit 1
fi

say "environment"
if ! py - <<'EOF'
import os, platform, sys
import torch
dry_run = os.environ["GPU_REPORT_DRY_RUN"] == "1"
print(f"python {platform.python_version()} ({sys.executable})  torch {torch.__version__}  torch CUDA {torch.version.cuda}")
problems = []
if torch.version.cuda is None:
    problems.append("this torch is a CPU build: install a CUDA build of torch first")
elif not torch.cuda.is_available():
    problems.append("torch sees no GPU")
else:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}  capability {p.major}.{p.minor}  {p.multi_processor_count} SMs  {p.total_memory / 2**30:.0f} GiB")
for module in ("pytest", "hypothesis", "scikit_build_core", "pybind11"):
    try:
        __import__(module)
    except ImportError:
        problems.append(f"python module {module} is missing")
try:
    import opacus
    print(f"opacus {opacus.__version__}")
except ImportError:
    print("opacus not installed: bench_gpu.py compares with its pure-torch equivalent, test_opacus_parity skips")
if problems and dry_run:
    print("gpu_report: DRY RUN, going on despite: " + "; ".join(problems))
elif problems:
    sys.exit("gpu_report: " + "; ".join(problems))
EOF
then
  exit 1
fi

if [[ -z "${CUDACXX:-}" ]]; then
  if command -v nvcc >/dev/null; then
    export CUDACXX="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
  fi
fi
echo "nvcc: ${CUDACXX:-not found} $("${CUDACXX:-false}" --version 2>/dev/null | grep -o 'release [0-9.]*' || true)"
echo "cmake: $(cmake --version 2>/dev/null | head -1 || echo 'not on PATH')   ninja: $(ninja --version 2>/dev/null || echo 'not on PATH')"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then  # empty without a GPU: CMakeLists.txt then picks 8.0;9.0
  TORCH_CUDA_ARCH_LIST="$(py -c "import torch; print(';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))")"
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST   steps: $steps   logs: $report_dir"

if has_step build; then
  say "build: pip install --no-build-isolation --no-deps --no-index -v $repo  (log: $report_dir/build.log)"
  [[ -n "${CUDACXX:-}" ]] || echo "gpu_report: nvcc not found; the build would have no CUDA kernels" >&2
  start=$SECONDS
  # shellcheck disable=SC2086  # PIP_ARGS is a list of words
  (cd "$repo" && CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
     "$python" -m pip install --no-build-isolation --no-deps --no-index -v ${PIP_ARGS:-} .) >"$report_dir/build.log" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then
    tail -n 60 "$report_dir/build.log"
    echo "gpu_report: FAILED to build (pip exit $rc after $((SECONDS - start)) s); see $report_dir/build.log" >&2
    exit 1
  fi
  grep -E "CUDA|nvcc|architectures|Successfully installed" "$report_dir/build.log" | grep -v '^ *#' | tail -n 8
  summary+=("build       OK ($((SECONDS - start)) s)")
fi

if has_step info; then
  say "info: fedlora_ext.build_info()"
  if ! py - <<'EOF'
import json, os, sys
import torch
import fedlora_ext
from fedlora_ext import ops, reference

print(f"fedlora_ext {fedlora_ext.__file__}")
if not fedlora_ext.native_available():
    sys.exit("gpu_report: the native library did not load (see the warning above)")
info = fedlora_ext.build_info()
print(json.dumps(info))
ops_ = ("per_sample_norms", "dp_clip_noise", "gaussian_noise_", "weighted_sum", "stacked_delta", "stacked_delta_")
missing = [op for op in ops_ if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fedlora::{op}", "CUDA")]
device = "cpu" if os.environ["GPU_REPORT_DRY_RUN"] == "1" else "cuda"
if device == "cpu":
    print(f"gpu_report: DRY RUN, not requiring CUDA kernels (cuda={info['cuda']}, missing for {missing})")
elif not info["cuda"] or missing:
    sys.exit(f"gpu_report: built without CUDA kernels (cuda={info['cuda']}, no CUDA kernel for {missing or 'any op'}); "
             "is nvcc on PATH or CUDACXX set, and torch a CUDA build?")
xs = [torch.randn(4096, 16, device=device) for _ in range(3)]
w = torch.rand(3, device=device)
err = (ops.weighted_sum(xs, w, 1, 16) - reference.weighted_sum(xs, w, 1, 16)).abs().max().item()
print(f"smoke: weighted_sum on {device} vs twin, max |diff| = {err:.3g}")
if not err < 1e-5:
    sys.exit(f"gpu_report: weighted_sum on {device} disagrees with its twin")
EOF
  then
    echo "gpu_report: FAILED the info check" >&2
    exit 1
  fi
  summary+=("info        OK: $(py -c 'import fedlora_ext, json; print(json.dumps(fedlora_ext.build_info()))')")
fi

run_pytest() {  # name, log file, extra pytest arguments...
  local name=$1 log=$2
  shift 2
  local start=$SECONDS rc
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  py -m pytest "$repo/python_tests" -q -p no:cacheprovider "$@" ${PYTEST_ARGS:-} 2>&1 | tee "$report_dir/$log"
  rc=${PIPESTATUS[0]}
  local last
  last="$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$report_dir/$log" | tail -n 1)"
  if [[ $rc -eq 0 ]]; then
    summary+=("$name OK ($((SECONDS - start)) s): $last")
  else
    summary+=("$name FAILED (pytest exit $rc, $((SECONDS - start)) s): $last")
    failures+=("$name")
  fi
}

if has_step tests-cuda; then
  say "tests-cuda: pytest python_tests -m cuda -q  (log: $report_dir/pytest_cuda.log)"
  run_pytest "tests-cuda " pytest_cuda.log -m cuda
fi

if has_step tests-all; then
  say "tests-all: pytest python_tests -q  (log: $report_dir/pytest_all.log)"
  run_pytest "tests-all  " pytest_all.log
fi

if has_step bench; then
  bench_args="${BENCH_ARGS:-}"
  [[ "$GPU_REPORT_DRY_RUN" == 1 ]] && bench_args="--device cpu --quick $bench_args"
  say "bench: python benchmarks/bench_gpu.py $bench_args (log: $report_dir/bench.log)"
  start=$SECONDS
  # shellcheck disable=SC2086  # bench_args is a list of words
  PYTHONUNBUFFERED=1 py "$repo/benchmarks/bench_gpu.py" --json "$report_dir/ops_gpu.json" $bench_args 2>&1 \
    | tee "$report_dir/bench.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then
    if [[ "$GPU_REPORT_DRY_RUN" != 1 && "$report_dir" != "$repo/benchmarks/results" ]]; then  # the default place too
      mkdir -p "$repo/benchmarks/results" && cp "$report_dir/ops_gpu.json" "$repo/benchmarks/results/ops_gpu.json"
    fi
    counts="$(py -c "import json, sys; rows = json.load(open(sys.argv[1]))['header']['targets']; \
print(f\"{sum(r['met'] is True for r in rows)} MET, {sum(r['met'] is False for r in rows)} NOT MET of {len(rows)} targets\")" \
      "$report_dir/ops_gpu.json")"
    summary+=("bench       OK ($((SECONDS - start)) s): $counts")
  else
    summary+=("bench       FAILED (exit $rc, $((SECONDS - start)) s)")
    failures+=("bench")
  fi
fi

say "GPU report summary (logs and JSON: $report_dir)"
printf '%s\n' "${summary[@]}"
if [[ ${#failures[@]} -gt 0 ]]; then
  echo "gpu_report: FAILED: ${failures[*]}" >&2
  exit 1
fi
[[ "$GPU_REPORT_DRY_RUN" == 1 ]] && echo "gpu_report: DRY RUN (no GPU): the plumbing ran, nothing was measured"
echo "gpu_report: OK"
