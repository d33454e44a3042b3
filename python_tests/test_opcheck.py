"""Dispatcher-level checks: ``torch.library.opcheck`` on every op, and the ops inside ``torch.compile``.

opcheck runs its default test_utils (schema, autograd registration, fake tensor, AOT dispatch with
dynamic shapes) on the shared :func:`strategies.sample_inputs`, so every fake (meta) implementation is
checked against its kernel on the same inputs the twin tests use.
"""

from __future__ import annotations

import pytest
import torch

from fedlora_ext import ops
from strategies import OPS, make_tensor, sample_inputs


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    """Every sample of every op passes all of opcheck's default tests."""
    overload = getattr(torch.ops.fedlora, op).default
    for args in sample_inputs(op, device):
        torch.library.opcheck(overload, args)


def _round(W, xs, weights, grads, noise_target, merge_weights, delta_weights):
    """One server + client round: aggregate, merge in place, a DP step, client-level noise, a delta.

    Only op calls and views: tensors built inside would make inductor compile C++ kernels (slow).
    """
    avg = ops.weighted_sum(xs, weights, -1, 4)  # HetLoRA-padded B [m, 4]
    ops.stacked_delta_(W, [avg], [avg.t()], merge_weights, 0.5)  # W [m, m] += avg avg^T / 2
    outs, norms = ops.dp_clip_noise(grads, 1.0, 0.8, 5.0, 7, 8)
    ops.gaussian_noise_([noise_target], 0.1, 7, 9)
    delta = ops.stacked_delta([avg], [avg.t()], delta_weights, 0.25)
    return avg, outs, norms, delta, ops.per_sample_norms(grads)


def _inputs(device):
    """Fresh inputs for :func:`_round` (the in-place ops mutate W and the noise target)."""
    W = make_tensor([3, 3], torch.float32, device, seed=9)
    xs = [make_tensor([3, 4], torch.float32, device), make_tensor([3, 2], torch.float32, device, seed=1)]
    weights = torch.tensor([0.3, 0.7], device=device)
    grads = [make_tensor([5, 3], torch.float32, device, seed=2), make_tensor([5, 2, 2], torch.float32, device, seed=3)]
    noise_target = torch.zeros(10, device=device)
    return W, xs, weights, grads, noise_target, torch.ones(1, device=device), torch.tensor([2.0], device=device)


def test_compile_fullgraph_matches_eager(device):
    """``torch.compile(fullgraph=True)`` traces all six ops (two in place) without graph breaks and
    gives bitwise the eager results, including the mutations of its inputs."""
    eager_inputs, compiled_inputs = _inputs(device), _inputs(device)
    eager = _round(*eager_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(_round, fullgraph=True)(*compiled_inputs)

    flat_eager = [eager[0], *eager[1], eager[2], eager[3], eager[4]]
    flat_compiled = [compiled[0], *compiled[1], compiled[2], compiled[3], compiled[4]]
    for e, c in zip(flat_eager, flat_compiled, strict=True):
        assert torch.equal(e, c)
    assert torch.equal(eager_inputs[0], compiled_inputs[0]), "stacked_delta_ mutation of W differs"
    assert torch.equal(eager_inputs[4], compiled_inputs[4]), "gaussian_noise_ mutation differs"
    assert not torch.equal(compiled_inputs[4], torch.zeros(10, device=device)), "mutation was dropped"
