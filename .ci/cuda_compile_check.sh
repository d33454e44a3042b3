#!/usr/bin/env bash
# CUDA compile check: compiles csrc/**/*.cu against torch's headers and csrc/cuda_stubs (stand-ins for
# the cuBLAS/cuSPARSE/cuSOLVER headers this toolkit lacks) into the never-linked object library
# fedlora_cuda_compile_check. Works with a CPU torch; needs nvcc, cmake, ninja, torch and pybind11.
#   nvcc:   $CUDACXX, else /usr/local/cuda/bin/nvcc, else nvcc on PATH
#   python: $PYTHON, else python (or python3) on PATH: the interpreter whose torch and pybind11 are used
#   archs:  $TORCH_CUDA_ARCH_LIST, else 9.0 (see CMakeLists.txt)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$python" ]]; then
  echo "cuda_compile_check: no python on PATH (set PYTHON)" >&2
  exit 1
fi

nvcc="${CUDACXX:-}"
if [[ -z "$nvcc" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    nvcc="$(command -v nvcc || true)"
  fi
fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "cuda_compile_check: nvcc not found (set CUDACXX)" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fedlora-cudacheck.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

if ! cmake -S "$repo" -B "$work/build" -G Ninja \
      -DFEDLORA_CUDA_COMPILE_CHECK=ON \
      -DCMAKE_CUDA_COMPILER="$nvcc" \
      -DPython_EXECUTABLE="$python" \
      -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >"$work/configure.log" 2>&1; then
  cat "$work/configure.log" >&2
  echo "cuda_compile_check: FAILED to configure" >&2
  exit 1
fi

if ! cmake --build "$work/build" --target fedlora_cuda_compile_check; then
  echo "cuda_compile_check: FAILED to compile the .cu files" >&2
  exit 1
fi

echo "cuda_compile_check: OK, the .cu files compile with $("$nvcc" --version | grep -o 'release [0-9.]*') ($((SECONDS - start)) s)"
