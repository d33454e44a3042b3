"""The noise stream (DESIGN.md, "The noise stream"): Philox known answers, the kernels' stream equal to
the twin's, and independence from how a call splits its list, from repetition and from thread count.

Statistical properties (moments, normality, correlation, scaling) are in ``test_noise_statistics.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora_ext import ops, reference
from strategies import STREAM_EDGES, make_tensor

# Random123's kat_vectors for Philox4x32-10: (counter c0..c3, key k0 k1, expected x0..x3).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# (seed, offset) pairs: small, past 32 bits in either word, and at the top of [0, 2^63).
STREAMS = [
    (0, 0), (1, 0), (0, 1), (42, 7),
    (2**32, 2**32 + 5), (2**32 - 1, 2**40 + 3),
    (2**63 - 1, 2**63 - 1), (12345, 2**63 - 2),
]

# CPU kernel vs twin: float32 Box-Muller with ~1-ulp log/sincos vs float64 rounded once.
STREAM_ATOL = 1e-5


def _draw(numel: int, seed: int, offset: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """``numel`` normals of the stream from the op, via ``gaussian_noise_`` on zeros with std 1."""
    x = torch.zeros(numel, device=device, dtype=dtype)
    ops.gaussian_noise_([x], 1.0, seed, offset)
    return x


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_twin_philox_known_answers(counter, key, expected):
    """The twin's Philox4x32-10 reproduces the Random123 known-answer vectors."""
    words = reference.philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w.item()) for w in words) == expected


def test_twin_philox_is_elementwise():
    """A batch of counters gives the same words as one counter at a time (no cross-lane mixing)."""
    counters = [torch.tensor([0, 0xFFFFFFFF, 0x243F6A88]), torch.tensor([0, 0xFFFFFFFF, 0x85A308D3]),
                torch.tensor([0, 0xFFFFFFFF, 0x13198A2E]), torch.tensor([0, 0xFFFFFFFF, 0x03707344])]
    batched = reference.philox4x32_10(counters, (7, 9))
    for i in range(3):
        single = reference.philox4x32_10([c[i : i + 1] for c in counters], (7, 9))
        assert [int(w[i]) for w in batched] == [int(w[0]) for w in single]


@pytest.mark.parametrize("seed, offset", STREAMS)
def test_kernel_stream_equals_twin(device, seed, offset):
    """The op's normals equal ``reference.stream_normals`` to float rounding, for 64-bit seeds/offsets."""
    numel = 4099  # not a multiple of 4: ends in the middle of a Philox block
    expected = reference.stream_normals(seed, offset, numel, device)
    torch.testing.assert_close(_draw(numel, seed, offset, device), expected, rtol=0, atol=STREAM_ATOL)


def test_stream_uses_both_words_of_seed_and_offset(device):
    """Seeds / offsets that differ only in their high 32 bits give different streams."""
    base = _draw(64, 5, 6, device)
    assert not torch.equal(base, _draw(64, 5 + 2**32, 6, device))
    assert not torch.equal(base, _draw(64, 5, 6 + 2**32, device))


def test_twin_stream_layout_matches_design():
    """Element e uses block e // 4: words (x0, x1) give z_{4b}, z_{4b+1}; (x2, x3) give z_{4b+2}, z_{4b+3}."""
    seed, offset, block = 2**33 + 17, 2**35 + 3, 5
    counter = [torch.tensor([v]) for v in (block, 0, offset & 0xFFFFFFFF, offset >> 32)]
    words = reference.philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    u = [((int(w) >> 8) + 1) * 2.0**-24 for w in words]  # uniforms in (0, 1]
    rho01, rho23 = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
    theta01, theta23 = 2 * math.pi * u[1], 2 * math.pi * u[3]
    expected = [
        rho01 * math.cos(theta01), rho01 * math.sin(theta01), rho23 * math.cos(theta23), rho23 * math.sin(theta23)
    ]
    z = reference.stream_normals(seed, offset, 4 * block + 4)
    torch.testing.assert_close(z[4 * block :], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [(1, 1), (3, 5), (5, 3, 7), (4097, 3), (2, 4096, 4099), (130, 0, 131)])
def test_split_list_equals_one_tensor(device, sizes):
    """Noise on ``[a, b, ...]`` equals noise on one tensor of the summed numel, bitwise: the stream
    depends on the flattened index only, not on where tensors (or the kernel's chunks) start."""
    parts = [torch.zeros(n, device=device) for n in sizes]
    ops.gaussian_noise_(parts, 1.0, 77, 88)
    whole = _draw(sum(sizes), 77, 88, device)
    assert torch.equal(torch.cat(parts), whole)


def test_split_list_in_dp_clip_noise(device):
    """dp_clip_noise's noise indexes the flattened outputs too: [B, 3] + [B, 5] equals [B, 8]."""
    grads = [torch.zeros(2, 3, device=device), torch.zeros(2, 5, device=device)]
    split, _ = ops.dp_clip_noise(grads, 1.0, 1.0, 1.0, 31, 32)
    whole, _ = ops.dp_clip_noise([torch.zeros(2, 8, device=device)], 1.0, 1.0, 1.0, 31, 32)
    assert torch.equal(torch.cat(split), whole[0])
    assert torch.equal(whole[0], _draw(8, 31, 32, device))


def test_multi_dim_tensors_use_row_major_order(device):
    """Elements of an n-d (or transposed) tensor take stream indices in logical row-major order."""
    x = torch.zeros(6, 4, device=device).t()  # logical [4, 6], column-major in memory
    ops.gaussian_noise_([x], 1.0, 3, 4)
    assert torch.equal(x.reshape(-1), _draw(24, 3, 4, device))


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**63 - 1, 12)])
def test_same_seed_offset_is_bitwise_identical(device, seed, offset):
    """Repeating a call repeats the noise exactly (reproducible, auditable)."""
    assert torch.equal(_draw(10_001, seed, offset, device), _draw(10_001, seed, offset, device))


def test_noise_independent_of_thread_count(restore_num_threads):
    """1 and 2 intra-op threads give bitwise the same noise and DP step (fixed-order reductions)."""
    grads = [make_tensor([9, 9001], torch.float32, "cpu"), make_tensor([9, 4097], torch.float32, "cpu", seed=1)]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        noise = [torch.zeros(50_001), torch.zeros(7), torch.zeros(9_000)]
        ops.gaussian_noise_(noise, 1.0, 13, 14)
        outs, norms = ops.dp_clip_noise(grads, 1.0, 1.1, 9.0, 13, 15)
        results.append((noise, outs, norms))
    (noise1, outs1, norms1), (noise2, outs2, norms2) = results
    assert all(torch.equal(a, b) for a, b in zip(noise1, noise2))
    assert all(torch.equal(a, b) for a, b in zip(outs1, outs2))
    assert torch.equal(norms1, norms2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_noise_is_the_rounded_stream(device, dtype):
    """On zeros, low-precision noise is the float32 stream rounded once (to within one ulp)."""
    out = _draw(4_000, 5, 6, device, dtype)
    expected = reference.stream_normals(5, 6, 4_000, device)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((out.float() - expected).abs() <= ulp + STREAM_ATOL).all()


def test_stream_edges_are_valid_inputs(device):
    """Every edge seed/offset used by the strategies is accepted by both the op and the twin."""
    for value in STREAM_EDGES:
        torch.testing.assert_close(_draw(5, value, value, device), reference.stream_normals(value, value, 5, device),
                                   rtol=0, atol=STREAM_ATOL)
