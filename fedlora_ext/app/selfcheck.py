"""`fedlora selfcheck`: show how the native library was built and run every op once against its twin.

This is the smoke job of a fresh install: it needs no model or data, finishes in seconds, and exits
non-zero if any op disagrees with its pure-PyTorch twin. The federated CLI builds on these ops.
"""

from __future__ import annotations

import secrets

import torch

import fedlora_ext
from fedlora_ext import ops, reference


def _demo_cases() -> list[tuple[str, float]]:
    """Runs each op and its twin on small random inputs; returns (name, max abs difference)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 8, 64, generator=gen), torch.randn(16, 64, 8, generator=gen)]
    seed, offset = secrets.randbits(63), 0  # a fresh secret seed, as a client would draw it
    outs, norms = ops.dp_clip_noise(grads, 1.0, 1.1, 16.0, seed, offset)
    twin_outs, twin_norms = reference.dp_clip_noise(grads, 1.0, 1.1, 16.0, seed, offset)
    noisy, twin_noisy = torch.zeros(1000), torch.zeros(1000)
    ops.gaussian_noise_([noisy], 0.5, seed, offset + 1)
    reference.gaussian_noise_([twin_noisy], 0.5, seed, offset + 1)

    clients = [torch.randn(64, r, generator=gen) for r in (8, 4, 2)]  # HetLoRA-style ranks
    weights = torch.tensor([0.5, 0.3, 0.2])
    Bs = [torch.randn(64, r, generator=gen) for r in (8, 4, 2)]
    As = [torch.randn(r, 32, generator=gen) for r in (8, 4, 2)]
    W = torch.randn(64, 32, generator=gen)
    twin_W = W.clone()
    ops.stacked_delta_(W, Bs, As, weights, 2.0)
    reference.stacked_delta_(twin_W, Bs, As, weights, 2.0)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.float() - b.float()).abs().max().item()

    return [
        ("per_sample_norms", diff(ops.per_sample_norms(grads), reference.per_sample_norms(grads))),
        ("dp_clip_noise", max(diff(a, b) for a, b in zip(outs + [norms], twin_outs + [twin_norms]))),
        ("gaussian_noise_", diff(noisy, twin_noisy)),
        ("weighted_sum", diff(ops.weighted_sum(clients, weights, 1, 8), reference.weighted_sum(clients, weights, 1, 8))),
        ("stacked_delta", diff(ops.stacked_delta(Bs, As, weights, 2.0), reference.stacked_delta(Bs, As, weights, 2.0))),
        ("stacked_delta_", diff(W, twin_W)),
    ]


def run_selfcheck() -> int:
    """Prints the build and one line per op; returns the process exit code (0: all ops agree)."""
    info = fedlora_ext.build_info()
    print(f"fedlora_ext {fedlora_ext.__version__}: built against torch {info['torch_version']}, "
          f"CUDA kernels: {info['cuda_archs'] if info['cuda'] else 'no'}, "
          f"OpenMP: {info['openmp']} ({info['num_threads']} threads)")
    failures = 0
    for name, error in _demo_cases():
        ok = error < 1e-4
        failures += not ok
        print(f"  {name:<18} max |op - twin| = {error:.2e}  {'ok' if ok else 'MISMATCH'}")
    print("all ops agree with their twins" if not failures else f"{failures} op(s) disagree with their twins")
    return 1 if failures else 0

