"""The CUDA kernels (issue 3): against their twins, against the CPU kernels (noise included), under
``torch.library.opcheck`` and ``torch.compile``, on side streams, in bfloat16 within an error budget,
bitwise deterministic, on empty inputs, and rejecting a CPU tensor among CUDA tensors.

Every test is marked ``cuda`` and skips unless a GPU is visible and this build registered the fedlora
CUDA kernels (:func:`conftest.cuda_kernels_available`). On a GPU machine, after a source build against
its CUDA torch (``bash benchmarks/gpu_report.sh`` does both)::

    pytest python_tests/test_cuda.py -q      # this file;  pytest python_tests -m cuda -q: every cuda test

``FEDLORA_CUDA_TESTS_ON_CPU=1`` runs the tests that do not need a real GPU with ``"cpu"`` in place of
``"cuda"``: a check of this file's own code on a machine without a GPU, which proves nothing about the
CUDA kernels (CPU is compared with CPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import strategies as S
import test_dp_clip_noise
import test_dp_clip_noise_with_sum
import test_gaussian_noise
import test_per_sample_norms
import test_stacked_delta
import test_weighted_sum
from budget import ABS_FLOOR, MAX_ABS_NORMAL, eps, max_abs
from conftest import cuda_kernels_available
from fedlora_ext import ops, reference
from strategies import make_tensor, sample_inputs

ON_CPU = os.environ.get("FEDLORA_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (ON_CPU or cuda_kernels_available()), reason="no GPU or no fedlora CUDA kernels"),
]
real_cuda = pytest.mark.skipif(ON_CPU, reason="needs a real GPU (FEDLORA_CUDA_TESTS_ON_CPU=1 dry run)")

ERRORS = (RuntimeError, ValueError)
F32 = torch.float32
STREAM_ATOL = 1e-5  # |kernel normal - twin normal| (test_noise.py); CPU vs CUDA: to float rounding
SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep: tens of milliseconds on any current GPU

# The twin checks of the per-op test files (error budgets included), by op: each takes the op's arguments.
CHECKS = {
    "per_sample_norms": test_per_sample_norms._check,
    "dp_clip_noise": test_dp_clip_noise._check,
    "dp_clip_noise_with_sum": test_dp_clip_noise_with_sum._check,
    "gaussian_noise_": test_gaussian_noise._check,
    "weighted_sum": test_weighted_sum._check,
    "stacked_delta": test_stacked_delta._check,
    "stacked_delta_": test_stacked_delta._check_inplace,
}
INPUTS = {
    "per_sample_norms": S.per_sample_norms_inputs,
    "dp_clip_noise": S.dp_clip_noise_inputs,
    "dp_clip_noise_with_sum": S.dp_clip_noise_inputs,
    "gaussian_noise_": S.gaussian_noise_inputs,
    "weighted_sum": S.weighted_sum_inputs,
    "stacked_delta": S.stacked_delta_inputs,
    "stacked_delta_": S.stacked_delta_inplace_inputs,
}


# ------------------------------------------------------------------------------------------- helpers


def large_inputs(op: str, dtype: torch.dtype, device: str) -> list[tuple]:
    """Argument tuples at sizes that take the kernels' vectorised paths (16-byte loads, 4-element Philox
    blocks, FedAvg's flat view, many column chunks), with a strided tensor in each."""

    def t(shape, layout="contiguous", seed=0, scale=1.0):
        return make_tensor(shape, dtype, device, layout=layout, seed=seed, scale=scale)

    def w(shape, seed):
        return make_tensor(shape, F32, device, seed=seed)

    if op in ("per_sample_norms", "dp_clip_noise", "dp_clip_noise_with_sum"):
        grads = [t([32, 8, 1024], seed=1, scale=0.05), t([32, 1024, 8], seed=2, scale=0.05),
                 t([32, 4097], "sliced", seed=3, scale=0.05), t([32, 3, 5], "transposed", seed=4)]
        return [(grads,)] if op == "per_sample_norms" else [(grads, 1.0, 1.1, 32.0, 2**40 + 3, 17)]
    if op == "gaussian_noise_":
        return [([t([1024, 1024]), t([4097], seed=1), t([64, 33], "transposed", seed=2)], 0.5, 99, 2**33)]
    if op == "weighted_sum":
        return [
            ([t([4096, 16], seed=k) for k in range(8)], w([8], 9).abs() / 8, 1, 16),  # FedAvg B factors
            ([t([16, 4096]), t([8, 4096], seed=1), t([4, 4096], "sliced", seed=2)], w([3, 16], 3), 0, 16),  # LoRA-A2
            ([t([4096, 16]), t([4096, 8], "transposed", seed=1)], w([2], 4), -1, 16),  # HetLoRA padding
        ]
    Bs = [t([512, 8], seed=1), t([512, 8], seed=2), t([512, 16], "transposed", seed=3)]
    As = [t([8, 384], seed=4), t([8, 384], "sliced", seed=5), t([16, 384], seed=6)]
    weights = w([3], 7)
    if op == "stacked_delta":
        return [(Bs, As, weights, 2.0)]
    return [(t([512, 384], seed=8), Bs, As, weights, 2.0, False),
            (t([384, 512], "transposed", seed=9), Bs, As, weights, -0.5, True)]


def tensors_of(args) -> list[torch.Tensor]:
    """Every tensor in a (nested) argument tuple, in order."""
    if isinstance(args, torch.Tensor):
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in tensors_of(a)]
    return []


def mirror(x, device: str):
    """A copy of ``x`` (a tensor or nested lists / tuples of them) on ``device`` with the same sizes,
    strides and offset into its own storage, so transposed and sliced views stay what they were."""
    if isinstance(x, (list, tuple)):
        return type(x)(mirror(v, device) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    base = x._base if x._base is not None else x
    if not base.is_contiguous():
        return x.clone().to(device)
    moved = base.detach().clone().to(device)
    return moved.as_strided(x.size(), x.stride(), x.storage_offset() - base.storage_offset())


def clone_args(args):
    """A copy of ``args`` on the device they are on, layouts kept (for in-place ops and repeated calls)."""
    tensors = tensors_of(args)
    return mirror(args, tensors[0].device if tensors else "cpu")


def run(op: str, args) -> list[torch.Tensor]:
    """Call ``op``; return what it produced: outputs (norms last), or the tensors an in-place op wrote."""
    fn = getattr(ops, op)
    if op == "gaussian_noise_":
        fn(*args)
        return list(args[0])
    if op == "stacked_delta_":
        fn(*args)
        return [args[0]]
    out = fn(*args)
    if op == "dp_clip_noise":
        return [*out[0], out[1]]
    if op == "dp_clip_noise_with_sum":
        return [*out[0], *out[1], out[2]]
    return [out]


def _width(grads) -> int:
    return sum(g.shape[1:].numel() for g in grads)


def bounds(op: str, args) -> list[tuple[float, int, float]]:
    """Per tensor :func:`run` returns: (magnitude of its summed terms, number of terms, noise std)."""
    if op == "per_sample_norms":
        norms = reference.per_sample_norms([g.float() for g in args[0]])
        return [(max_abs(norms), _width(args[0]), 0.0)]
    if op in ("dp_clip_noise", "dp_clip_noise_with_sum"):
        grads, max_norm, sigma, denominator = args[:4]
        abs_outs, norms = reference.dp_clip_noise([g.float().abs() for g in grads], max_norm, 0.0, denominator, 0, 0)
        noise = sigma * max_norm / denominator
        terms = grads[0].shape[0] + _width(grads) + 1
        outs = [(max_abs(o) + noise * MAX_ABS_NORMAL, terms, noise) for o in abs_outs]
        sums = [(max_abs(o) * denominator, terms, 0.0) for o in abs_outs] if op == "dp_clip_noise_with_sum" else []
        return outs + sums + [(max_abs(norms), _width(grads), 0.0)]
    if op == "gaussian_noise_":
        return [(max_abs(x) + args[1] * MAX_ABS_NORMAL, 2, args[1]) for x in args[0]]
    if op == "weighted_sum":
        xs, weights, rank_dim, out_rank = args
        abs_sum = reference.weighted_sum([x.float().abs() for x in xs], weights.abs(), rank_dim, out_rank)
        return [(max_abs(abs_sum), len(xs), 0.0)]
    if op == "stacked_delta":
        Bs, As, weights, scale = args
        return [(test_stacked_delta._magnitude(Bs, As, weights, scale), sum(B.shape[1] for B in Bs) + 1, 0.0)]
    W, Bs, As, weights, scale, _ = args
    magnitude = max_abs(W) + test_stacked_delta._magnitude(Bs, As, weights, scale)
    return [(magnitude, sum(B.shape[1] for B in Bs) + 2, 0.0)]


def assert_devices_agree(op: str, args_cpu) -> None:
    """``op`` on a :func:`mirror` of ``args_cpu`` on DEVICE equals ``op`` on the CPU to float rounding.

    Both kernels accumulate in float32 and draw the same noise stream, so they differ by summation
    order (``terms`` float32 roundings of the magnitude), the normals' last bits (``STREAM_ATOL`` per
    unit of noise std) and, in low precision, the final rounding (one or two output ulps).
    """
    limits = bounds(op, args_cpu)  # before an in-place op writes its inputs
    args_dev = mirror(args_cpu, DEVICE)
    out_cpu, out_dev = run(op, args_cpu), run(op, args_dev)
    assert len(out_cpu) == len(out_dev) == len(limits)
    for j, (c, d, (magnitude, terms, noise)) in enumerate(zip(out_cpu, out_dev, limits)):
        assert d.device.type == DEVICE and d.shape == c.shape and d.dtype == c.dtype, (j, d.shape, d.dtype)
        low = 0.0 if c.dtype == F32 else 2.0 * eps(c.dtype)
        tol = (low + 2 * terms * eps(F32)) * magnitude + STREAM_ATOL * noise + ABS_FLOOR[F32]
        err = max_abs(d.cpu().double() - c.double())
        assert err <= tol, f"{op} output {j}: |{DEVICE} - cpu| = {err:.3g} > {tol:.3g} (magnitude {magnitude:.3g})"


def stream_slice(seed: int, offset: int, start: int, count: int, device) -> torch.Tensor:
    """Normals ``z_start .. z_{start+count-1}`` of the stream (DESIGN.md), ``start % 4 == 0``, from the
    twin's Philox and the same Box-Muller as :func:`reference.stream_normals` (which starts at 0)."""
    assert start % 4 == 0
    mask = 0xFFFFFFFF
    groups = torch.arange(start // 4, (start + count + 3) // 4, dtype=torch.int64, device=device)
    counter = (groups & mask, groups >> 32, torch.full_like(groups, offset & mask), torch.full_like(groups, offset >> 32))
    u0, u1, u2, u3 = (((x >> 8) + 1).double() * 2.0**-24 for x in reference.philox4x32_10(counter, (seed & mask, seed >> 32)))
    rho01, rho23 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    z = torch.stack([rho01 * torch.cos(2 * math.pi * u1), rho01 * torch.sin(2 * math.pi * u1),
                     rho23 * torch.cos(2 * math.pi * u3), rho23 * torch.sin(2 * math.pi * u3)], dim=1)
    return z.reshape(-1)[:count].float()


# ------------------------------------------------------------------------------------ against the twin


@pytest.mark.parametrize("op", S.OPS)
@given(data=st.data())
def test_matches_twin(op, dtype, data):
    """Random shapes, layouts and scalars on CUDA, within the per-op error budgets (bfloat16 and float16:
    at most 2x plain PyTorch's error in that dtype against a float32 reference, budget.py)."""
    CHECKS[op](*data.draw(INPUTS[op](dtype, DEVICE)))


@pytest.mark.parametrize("op", S.OPS)
def test_samples_match_twin(op):
    """The fixed opcheck samples (every dtype, a strided input, an edge case each)."""
    for args in sample_inputs(op, DEVICE):
        if op.startswith("dp_clip_noise") and args[0][0].shape[0] == 0:
            continue  # B = 0 is pure noise: test_empty_batch_is_pure_noise_equal_to_cpu
        CHECKS[op](*args)


@pytest.mark.parametrize("op", S.OPS)
def test_large_inputs_within_budget(op, dtype):
    """Vectorised paths at LoRA sizes, in float32, bfloat16 and float16, within the error budget."""
    for args in large_inputs(op, dtype, DEVICE):
        CHECKS[op](*args)


# ------------------------------------------------------------------------------------ against the CPU


@pytest.mark.parametrize("op", S.OPS)
@given(data=st.data())
def test_cuda_equals_cpu(op, dtype, data):
    """The same inputs (same values and memory layouts) on CUDA and CPU give the same results to float
    rounding, noise included: one noise stream for both devices."""
    assert_devices_agree(op, data.draw(INPUTS[op](dtype, "cpu")))


@pytest.mark.parametrize("op", S.OPS)
def test_large_inputs_cuda_equals_cpu(op, dtype):
    for args in large_inputs(op, dtype, "cpu"):
        assert_devices_agree(op, args)


@pytest.mark.parametrize("seed, offset", [(0, 0), (42, 7), (2**32 - 1, 2**40 + 3), (2**63 - 1, 2**63 - 1)])
def test_noise_equals_cpu_noise(seed, offset):
    """gaussian_noise_ and dp_clip_noise draw the same normals on CUDA and CPU: |difference| <= 1e-5 x
    the noise scale, for odd sizes whose tensors start mid Philox block and a 1M-element tensor."""
    sizes, std = (1, 3, 4097, (1 << 20) + 3, 5), 2.0
    on_cpu = [torch.zeros(n) for n in sizes]
    on_dev = [torch.zeros(n, device=DEVICE) for n in sizes]
    ops.gaussian_noise_(on_cpu, std, seed, offset)
    ops.gaussian_noise_(on_dev, std, seed, offset)
    for c, d in zip(on_cpu, on_dev):
        torch.testing.assert_close(d.cpu(), c, rtol=0, atol=STREAM_ATOL * std)

    grads = [torch.zeros(3, 4099), torch.zeros(3, 2, 5)]  # zero grads: the outputs are the noise alone
    (cpu_a, cpu_b, _), (dev_a, dev_b, _) = (run("dp_clip_noise", (g, 0.5, 1.3, 4.0, seed, offset))
                                            for g in (grads, mirror(grads, DEVICE)))
    scale = 0.5 * 1.3 / 4.0
    torch.testing.assert_close(dev_a.cpu(), cpu_a, rtol=0, atol=STREAM_ATOL * scale)
    torch.testing.assert_close(dev_b.cpu(), cpu_b, rtol=0, atol=STREAM_ATOL * scale)


# ------------------------------------------------------------------------------------ dispatcher


@pytest.mark.parametrize("op", S.OPS)
def test_opcheck(op):
    """opcheck's default tests (schema, fake vs kernel, autograd registration, AOT dispatch with
    dynamic shapes) on the samples and on float32 inputs that take the vectorised paths."""
    overload = getattr(torch.ops.fedlora, op).default
    for args in sample_inputs(op, DEVICE) + large_inputs(op, F32, DEVICE)[:1]:
        torch.library.opcheck(overload, args)


def _dp_and_aggregation_step(params, grads, clients, weights, W, Bs, As, merge_weights):
    """A client DP-SGD step and a server aggregation, with generated pointwise kernels between the ops."""
    outs, norms = ops.dp_clip_noise(grads, 1.0, 1.1, 8.0, 7, 8)
    updated = [p - 0.05 * g for p, g in zip(params, outs)]
    ops.gaussian_noise_(updated, 0.01, 7, 9)  # in place on intermediates
    avg = ops.weighted_sum(clients, weights, 1, 16) * 0.5
    ops.stacked_delta_(W, Bs, As, merge_weights, 0.25)
    per_sample = ops.per_sample_norms(grads)
    delta = ops.stacked_delta(Bs, As, merge_weights, 2.0)
    return updated, norms, avg, per_sample, delta


def _step_inputs(batch: int):
    t = lambda shape, seed: make_tensor(shape, F32, DEVICE, seed=seed)  # noqa: E731
    params = [t([8, 64], 1), t([64, 8], 2)]
    grads = [t([batch, 8, 64], 3), t([batch, 64, 8], 4)]
    clients = [t([64, 16], 5), t([64, 8], 6), t([64, 16], 7)]
    factors = ([t([64, 4], 8), t([64, 4], 9)], [t([4, 32], 10), t([4, 32], 11)])
    return params, grads, clients, t([3], 12), t([64, 32], 13), *factors, t([2], 14)


@pytest.mark.parametrize("batch", [8, 5])
def test_compile_fullgraph(batch):
    """torch.compile(fullgraph=True) traces all six ops with generated kernels around them (recompiling
    for a second batch size) and gives the eager results: ops bitwise, fused pointwise math to 1 ulp."""
    torch._dynamo.reset()
    eager_in, compiled_in = _step_inputs(batch), _step_inputs(batch)
    eager = _dp_and_aggregation_step(*eager_in)
    compiled = torch.compile(_dp_and_aggregation_step, fullgraph=True)(*compiled_in)
    for e, c in zip(eager[0], compiled[0]):
        torch.testing.assert_close(c, e, rtol=2e-6, atol=1e-6)  # p - lr * g may fuse into an FMA
    for e, c in zip(eager[1:], compiled[1:]):
        torch.testing.assert_close(c, e, rtol=2e-6, atol=1e-6)
    assert torch.equal(eager_in[4], compiled_in[4]), "stacked_delta_'s write to W differs"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ streams, syncs


@real_cuda
@pytest.mark.parametrize("op", S.OPS)
def test_side_stream_orders_after_its_producer(op):
    """On a non-default stream, an op runs after the work queued before it on that stream: its inputs
    are written there by a copy that a GPU sleep delays; an op launched on another stream would read
    the zeros. The results equal the same call on the default stream, bitwise."""
    args = large_inputs(op, F32, DEVICE)[0]
    expected = run(op, clone_args(args))
    dst = clone_args(args)
    for t in tensors_of(dst):
        t.zero_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for d, s in zip(tensors_of(dst), tensors_of(args)):
            d.copy_(s)
        got = run(op, dst)
        consumed = [g.clone() for g in got]  # a consumer queued after the op on the same stream
    side.synchronize()
    for j, (e, g, c) in enumerate(zip(expected, got, consumed)):
        assert torch.equal(g, e), f"{op} output {j} on the side stream differs"
        assert torch.equal(c, e), f"{op} output {j} read after the op on its stream differs"


@real_cuda
@pytest.mark.parametrize("op", S.OPS)
def test_no_host_synchronisation(op):
    """The host code never waits for the GPU (descriptor tables go up by async copies from pinned
    memory): torch's sync debug mode raises on any synchronising call."""
    args = large_inputs(op, F32, DEVICE)[0]
    run(op, clone_args(args))  # first-call initialisation (cuBLAS handles, pinned pool) outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(op, args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@real_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("op", S.OPS)
def test_second_gpu_while_first_is_current(op):
    """Tensors on cuda:1 with cuda:0 current: the device guard puts the work and outputs on cuda:1."""
    args0 = large_inputs(op, F32, "cuda:0")[0]
    args1 = mirror(args0, "cuda:1")
    with torch.cuda.device(0):
        out0, out1 = run(op, args0), run(op, args1)
    for a, b in zip(out0, out1):
        assert b.device == torch.device("cuda:1")
        assert torch.equal(a.cpu(), b.cpu())


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("op", S.OPS)
def test_bitwise_deterministic(op, dtype):
    """The same call twice gives bitwise the same results (fixed-order reductions, no float atomics)."""
    cases = large_inputs(op, dtype, DEVICE) + (sample_inputs(op, DEVICE) if dtype == F32 else [])
    for args in cases:
        first, second = run(op, clone_args(args)), run(op, clone_args(args))
        for j, (a, b) in enumerate(zip(first, second, strict=True)):
            assert torch.equal(a, b), f"{op} output {j} differs between two identical calls"


# ------------------------------------------------------------------------------------ empty inputs


def test_empty_batch_is_pure_noise_equal_to_cpu(dtype):
    """B = 0: empty norms, outputs ``noise_multiplier * max_norm * z / denominator`` as on the CPU."""
    grads = [make_tensor([0, 3, 4], dtype, "cpu"), make_tensor([0, 5], dtype, "cpu")]
    assert_devices_agree("dp_clip_noise", (grads, 2.0, 1.5, 8.0, 21, 22))
    outs, norms = ops.dp_clip_noise(mirror(grads, DEVICE), 2.0, 0.0, 8.0, 21, 22)
    assert norms.shape == (0,) and norms.device.type == DEVICE
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outs)
    assert ops.per_sample_norms(mirror(grads, DEVICE)).shape == (0,)


def test_zero_sized_tensors(dtype):
    """Zero-width gradients, zero-element noise targets, out_rank 0, rank-0 factors, m = 0 and K = 0."""
    z = lambda *shape: torch.zeros(shape, dtype=dtype, device=DEVICE)  # noqa: E731
    ones = lambda k: torch.ones(k, device=DEVICE)  # noqa: E731
    outs, norms = ops.dp_clip_noise([z(4, 0), z(4, 3, 0)], 1.0, 1.0, 4.0, 1, 2)
    assert [o.shape for o in outs] == [(0,), (3, 0)] and torch.equal(norms, torch.zeros(4, device=DEVICE))

    parts = [z(5), z(0, 3), z(6)]
    ops.gaussian_noise_(parts, 1.0, 9, 10)
    whole = z(11)
    ops.gaussian_noise_([whole], 1.0, 9, 10)
    assert torch.equal(torch.cat([parts[0], parts[2]]), whole), "an empty tensor took stream elements"
    ops.gaussian_noise_([], 1.0, 0, 0)
    ops.gaussian_noise_([z(0)], 1.0, 0, 0)

    assert ops.weighted_sum([z(7, 0)], ones(1), 1, 0).shape == (7, 0)
    assert ops.weighted_sum([z(0, 4), z(0, 2)], ones(2), 1, 4).shape == (0, 4)
    assert torch.equal(ops.stacked_delta([z(5, 0)], [z(0, 3)], ones(1), 2.0), z(5, 3))
    assert ops.stacked_delta([z(0, 2)], [z(2, 3)], ones(1), 2.0).shape == (0, 3)
    W = make_tensor([5, 3], dtype, DEVICE)
    before = W.clone()
    ops.stacked_delta_(W, [], [], torch.zeros(0, device=DEVICE), 1.0)
    ops.stacked_delta_(W, [z(5, 0)], [z(0, 3)], ones(1), 1.0)
    assert torch.equal(W, before)


# ------------------------------------------------------------------------------------ device mismatch


def _c(*shape):
    return torch.randn(shape, device="cuda")


def _h(*shape):
    return torch.randn(shape)


def _wc(k):
    return torch.ones(k, device="cuda")


MISMATCH = [
    pytest.param(lambda: ops.per_sample_norms([_c(3, 4), _h(3, 4)]), r"per_sample_grads\[1\] is on cpu", id="norms"),
    pytest.param(lambda: ops.per_sample_norms([_h(3, 4), _c(3, 4)]),
                 r"per_sample_grads\[1\] is on cuda.*like per_sample_grads\[0\]", id="norms_cpu_first"),
    pytest.param(lambda: ops.dp_clip_noise([_c(3, 4), _c(3, 2), _h(3, 5)], 1.0, 1.0, 1.0, 0, 0),
                 r"per_sample_grads\[2\] is on cpu", id="dp"),
    pytest.param(lambda: ops.gaussian_noise_([_c(4), _h(4)], 1.0, 0, 0), r"tensors\[1\] is on cpu", id="noise"),
    pytest.param(lambda: ops.weighted_sum([_c(3, 2), _h(3, 2)], _wc(2), 1, 2), r"xs\[1\] is on cpu", id="ws_xs"),
    pytest.param(lambda: ops.weighted_sum([_c(3, 2), _c(3, 2)], torch.ones(2), 1, 2), r"weights is on cpu",
                 id="ws_weights"),
    pytest.param(lambda: ops.stacked_delta([_c(5, 2), _h(5, 2)], [_c(2, 7), _c(2, 7)], _wc(2), 1.0),
                 r"Bs\[1\] is on cpu", id="sd_Bs"),
    pytest.param(lambda: ops.stacked_delta([_c(5, 2), _c(5, 2)], [_c(2, 7), _h(2, 7)], _wc(2), 1.0),
                 r"As\[1\] is on cpu", id="sd_As"),
    pytest.param(lambda: ops.stacked_delta([_c(5, 2)], [_c(2, 7)], torch.ones(1), 1.0), r"weights is on cpu",
                 id="sd_weights"),
    pytest.param(lambda: ops.stacked_delta_(_h(5, 7), [_c(5, 2)], [_c(2, 7)], _wc(1), 1.0), r"W is on cpu",
                 id="sdi_W"),
    pytest.param(lambda: ops.stacked_delta_(_c(5, 7), [_c(5, 2)], [_h(2, 7)], _wc(1), 1.0), r"As\[0\] is on cpu",
                 id="sdi_As"),
    pytest.param(lambda: ops.stacked_delta_(_c(5, 7), [_c(5, 2)], [_c(2, 7)], torch.ones(1), 1.0),
                 r"weights is on cpu", id="sdi_weights"),
]


@real_cuda
@pytest.mark.parametrize("call, match", MISMATCH)
def test_cpu_tensor_among_cuda_tensors_raises_naming_it(call, match):
    """DESIGN.md: all tensors of a call on one device; a stray CPU tensor is named in the error."""
    with pytest.raises(ERRORS, match=match):
        call()
    torch.cuda.synchronize()  # and the context is still usable


# ------------------------------------------------------------------------------------ int64 indexing


def _need_free_gib(gib: float) -> None:
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


@real_cuda
def test_noise_past_two_to_the_31_elements():
    """Stream indices and element offsets above 2^31 (int64 indexing): a 2^31 + 1000 element bfloat16
    tensor and a tensor after it get the normals of the stream at those indices."""
    _need_free_gib(6)
    n, seed, offset = 2**31 + 1000, 2**33 + 5, 77
    big, after = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE), torch.zeros(9, dtype=torch.bfloat16, device=DEVICE)
    ops.gaussian_noise_([big, after], 1.0, seed, offset)
    tail = 4096
    expected = stream_slice(seed, offset, n - tail, tail + 9, DEVICE)
    got = torch.cat([big[n - tail:], after]).float()
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs()
    assert ((got - expected).abs() <= ulp + STREAM_ATOL).all()
    del big


@real_cuda
def test_dp_clip_noise_past_two_to_the_31_elements():
    """Per-sample rows that start beyond 2^31 elements (int64 row offsets): B = 3 bfloat16 rows of
    2^30 + 6 constant values, then the noise at the end of the output."""
    _need_free_gib(14)
    width = 2**30 + 6
    grads = torch.empty(3, width, dtype=torch.bfloat16, device=DEVICE)
    for i, v in enumerate((2.0**-10, 2.0**-11, 2.0**-11)):
        grads[i].fill_(v)
    outs, norms = ops.dp_clip_noise([grads], 1.0, 0.0, 1.0, 0, 0)
    expected_norms = torch.tensor([2.0**-10, 2.0**-11, 2.0**-11], device=DEVICE) * math.sqrt(width)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=0)
    clip = (1.0 / (expected_norms.double() + 1e-6)).clamp(max=1.0)
    value = (clip * torch.tensor([2.0**-10, 2.0**-11, 2.0**-11], device=DEVICE, dtype=torch.float64)).sum().item()
    assert not (outs[0] != outs[0][0]).any(), "the clipped sum of constant rows is not constant"
    assert abs(outs[0][-1].item() - value) <= 2 * torch.finfo(torch.bfloat16).eps * abs(value)
    del outs
    noisy, _ = ops.dp_clip_noise([grads], 1.0, 1.0, 1.0, 3, 4)
    tail = 1024
    z = stream_slice(3, 4, width - tail - 2, tail + 2, DEVICE)[2:]  # width - tail is not a multiple of 4
    got = noisy[0][-tail:].float() - value
    assert ((got - z).abs() <= torch.finfo(torch.bfloat16).eps * (z.abs() + abs(value)) + STREAM_ATOL).all()
