"""Fuzzing the six ``torch.ops.fedlora`` ops with hypothesis: valid calls against their twins, and
malformed calls that must either raise cleanly or return exactly what the twin returns.

Per op there are two properties. ``test_<op>_valid`` draws valid calls from ``strategies.py`` (every
dtype, empty and size-1 dims, odd sizes, transposed / sliced / permuted / offset / zero-stride views,
K = 1, rank 0) and checks them with the op's own ``_check`` from its twin test module, so the
tolerances are exactly those tests' error budgets. ``test_<op>_malformed`` corrupts a valid call in one
drawn way (a ``Case.kind``: bad dtype, mixed dtypes, a meta tensor among CPU ones, wrong ranks, sizes
or scalars, empty lists, NaN / Inf / huge values, aliasing views for the in-place ops) and calls the op
through its wrapper or straight through ``torch.ops.fedlora``. A call the contract rejects must raise
RuntimeError / ValueError naming the argument; a call with odd values must behave like the twin (same
NaN / Inf pattern, finite values within the dtype's rounding), or raise where the twin raises too.
Divergences found here are kept as minimal ``xfail(strict=True)`` reproducers at the end of the file.

Budget: CI runs a few dozen examples per test. The full budget (>= 1,000 valid and >= 1,000 malformed
calls per op, a few minutes on 2 cores)::

    FEDLORA_FUZZ=full pytest python_tests/test_fuzz_ops.py

``FEDLORA_FUZZ_REPORT=/path.json`` additionally writes how many examples each test executed (per op:
valid calls by dtype, malformed calls by kind and by outcome, raised or returned).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from budget import ABS_FLOOR, MAX_ABS_NORMAL, eps
from conftest import cuda_kernels_available
from fedlora_ext import ops, reference
from strategies import (
    dp_clip_noise_inputs,
    gaussian_noise_inputs,
    make_tensor,
    per_sample_norms_inputs,
    stacked_delta_inplace_inputs,
    stacked_delta_inputs,
    tensors,
    weighted_sum_inputs,
)
from test_dp_clip_noise import _check as check_dp_clip_noise
from test_dp_clip_noise_with_sum import _check as check_dp_clip_noise_with_sum
from test_gaussian_noise import _check as check_gaussian_noise
from test_noise import STREAM_ATOL
from test_per_sample_norms import _check as check_per_sample_norms
from test_stacked_delta import _check as check_stacked_delta
from test_stacked_delta import _check_inplace as check_stacked_delta_inplace
from test_weighted_sum import _check as check_weighted_sum

FULL = os.environ.get("FEDLORA_FUZZ") == "full"
REPORT_PATH = os.environ.get("FEDLORA_FUZZ_REPORT")
# CI: derandomized, so a green CI run stays green; the full run explores new inputs every time.
FUZZ = settings(
    max_examples=1000 if FULL else 50,
    deadline=None,
    derandomize=not FULL,
    database=None if not FULL else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)

COUNTS: dict[str, Counter] = defaultdict(Counter)  # op -> executed examples, by category
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
dtypes = st.sampled_from(DTYPES)
devices = st.sampled_from(["cpu"] + (["cuda"] if cuda_kernels_available() else []))
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)  # a clean failure (NotImplementedError included)
CONTRACT_ERRORS = (RuntimeError, ValueError)  # what DESIGN.md promises for a named violation
BAD_DTYPES = (torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64)
SPECIALS = (math.nan, math.inf, -math.inf, 1e30, -1e30, 65504.0, -65504.0)  # 65504: float16 max
FINITE_SPECIALS = (1e30, -1e30, 65504.0, -65504.0)
RAISE, TWIN, EITHER = "raise", "twin", "raise or twin"
MORE_VALUES, MORE_ALIAS = ("values",) * 2, ("alias",) * 2  # drawn 3x as often: where divergences hide


def count_valid(op: str, dtype: torch.dtype) -> None:
    COUNTS[op].update(["valid", f"valid/{str(dtype).removeprefix('torch.')}"])


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    """After the module ran: the executed example counts, if FEDLORA_FUZZ_REPORT names a file."""
    yield
    if REPORT_PATH:
        report = {"mode": "full" if FULL else "ci", "max_examples": FUZZ.max_examples, "ops": COUNTS}
        with open(REPORT_PATH, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# Valid calls: the shared strategies, then odd memory layouts on top.


@st.composite
def restrided(draw, t: Tensor, *, read_only: bool = True) -> Tensor:
    """``t`` in another memory layout: permuted strides, a storage offset, or (inputs the op only
    reads) a zero stride, i.e. ``t``'s first slice broadcast along one dimension."""
    how = draw(st.sampled_from(("keep", "keep", "permuted", "offset") + (("expanded",) if read_only else ())))
    if how == "permuted" and t.dim() >= 2:
        perm = draw(st.permutations(range(t.dim())))
        return t.permute(perm).contiguous().permute([perm.index(d) for d in range(t.dim())])
    if how == "offset":
        buffer = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)  # not empty(): guards compare it
        return buffer[3:].view(t.shape).copy_(t)
    if how == "expanded" and t.dim() >= 1:
        dim = draw(st.integers(0, t.dim() - 1))
        if t.shape[dim] > 1:
            return t.narrow(dim, 0, 1).expand(t.shape)
    return t


def _restride_all(data, xs, **kw) -> list[Tensor]:
    return [data.draw(restrided(x, **kw)) for x in xs]


@FUZZ
@given(data=st.data())
def test_per_sample_norms_valid(data):
    """B = 0 included (the shared test keeps it apart)."""
    dtype, device = data.draw(dtypes), data.draw(devices)
    (grads,) = data.draw(per_sample_norms_inputs(dtype, device, min_batch=0))
    check_per_sample_norms(_restride_all(data, grads))
    count_valid("per_sample_norms", dtype)


@FUZZ
@given(data=st.data())
def test_dp_clip_noise_valid(data):
    """B = 0 (pure noise) included; the twin draws the same stream from the same seed and offset."""
    dtype, device = data.draw(dtypes), data.draw(devices)
    grads, *scalars = data.draw(dp_clip_noise_inputs(dtype, device, min_batch=0))
    check_dp_clip_noise(_restride_all(data, grads), *scalars)
    count_valid("dp_clip_noise", dtype)


@FUZZ
@given(data=st.data())
def test_dp_clip_noise_with_sum_valid(data):
    """dp_clip_noise's outputs bitwise, and the clipped sums within the twin's budget; B = 0 included."""
    dtype, device = data.draw(dtypes), data.draw(devices)
    grads, *scalars = data.draw(dp_clip_noise_inputs(dtype, device, min_batch=0))
    check_dp_clip_noise_with_sum(_restride_all(data, grads), *scalars)
    count_valid("dp_clip_noise_with_sum", dtype)


@FUZZ
@given(data=st.data())
def test_gaussian_noise_valid(data):
    """The empty list included; targets are written in place, so no zero-stride layout."""
    dtype, device = data.draw(dtypes), data.draw(devices)
    targets, std, seed, offset = data.draw(gaussian_noise_inputs(dtype, device, min_size=0))
    if targets:
        check_gaussian_noise(_restride_all(data, targets, read_only=False), std, seed, offset)
    else:
        ops.gaussian_noise_([], std, seed, offset)
    count_valid("gaussian_noise_", dtype)


@FUZZ
@given(data=st.data())
def test_weighted_sum_valid(data):
    dtype, device = data.draw(dtypes), data.draw(devices)
    xs, weights, rank_dim, out_rank = data.draw(weighted_sum_inputs(dtype, device))
    check_weighted_sum(_restride_all(data, xs), data.draw(restrided(weights)), rank_dim, out_rank)
    count_valid("weighted_sum", dtype)


@FUZZ
@given(data=st.data())
def test_stacked_delta_valid(data):
    dtype, device = data.draw(dtypes), data.draw(devices)
    Bs, As, weights, scale = data.draw(stacked_delta_inputs(dtype, device))
    check_stacked_delta(_restride_all(data, Bs), _restride_all(data, As), data.draw(restrided(weights)), scale)
    count_valid("stacked_delta", dtype)


@FUZZ
@given(data=st.data())
def test_stacked_delta_inplace_valid(data):
    dtype, device = data.draw(dtypes), data.draw(devices)
    W, Bs, As, weights, scale, transpose = data.draw(stacked_delta_inplace_inputs(dtype, device))
    W = data.draw(restrided(W, read_only=False))
    Bs, As, weights = _restride_all(data, Bs), _restride_all(data, As), data.draw(restrided(weights))
    check_stacked_delta_inplace(W, Bs, As, weights, scale, transpose)
    count_valid("stacked_delta_", dtype)


# ---------------------------------------------------------------------------------------------------
# Malformed calls: a valid call, then one corruption. The slots of a call name its tensor arguments.


@dataclass
class Case:
    """One malformed call: its arguments and what the op must do with them."""

    kind: str
    args: list
    expect: str  # RAISE, TWIN or EITHER
    names: str = ""  # regex of the argument the error message must name ("" when not checked)
    wrapper_only: bool = False  # the name comes from the Python wrapper; the raw op fails in the dispatcher


LISTS = {  # op -> (name, position) of its tensor-list arguments
    "per_sample_norms": [("per_sample_grads", 0)],
    "dp_clip_noise": [("per_sample_grads", 0)],
    "dp_clip_noise_with_sum": [("per_sample_grads", 0)],
    "gaussian_noise_": [("tensors", 0)],
    "weighted_sum": [("xs", 0)],
    "stacked_delta": [("Bs", 0), ("As", 1)],
    "stacked_delta_": [("Bs", 1), ("As", 2)],
}
SINGLES = {  # op -> (name, position) of its single tensor arguments
    "weighted_sum": [("weights", 1)],
    "stacked_delta": [("weights", 2)],
    "stacked_delta_": [("W", 0), ("weights", 3)],
}
ARG_NAMES = {
    "per_sample_norms": r"per_sample_grads",
    "dp_clip_noise": r"per_sample_grads",
    "dp_clip_noise_with_sum": r"per_sample_grads",
    "gaussian_noise_": r"tensors",
    "weighted_sum": r"\bxs\b|weights",
    "stacked_delta": r"\bBs\b|\bAs\b|weights",
    "stacked_delta_": r"\bW\b|\bBs\b|\bAs\b|weights",
}
IN_PLACE = ("gaussian_noise_", "stacked_delta_")  # both write their first argument


def slots(op: str, args: list) -> list[tuple[str, list, int]]:
    """``(name, container, index)`` of every tensor argument: ``container[index]`` is the tensor."""
    out = [(f"{name}[{k}]", args[pos], k) for name, pos in LISTS[op] for k in range(len(args[pos]))]
    return out + [(name, args, pos) for name, pos in SINGLES.get(op, [])]


def clone_like(t: Tensor) -> Tensor:
    """A copy of ``t`` with its own storage but the same sizes, strides and storage offset (so an
    internally overlapping view stays one); meta tensors have no data and are returned as they are."""
    if t.is_meta:
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride()
    )


def clone_args(args: list) -> list:
    return [[clone_like(t) for t in a] if isinstance(a, list) else clone_like(a) if isinstance(a, Tensor) else a
            for a in args]


def named_tensors(op: str, args: list) -> list[tuple[str, Tensor]]:
    return [(name, c[i]) for name, c, i in slots(op, args)]


def esc(name: str) -> str:
    return re.escape(name)


def retyped(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in another dtype, values kept meaningful (bool: the sign; integers: scaled, truncated)."""
    if dtype == torch.bool:
        return t > 0
    return (t * 4).to(dtype) if not dtype.is_floating_point and not dtype.is_complex else t.to(dtype)


@st.composite
def poked(draw, t: Tensor, values=SPECIALS) -> Tensor:
    """A copy of ``t`` (same layout) with 1 to 3 elements set to special values."""
    t = clone_like(t)
    for _ in range(draw(st.integers(1, 3))):
        flat = draw(st.integers(0, t.numel() - 1))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
        t[index] = torch.tensor(draw(st.sampled_from(values))).to(t.dtype)  # float16 overflows to inf
    return t


@st.composite
def generic_case(draw, op: str, args: list, kind: str, groups: list[list[str]], poke_values=None) -> Case:
    """The corruptions every op shares: ``dtype``, ``mixed_dtype``, ``meta`` and ``values``.

    Args:
        groups: names of tensors that must share one dtype (a group of 2+ can be mixed).
        poke_values: name -> the special values allowed there (default SPECIALS).
    """
    table = {name: (c, i) for name, c, i in slots(op, args)}
    if kind == "dtype":
        name = draw(st.sampled_from(sorted(table)))
        c, i = table[name]
        c[i] = retyped(c[i], draw(st.sampled_from(BAD_DTYPES)))
        return Case(kind, args, RAISE, esc(name))
    if kind == "mixed_dtype":
        candidates = [n for g in groups if len(g) >= 2 for n in g] + [n for n in table if n == "weights"]
        name = draw(st.sampled_from(candidates))
        c, i = table[name]
        other = [d for d in DTYPES if d != c[i].dtype and (name != "weights" or d != torch.float32)]
        c[i] = c[i].to(draw(st.sampled_from(other)))
        return Case(kind, args, RAISE, esc(name))
    if kind == "meta":
        name = draw(st.sampled_from(sorted(table)))
        c, i = table[name]
        c[i] = c[i].to("meta")
        return Case(kind, args, RAISE, rf"(?s)(?=.*({ARG_NAMES[op]}))(?=.*(meta|cpu|cuda))")
    assert kind == "values"
    pokable = sorted(n for n, (c, i) in table.items() if c[i].numel() > 0)
    assume(pokable)  # nothing to poke: not a malformed call, so not an example
    chosen = draw(st.lists(st.sampled_from(pokable), min_size=1, max_size=3, unique=True))
    for name in chosen:
        c, i = table[name]
        c[i] = draw(poked(c[i], (poke_values or {}).get(name, SPECIALS)))
    return Case(kind, args, TWIN)


@st.composite
def extra_tensor(draw, like: Tensor, shape) -> Tensor:
    return draw(tensors(list(shape), like.dtype, str(like.device)))


# --- per_sample_norms and dp_clip_noise: a list of [B, ...] gradients.

GRAD_KINDS = ("dtype", "mixed_dtype", "meta", "values", "ndim", "batch", "empty_list")
DP_SCALARS = {
    "max_norm": (0.0, -1.0, math.nan, math.inf, -math.inf),
    "noise_multiplier": (-0.5, math.nan, math.inf),
    "denominator": (0.0, -2.0, math.nan, math.inf),
    "seed": (-1, -(2**63), 2**63, 2**64),
    "offset": (-1, -(2**63), 2**63, 2**64),
}


@st.composite
def grads_case(draw, op: str) -> Case:
    """A malformed per_sample_norms, dp_clip_noise or dp_clip_noise_with_sum call."""
    clips = op.startswith("dp_clip_noise")
    kind = draw(st.sampled_from(GRAD_KINDS + MORE_VALUES + (("scalar",) if clips else ())))
    dtype, device = draw(dtypes), draw(devices)
    if op == "per_sample_norms":
        args = list(draw(per_sample_norms_inputs(dtype, device, min_batch=0)))
    else:
        args = list(draw(dp_clip_noise_inputs(dtype, device, min_batch=0)))
    grads = args[0]
    batch = grads[0].shape[0]
    if kind in ("mixed_dtype", "meta", "batch") and len(grads) == 1:  # these need a second gradient
        grads.append(draw(extra_tensor(grads[0], [batch, draw(st.integers(0, 4))])))
    if kind in ("dtype", "mixed_dtype", "meta", "values"):
        names = [f"per_sample_grads[{j}]" for j in range(len(grads))]
        values = None  # NaN, Inf and huge values everywhere (a NaN sample must give NaN, as in the twin)
        if kind == "values" and clips and draw(st.booleans()):
            name = draw(st.sampled_from(("max_norm", "noise_multiplier", "denominator")))
            position = {"max_norm": 1, "noise_multiplier": 2, "denominator": 3}[name]
            args[position] = 1e-30 if name == "denominator" else 1e30  # finite, but huge results
            if not any(g.numel() for g in grads):
                return Case(kind, args, TWIN)
        return draw(generic_case(op, args, kind, [names], values))
    j = draw(st.integers(0, len(grads) - 1))
    if kind == "ndim":
        grads[j] = make_tensor([], dtype, device, seed=j)  # no batch dimension
        return Case(kind, args, RAISE, esc("per_sample_grads["))
    if kind == "batch":
        j = draw(st.integers(1, len(grads) - 1))
        other = draw(st.sampled_from([b for b in (0, 1, 2, 5, 7) if b != batch]))
        grads[j] = draw(extra_tensor(grads[j], [other, *grads[j].shape[1:]]))
        return Case(kind, args, RAISE, esc(f"per_sample_grads[{j}]"))
    if kind == "empty_list":
        args[0] = []
        return Case(kind, args, RAISE, "per_sample_grads", wrapper_only=True)
    name = draw(st.sampled_from(sorted(DP_SCALARS)))
    value = draw(st.sampled_from(DP_SCALARS[name]))
    args[1 + list(DP_SCALARS).index(name)] = value
    return Case(kind, args, RAISE, name, wrapper_only=isinstance(value, int) and value >= 2**63)


@st.composite
def noise_case(draw) -> Case:
    """A malformed gaussian_noise_ call."""
    op = "gaussian_noise_"
    kinds = ("dtype", "mixed_dtype", "meta", "values", "scalar", "alias")
    kind = draw(st.sampled_from(kinds + MORE_VALUES + MORE_ALIAS))
    dtype, device = draw(dtypes), draw(devices)
    args = list(draw(gaussian_noise_inputs(dtype, device, min_size=2 if kind in ("mixed_dtype", "meta") else 1)))
    targets = args[0]
    if kind in ("dtype", "mixed_dtype", "meta", "values"):
        if kind == "values" and draw(st.booleans()):
            args[1] = 1e30  # a finite std whose noise overflows float16
        return draw(generic_case(op, args, kind, [[f"tensors[{j}]" for j in range(len(targets))]]))
    if kind == "scalar":
        name = draw(st.sampled_from(("std", "seed", "offset")))
        value = draw(st.sampled_from((-1.0, -1e-30, math.nan, math.inf, -math.inf) if name == "std"
                                     else (-1, -(2**63), 2**63, 2**64)))
        args[("std", "seed", "offset").index(name) + 1] = value
        return Case(kind, args, RAISE, name, wrapper_only=isinstance(value, int) and value >= 2**63)
    # Aliasing: a pair of views of one buffer, put among the other targets.
    how = draw(st.sampled_from(("twice", "overlap", "expanded", "view_of", "disjoint_strided", "disjoint_slices",
                                "self_overlap")))
    n = draw(st.integers(2, 9))
    buffer = make_tensor([n, 2 * n + 1], dtype, device, seed=draw(st.integers(0, 99)))
    flat = buffer.view(-1)
    expect, pair = RAISE, None
    if how == "twice":
        pair = [buffer, buffer]
    elif how == "overlap":  # two slices sharing element k
        k = draw(st.integers(0, flat.numel() - 1))
        pair = [flat[: k + 1], flat[k:]]
    elif how == "expanded":  # zero stride: one element written by several draws
        pair = [buffer[:1].expand(n, -1)]
    elif how == "view_of":
        pair = [buffer, draw(st.sampled_from((buffer.t(), buffer[1], buffer.view(-1)[3:], buffer[:, ::2])))]
    elif how == "disjoint_strided":  # no shared element, but too strided for ATen to prove it
        pair, expect = [flat[::2], flat[1::2]], EITHER
    elif how == "disjoint_slices":  # no shared element, and ATen can see it: must be accepted
        k = draw(st.integers(0, flat.numel()))
        pair, expect = [flat[:k], flat[k:]], TWIN
    else:  # rows overlapping each other inside one view (strides (1, 1)), not a zero stride
        pair, expect = [flat.as_strided((n, n), (1, 1))], EITHER
    position = draw(st.integers(0, len(targets)))
    targets[position:position] = pair
    return Case(f"alias/{how}", args, expect, r"tensors\[\d+\]")


# --- weighted_sum.


def add_client(args: list) -> None:
    """One more client: a copy of xs[0] and a copy of weights[0] (any weights layout)."""
    xs, weights = args[0], args[1]
    xs.append(xs[0].clone())
    args[1] = torch.cat([weights, weights[:1]])


@st.composite
def weighted_sum_case(draw) -> Case:
    """A malformed weighted_sum call."""
    op = "weighted_sum"
    kind = draw(st.sampled_from(("dtype", "mixed_dtype", "meta", "values", "ndim", "size", "scalar", "empty_list")
                                + MORE_VALUES))
    dtype, device = draw(dtypes), draw(devices)
    args = list(draw(weighted_sum_inputs(dtype, device)))
    xs, _, rank_dim, out_rank = args
    ndim, dim = xs[0].dim(), rank_dim % xs[0].dim()
    if kind in ("dtype", "mixed_dtype", "meta", "values"):
        names = [f"xs[{k}]" for k in range(len(xs))]
        return draw(generic_case(op, args, kind, [names]))  # NaN / Inf weights too, padded clients included
    if kind == "empty_list":
        args[0] = []
        return Case(kind, args, RAISE, r"\bxs\b")
    if kind == "scalar":
        if draw(st.booleans()):
            args[2] = draw(st.sampled_from((ndim, ndim + 2, -ndim - 1, -ndim - 5)))
            return Case(kind, args, RAISE, "rank_dim")
        args[3] = draw(st.sampled_from((-1, -3)))
        return Case(kind, args, RAISE, "out_rank")
    how = draw(st.sampled_from(("x0_scalar", "extra_dim", "fewer_dims", "weights_0d", "weights_3d") if kind == "ndim"
                               else ("other_dim", "rank_above_out_rank", "weights_shape")))
    if how in ("extra_dim", "fewer_dims", "other_dim") and len(xs) == 1:
        add_client(args)
    k = draw(st.integers(1 if how in ("extra_dim", "fewer_dims", "other_dim") else 0, len(xs) - 1))
    shape = list(xs[k].shape)
    if how == "x0_scalar":
        xs[0] = make_tensor([], dtype, device)
        return Case(kind, args, RAISE, esc("xs[0]"))
    if how == "extra_dim":
        shape.insert(draw(st.integers(0, ndim)), draw(st.integers(1, 3)))
    elif how == "fewer_dims":
        shape.pop(draw(st.integers(0, ndim - 1)))
    elif how == "other_dim" and ndim >= 2:
        d = draw(st.sampled_from([d for d in range(ndim) if d != dim]))
        shape[d] = draw(st.sampled_from([s for s in (0, 1, shape[d] + 1, shape[d] + 2) if s != shape[d]]))
    elif how in ("other_dim", "rank_above_out_rank"):
        shape[dim] = out_rank + draw(st.integers(1, 3))
    if how in ("extra_dim", "fewer_dims", "other_dim", "rank_above_out_rank"):
        xs[k] = draw(extra_tensor(xs[k], shape))
        return Case(kind, args, RAISE, esc(f"xs[{k}]"))
    K = len(xs)
    wrong = {
        "weights_0d": [[]],
        "weights_3d": [[K, out_rank, 1], [1, K, 1]],
        "weights_shape": [[K + 1], [K + 1, out_rank], [K, out_rank + 1]] + ([[K - 1]] if K > 1 else []),
    }[how]
    args[1] = draw(tensors(draw(st.sampled_from(wrong)), torch.float32, device))
    return Case(kind, args, RAISE, "weights")


# --- stacked_delta and stacked_delta_.


def add_pair(args: list, first: int, m: int, n: int, dtype, device) -> None:
    """One more factor pair B [m, 2], A [2, n] with weight 0.5 (``first`` = position of Bs in args)."""
    Bs, As = args[first], args[first + 1]
    Bs.append(make_tensor([m, 2], dtype, device, seed=len(Bs)))
    As.append(make_tensor([2, n], dtype, device, seed=len(As) + 7))
    args[first + 2] = torch.cat([args[first + 2], torch.full((1,), 0.5, device=device)])


@st.composite
def stacked_case(draw, op: str) -> Case:
    """A malformed stacked_delta or stacked_delta_ call."""
    inplace = op == "stacked_delta_"
    kinds = ("dtype", "mixed_dtype", "meta", "values", "ndim", "size", "scalar")
    kind = draw(st.sampled_from(kinds + MORE_VALUES + (("alias",) + MORE_ALIAS if inplace else ("empty_list",))))
    dtype, device = draw(dtypes), draw(devices)
    if kind == "alias":
        return draw(alias_stacked_case(dtype, device))
    if inplace:
        args = list(draw(stacked_delta_inplace_inputs(dtype, device)))
        W, transpose = args[0], args[5]
        m, n = (W.shape[1], W.shape[0]) if transpose else tuple(W.shape)
    else:
        args = list(draw(stacked_delta_inputs(dtype, device)))
        m, n = args[0][0].shape[0], args[1][0].shape[1]
    first = 1 if inplace else 0
    Bs, As = args[first], args[first + 1]
    if kind == "values" and draw(st.booleans()):  # a finite, huge scale on ordinary factors
        if not Bs:
            add_pair(args, first, m, n, dtype, device)
        args[first + 3] = draw(st.sampled_from((1e30, -1e30)))
        return Case(kind, args, TWIN)
    if kind == "values":
        # Poked values with |scale| >= 0.1: the op folds scale into w_k before the product and the twin
        # scales after it, which overflow differently (see test_stacked_delta_folded_scale_like_twin).
        args[first + 3] = draw(st.floats(0.1, 4.0)) * draw(st.sampled_from((1.0, -1.0)))
    if kind in ("dtype", "mixed_dtype", "meta", "values"):
        group = [f"Bs[{k}]" for k in range(len(Bs))] + [f"As[{k}]" for k in range(len(As))]
        case = draw(generic_case(op, args, kind, [group + (["W"] if inplace and Bs else [])]))
        if inplace and not Bs and case.names == "weights":
            case.expect = EITHER  # K = 0 checks the weights' shape only (its dtype goes unread)
        return case
    if kind == "empty_list":
        args[0], args[1] = [], []
        return Case(kind, args, RAISE, r"\bBs\b")
    if kind == "scalar":
        args[first + 3] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
        return Case(kind, args, RAISE, "scale")
    if kind == "ndim":
        hows = ("B_ndim", "A_ndim", "weights_ndim") + (("W_ndim",) if inplace else ())
    else:
        hows = ("pairs", "rank", "m", "n", "weights_len") + (("W_shape",) if inplace else ())
    how = draw(st.sampled_from(hows))
    while len(Bs) < (2 if how in ("m", "n") else 1 if how in ("B_ndim", "A_ndim", "rank", "W_shape") else 0):
        add_pair(args, first, m, n, dtype, device)
    K = len(Bs)
    k = draw(st.integers(1 if how in ("m", "n") else 0, max(K - 1, 0)))
    if how in ("B_ndim", "A_ndim"):
        factors, name = (Bs, "Bs") if how == "B_ndim" else (As, "As")
        t = factors[k]
        factors[k] = t.reshape(-1) if draw(st.booleans()) else t.unsqueeze(draw(st.integers(0, 2)))
        return Case(kind, args, RAISE, esc(f"{name}["))
    if how == "W_ndim":
        args[0] = args[0].reshape(-1) if draw(st.booleans()) else args[0].unsqueeze(draw(st.integers(0, 2)))
        return Case(kind, args, RAISE, r"\bW\b")
    if how in ("weights_ndim", "weights_len"):
        shapes = [[], [K, 1], [1, K]] if how == "weights_ndim" else [[K + 1], [K + 2]] + ([[K - 1]] if K else [])
        args[first + 2] = draw(tensors(draw(st.sampled_from(shapes)), torch.float32, device))
        return Case(kind, args, RAISE, "weights")
    if how == "pairs":
        if Bs and draw(st.booleans()):
            As.pop()
        else:
            Bs.append(make_tensor([m, 1], dtype, device))
        return Case(kind, args, RAISE, r"Bs and As")
    if how == "rank":
        r = Bs[k].shape[1]
        rows = draw(st.sampled_from([s for s in (0, 1, r + 1, r + 2) if s != r]))
        As[k] = draw(extra_tensor(As[k], [rows, n]))
        return Case(kind, args, RAISE, esc(f"As[{k}]"))
    if how in ("m", "n"):
        wrong = draw(st.sampled_from([s for s in (0, 1, m + 1, n + 1, 9) if s != (m if how == "m" else n)]))
        if how == "m":
            Bs[k] = draw(extra_tensor(Bs[k], [wrong, Bs[k].shape[1]]))
        else:
            As[k] = draw(extra_tensor(As[k], [As[k].shape[0], wrong]))
        return Case(kind, args, RAISE, esc(f"{'Bs' if how == 'm' else 'As'}[{k}]"))
    rows, cols = (n, m) if args[5] else (m, n)
    shape = draw(st.sampled_from([s for s in ([rows + 1, cols], [rows, cols + 1], [cols, rows], [0, cols], [rows, 0])
                                  if s != [rows, cols]]))
    args[0] = draw(extra_tensor(args[0], shape))
    return Case(kind, args, RAISE, r"\bW\b")


@st.composite
def alias_stacked_case(draw, dtype, device) -> Case:
    """stacked_delta_ whose W shares memory with a factor or the weights, or with itself."""
    how = draw(st.sampled_from(("B_in_W", "A_in_W", "W_expanded", "W_overlapping", "W_disjoint", "factors_alias",
                                "weights_in_W")))
    if how == "weights_in_W":
        dtype = torch.float32  # the weights' dtype, so that they can be a view of W
    # Two rows at least: for a zero stride to overlap, and for the buffer to hold K = 3 weights.
    m, n = draw(st.integers(2 if how in ("W_expanded", "weights_in_W") else 1, 6)), draw(st.integers(1, 6))
    r = draw(st.integers(1, min(m, n)))
    extra = draw(st.integers(0, 2))  # ordinary pairs before the aliasing one, so k varies
    Bs = [make_tensor([m, 2], dtype, device, seed=10 + j) for j in range(extra)]
    As = [make_tensor([2, n], dtype, device, seed=20 + j) for j in range(extra)]
    Bs.append(make_tensor([m, r], dtype, device))
    As.append(make_tensor([r, n], dtype, device, seed=1))
    weights = make_tensor([extra + 1], torch.float32, device, seed=2)
    buffer = make_tensor([m, n + r], dtype, device, seed=3)
    W = buffer[:, :n]  # [m, n], a strided view
    k = extra
    expect, names = RAISE, rf"\bW\b.*(Bs|As)\[{k}\]"
    if how == "B_in_W":
        Bs[k] = W[:, :r]
    elif how == "A_in_W":
        As[k] = W[:r, :]
    elif how == "W_expanded":
        W, names = W[:1].expand(m, n), r"\bW\b"
    elif how == "W_overlapping":  # rows overlap without a zero stride (ATen: "too hard to tell")
        W, names = buffer.view(-1).as_strided((m, n), (1, 1)), r"\bW\b"
        expect = RAISE if m > 1 and n > 1 else EITHER  # a single row or column is an ordinary view
    elif how == "W_disjoint":  # W and B_k side by side in one buffer: no shared element
        Bs[k], expect = buffer[:, n:], EITHER
    elif how == "factors_alias":  # read-only factors sharing memory are fine
        Bs.append(Bs[k])
        As.append(As[k])
        weights, expect = torch.cat([weights, weights[:1]]), TWIN
    else:  # the weights are W's first elements: read before W is written
        weights, expect, names = buffer.view(-1)[: extra + 1], EITHER, r"\bW\b|weights"
    return Case(f"alias/{how}", [W, Bs, As, weights, 0.5, False], expect, names)


# ---------------------------------------------------------------------------------------------------
# Running a malformed call: raise cleanly, or match the twin.


def results(op: str, args: list, returned) -> list[Tensor]:
    """What the call produced: the written tensors of an in-place op, else the returned tensors."""
    if op == "gaussian_noise_":
        return list(args[0])
    if op == "stacked_delta_":
        return [args[0]]
    if op == "dp_clip_noise":
        return [*returned[0], returned[1]]
    if op == "dp_clip_noise_with_sum":
        return [*returned[0], *returned[1], returned[2]]
    return [returned]


def bounds(op: str, args: list) -> list[tuple[Tensor, int, float]]:
    """Per result: the elementwise magnitude of the summed terms, the number of terms, extra slack."""
    if op == "per_sample_norms":
        (grads,) = args
        width = sum(g.shape[1:].numel() for g in grads)
        return [(reference.per_sample_norms([g.float() for g in grads]), width + 1, 0.0)]
    if op.startswith("dp_clip_noise"):
        grads, max_norm, noise_multiplier, denominator = args[:4]
        abs_outs, norms = reference.dp_clip_noise([g.float().abs() for g in grads], max_norm, 0.0, denominator, 0, 0)
        width = sum(g.shape[1:].numel() for g in grads)
        noise = noise_multiplier * max_norm * MAX_ABS_NORMAL / denominator
        terms = grads[0].shape[0] + width + 1
        outs = [(o.double() + noise, terms, 0.0) for o in abs_outs]
        sums = [(o.double() * denominator, terms, 0.0) for o in abs_outs] if op == "dp_clip_noise_with_sum" else []
        return outs + sums + [(norms, width + 1, 0.0)]
    if op == "gaussian_noise_":
        targets, std = args[0], args[1]
        return [(t.float().abs() + std * MAX_ABS_NORMAL, 2, std * STREAM_ATOL) for t in targets]
    if op == "weighted_sum":
        xs, weights, rank_dim, out_rank = args
        magnitude = reference.weighted_sum([x.float().abs() for x in xs], weights.abs(), rank_dim, out_rank)
        return [(magnitude, len(xs), 0.0)]
    W, (Bs, As, weights, scale) = (args[0], args[1:5]) if op == "stacked_delta_" else (None, args)
    rank = sum(B.shape[1] for B in Bs)
    magnitude = reference.stacked_delta([B.float().abs() for B in Bs], [A.float().abs() for A in As],
                                        weights.abs(), abs(scale)) if Bs else 0.0
    if W is None:
        return [(magnitude, rank + 1, 0.0)]
    if Bs and args[5]:
        magnitude = magnitude.T
    return [(W.float().abs() + magnitude, rank + 2, 0.0)]


def assert_like_twin(outs: list[Tensor], refs: list[Tensor], scales) -> None:
    """Same shapes, dtypes and NaN / +-Inf positions; finite values within one rounding of the output
    dtype plus float32 reassociation of ``terms`` terms of the given magnitude."""
    assert len(outs) == len(refs)
    for j, (out, ref, (magnitude, terms, extra)) in enumerate(zip(outs, refs, scales)):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (j, out.shape, ref.shape, out.dtype, ref.dtype)
        o, r = out.double(), ref.double()
        for what in ("isnan", "isposinf", "isneginf"):
            assert torch.equal(getattr(o, what)(), getattr(r, what)()), f"result {j}: {what} differs:\n{out}\n{ref}"
        magnitude = torch.as_tensor(magnitude, dtype=torch.float64, device=o.device).expand(o.shape)
        tolerance = ABS_FLOOR[out.dtype] + (2 * eps(out.dtype) + 4 * terms * eps(torch.float32)) * magnitude + extra
        finite = o.isfinite() & r.isfinite() & magnitude.isfinite()
        bad = finite & ((o - r).abs() > tolerance)
        assert not bad.any(), f"result {j}: {(o - r).abs()[bad].max():.3g} off the twin:\n{out}\n{ref}"


def assert_same_bits(before: list[tuple[str, Tensor]], after: list[tuple[str, Tensor]], skip=()) -> None:
    for (name, b), (_, a) in zip(before, after, strict=True):
        if name not in skip and not a.is_meta:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} was modified")


def guard_written(op: str, args: list):
    """Snapshot every storage an in-place op writes. Returns a check that nothing outside the written
    views changed (say a factor beside W in one buffer), and the data pointers of those storages."""
    written = (args[0] if op == "gaussian_noise_" else [args[0]]) if op in IN_PLACE else []
    storages = {}
    for t in (t for t in written if not t.is_meta):
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
            storages[key] = (whole, whole.clone(), torch.zeros_like(whole, dtype=torch.bool))
        storages[key][2].as_strided(t.shape, t.stride(), t.storage_offset()).fill_(True)

    def check() -> None:
        for whole, before, inside in storages.values():
            torch.testing.assert_close(whole[~inside], before[~inside], rtol=0, atol=0, equal_nan=True,
                                       msg="written outside the in-place views")

    return check, set(storages)


def check_malformed(op: str, case: Case, via: str) -> None:
    """Run one malformed call and hold it to its expectation; count the outcome."""
    call = getattr(ops, op) if via == "wrapper" else getattr(torch.ops.fedlora, op).default
    args = case.args
    before = clone_args(args)
    check_outside, written = guard_written(op, args)
    try:
        returned = call(*args)
    except ERRORS as error:
        COUNTS[op].update(["malformed", "malformed/raised", f"malformed/{case.kind}/raised"])
        if case.expect == TWIN:  # odd values: the op may only fail where the twin fails too
            with pytest.raises(Exception):
                getattr(reference, op)(*clone_args(before))
        if case.names and (via == "wrapper" or not case.wrapper_only):
            assert isinstance(error, CONTRACT_ERRORS), f"{type(error).__name__}: {error}"
            assert re.search(case.names, str(error)), f"message does not name {case.names!r}: {error}"
        assert_same_bits(named_tensors(op, before), named_tensors(op, args))  # nothing written on failure
        return
    COUNTS[op].update(["malformed", "malformed/returned", f"malformed/{case.kind}/returned"])
    assert case.expect != RAISE, f"{case.kind}: the op accepted a call the contract rejects ({case.names})"
    twin_args = clone_args(before)
    twin_returned = getattr(reference, op)(*twin_args)
    assert_like_twin(results(op, args, returned), results(op, twin_args, twin_returned), bounds(op, before))
    # Inputs the op only reads are untouched; those in a written buffer are checked by check_outside.
    check_outside()
    shared = {name for name, t in named_tensors(op, args) if t.untyped_storage().data_ptr() in written}
    assert_same_bits(named_tensors(op, before), named_tensors(op, args), skip=shared)


ENTRY = st.sampled_from(("wrapper", "raw"))


@FUZZ
@given(case=grads_case("per_sample_norms"), via=ENTRY)
def test_per_sample_norms_malformed(case, via):
    check_malformed("per_sample_norms", case, via)


@FUZZ
@given(case=grads_case("dp_clip_noise"), via=ENTRY)
def test_dp_clip_noise_malformed(case, via):
    check_malformed("dp_clip_noise", case, via)


@FUZZ
@given(case=grads_case("dp_clip_noise_with_sum"), via=ENTRY)
def test_dp_clip_noise_with_sum_malformed(case, via):
    check_malformed("dp_clip_noise_with_sum", case, via)


@FUZZ
@given(case=noise_case(), via=ENTRY)
def test_gaussian_noise_malformed(case, via):
    check_malformed("gaussian_noise_", case, via)


@FUZZ
@given(case=weighted_sum_case(), via=ENTRY)
def test_weighted_sum_malformed(case, via):
    check_malformed("weighted_sum", case, via)


@FUZZ
@given(case=stacked_case("stacked_delta"), via=ENTRY)
def test_stacked_delta_malformed(case, via):
    check_malformed("stacked_delta", case, via)


@FUZZ
@given(case=stacked_case("stacked_delta_"), via=ENTRY)
def test_stacked_delta_inplace_malformed(case, via):
    check_malformed("stacked_delta_", case, via)


# ---------------------------------------------------------------------------------------------------
# What the fuzzing found, as minimal reproducers: three were fixed (a NaN sample left unclipped by
# dp_clip_noise; a non-finite weight vanishing in weighted_sum's zero padding; a self-overlapping W
# accepted by stacked_delta_); one is a known divergence at overflowing inputs, kept as a strict xfail
# so that a change is noticed.


def test_dp_clip_noise_nan_sample_like_twin():
    g0 = torch.tensor([[math.nan, 0.0], [0.0, 0.0]])  # sample 0 has a NaN in tensor 0
    g1 = torch.tensor([[100.0], [0.5]])  # and a large, finite gradient in tensor 1
    outs, _ = ops.dp_clip_noise([g0, g1], 1.0, 0.0, 1.0, 0, 0)
    ref, _ = reference.dp_clip_noise([g0, g1], 1.0, 0.0, 1.0, 0, 0)
    assert torch.equal(outs[1].isnan(), ref[1].isnan()), (outs[1], ref[1])  # was 100.5: unclipped


def test_weighted_sum_nonfinite_weight_on_padding_like_twin():
    xs = [torch.ones(2, 2), torch.ones(2, 1)]  # client 1 is padded from rank 1 to 2
    weights = torch.tensor([1.0, math.inf])
    out = ops.weighted_sum(xs, weights, 1, 2)
    ref = reference.weighted_sum(xs, weights, 1, 2)
    assert torch.equal(out.isnan(), ref.isnan()), (out, ref)  # was: column 1 stayed 1.0


@pytest.mark.xfail(strict=True, reason="stacked_delta(_): the kernel folds scale into w_k in float32 before "
                   "the product (scale * w_k = 1e40 is inf), the twin scales the product; the twin's 1e30 is "
                   "finite. The other way round, scale = 0 with B @ A overflowing gives 0 where the twin gives NaN")
def test_stacked_delta_folded_scale_like_twin():
    Bs, As, weights = [torch.tensor([[1e-5]])], [torch.tensor([[1e-5]])], torch.tensor([1e10])
    out = ops.stacked_delta(Bs, As, weights, 1e30)
    ref = reference.stacked_delta(Bs, As, weights, 1e30)
    assert torch.equal(out.isinf(), ref.isinf()), (out, ref)  # op: inf, twin: 1e30


def test_stacked_delta_overlapping_w_is_rejected():
    W = torch.zeros(3).as_strided((2, 2), (1, 1))  # W[0, 1] and W[1, 0] are one element
    with pytest.raises(CONTRACT_ERRORS, match=r"\bW\b"):  # as an expanded W is
        ops.stacked_delta_(W, [torch.tensor([[1.0], [2.0]])], [torch.tensor([[3.0, 4.0]])], torch.ones(1), 1.0)
