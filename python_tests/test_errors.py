"""Malformed calls raise RuntimeError / ValueError whose message names the offending argument.

DESIGN.md: violations "raise a RuntimeError/ValueError that names the argument and shows expected vs
got sizes". Every case builds its tensors lazily (in a lambda) and must fail fast: no crash, no hang,
no silent garbage.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora_ext import ops

ERRORS = (RuntimeError, ValueError)


def f32(*shape, device="cpu"):
    """A float32 tensor of ``shape`` (values do not matter to validation)."""
    return torch.randn(shape, device=device)


def ones(k):
    """float32 weights ``[k]``."""
    return torch.ones(k)


def g():
    """A valid per-sample gradient list: one ``[3, 4]`` tensor."""
    return [f32(3, 4)]


def _case(name, call, match):
    return pytest.param(call, match, id=name)


CASES = [
    # per_sample_norms / dp_clip_noise: the gradient list.
    _case("norms_empty_list", lambda: ops.per_sample_norms([]), r"per_sample_grads"),
    _case("dp_empty_list", lambda: ops.dp_clip_noise([], 1.0, 1.0, 1.0, 0, 0), r"per_sample_grads"),
    _case("norms_batch_mismatch", lambda: ops.per_sample_norms([f32(3, 4), f32(2, 4)]),
          r"per_sample_grads\[1\].*\[2, 4\].*B = 3"),
    _case("dp_batch_mismatch", lambda: ops.dp_clip_noise([f32(3, 4), f32(2)], 1.0, 1.0, 1.0, 0, 0),
          r"per_sample_grads\[1\].*B = 3"),
    _case("norms_0d", lambda: ops.per_sample_norms([torch.tensor(1.0)]), r"per_sample_grads\[0\].*batch dimension"),
    _case("norms_mixed_dtypes", lambda: ops.per_sample_norms([f32(3, 4), f32(3, 4).half()]),
          r"per_sample_grads\[1\].*Half.*Float"),
    _case("norms_float64", lambda: ops.per_sample_norms([f32(3, 4).double()]), r"per_sample_grads\[0\].*Double"),
    _case("norms_int", lambda: ops.per_sample_norms([torch.ones(3, 4, dtype=torch.int32)]),
          r"per_sample_grads\[0\].*Int"),
    _case("dp_float64", lambda: ops.dp_clip_noise([f32(3, 4).double()], 1.0, 1.0, 1.0, 0, 0),
          r"per_sample_grads\[0\].*Double"),
    # dp_clip_noise: the scalars.
    _case("max_norm_negative", lambda: ops.dp_clip_noise(g(), -1.0, 1.0, 1.0, 0, 0), r"max_norm.*> 0.*-1"),
    _case("max_norm_zero", lambda: ops.dp_clip_noise(g(), 0.0, 1.0, 1.0, 0, 0), r"max_norm.*> 0"),
    _case("max_norm_nan", lambda: ops.dp_clip_noise(g(), math.nan, 1.0, 1.0, 0, 0), r"max_norm.*finite"),
    _case("max_norm_inf", lambda: ops.dp_clip_noise(g(), math.inf, 1.0, 1.0, 0, 0), r"max_norm.*finite"),
    _case("noise_multiplier_negative", lambda: ops.dp_clip_noise(g(), 1.0, -0.5, 1.0, 0, 0), r"noise_multiplier.*>= 0"),
    _case("noise_multiplier_nan", lambda: ops.dp_clip_noise(g(), 1.0, math.nan, 1.0, 0, 0),
          r"noise_multiplier.*finite"),
    _case("denominator_zero", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, 0.0, 0, 0), r"denominator.*> 0"),
    _case("denominator_negative", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, -4.0, 0, 0), r"denominator.*> 0"),
    _case("denominator_inf", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, math.inf, 0, 0), r"denominator.*finite"),
    _case("dp_seed_negative", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, 1.0, -1, 0), r"seed.*\[0, 2\^63\)"),
    _case("dp_offset_negative", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, 1.0, 0, -1), r"offset.*\[0, 2\^63\)"),
    _case("dp_seed_too_large", lambda: ops.dp_clip_noise(g(), 1.0, 1.0, 1.0, 2**63, 0), r"seed"),
    # gaussian_noise_.
    _case("std_negative", lambda: ops.gaussian_noise_([f32(4)], -1.0, 0, 0), r"std.*>= 0"),
    _case("std_nan", lambda: ops.gaussian_noise_([f32(4)], math.nan, 0, 0), r"std.*finite"),
    _case("noise_seed_negative", lambda: ops.gaussian_noise_([f32(4)], 1.0, -3, 0), r"seed.*\[0, 2\^63\)"),
    _case("noise_offset_negative", lambda: ops.gaussian_noise_([f32(4)], 1.0, 0, -3), r"offset.*\[0, 2\^63\)"),
    _case("noise_float64", lambda: ops.gaussian_noise_([f32(4).double()], 1.0, 0, 0), r"tensors\[0\].*Double"),
    _case("noise_int", lambda: ops.gaussian_noise_([torch.zeros(4, dtype=torch.int64)], 1.0, 0, 0),
          r"tensors\[0\].*Long"),
    _case("noise_mixed_dtypes", lambda: ops.gaussian_noise_([f32(4), f32(4).bfloat16()], 1.0, 0, 0),
          r"tensors\[1\].*BFloat16.*Float"),
    _case("noise_same_tensor_twice", lambda: (lambda x: ops.gaussian_noise_([x, x], 1.0, 0, 0))(f32(4)),
          r"tensors\[0\] and tensors\[1\]"),
    _case("noise_overlapping_views", lambda: (lambda x: ops.gaussian_noise_([x[:3], x[2:]], 1.0, 0, 0))(f32(5)),
          r"tensors\[0\] and tensors\[1\]"),
    _case("noise_expanded_view", lambda: ops.gaussian_noise_([f32(1, 4).expand(3, 4)], 1.0, 0, 0),
          r"tensors\[0\].*overlapping"),
    # weighted_sum.
    _case("ws_empty_xs", lambda: ops.weighted_sum([], ones(0), 1, 4), r"xs"),
    _case("ws_rank_above_out_rank", lambda: ops.weighted_sum([f32(3, 5), f32(3, 2)], ones(2), 1, 4),
          r"xs\[0\].*rank 5.*out_rank = 4"),
    _case("ws_rank_dim_too_large", lambda: ops.weighted_sum([f32(3, 2)], ones(1), 2, 4), r"rank_dim.*\[-2, 1\].*got 2"),
    _case("ws_rank_dim_too_negative", lambda: ops.weighted_sum([f32(3, 2)], ones(1), -3, 4), r"rank_dim.*got -3"),
    _case("ws_out_rank_negative", lambda: ops.weighted_sum([f32(3, 0)], ones(1), 1, -1), r"out_rank.*>= 0"),
    _case("ws_other_dim_mismatch", lambda: ops.weighted_sum([f32(3, 2), f32(4, 2)], ones(2), 1, 4),
          r"xs\[1\].*\[4, 2\].*\[3, 2\]"),
    _case("ws_ndim_mismatch", lambda: ops.weighted_sum([f32(3, 2), f32(3, 2, 1)], ones(2), 1, 4),
          r"xs\[1\].*dimensions"),
    _case("ws_0d", lambda: ops.weighted_sum([torch.tensor(1.0)], ones(1), 0, 1), r"xs\[0\].*0-d"),
    _case("ws_weights_wrong_length", lambda: ops.weighted_sum([f32(3, 2), f32(3, 2)], ones(3), 1, 4),
          r"weights.*\[2\].*\[2, 4\].*got \[3\]"),
    _case("ws_weights_wrong_rank_count", lambda: ops.weighted_sum([f32(3, 2), f32(3, 2)], torch.ones(2, 3), 1, 4),
          r"weights.*got \[2, 3\]"),
    _case("ws_weights_3d", lambda: ops.weighted_sum([f32(3, 2)], torch.ones(1, 4, 1), 1, 4),
          r"weights.*got \[1, 4, 1\]"),
    _case("ws_weights_float64", lambda: ops.weighted_sum([f32(3, 2)], ones(1).double(), 1, 4),
          r"weights.*float32.*Double"),
    _case("ws_weights_bfloat16", lambda: ops.weighted_sum([f32(3, 2)], ones(1).bfloat16(), 1, 4),
          r"weights.*float32.*BFloat16"),
    _case("ws_mixed_dtypes", lambda: ops.weighted_sum([f32(3, 2), f32(3, 2).half()], ones(2), 1, 4),
          r"xs\[1\].*Half.*Float"),
    _case("ws_float64", lambda: ops.weighted_sum([f32(3, 2).double()], ones(1), 1, 4), r"xs\[0\].*Double"),
    _case("ws_int", lambda: ops.weighted_sum([torch.ones(3, 2, dtype=torch.int32)], ones(1), 1, 4), r"xs\[0\].*Int"),
    # stacked_delta.
    _case("sd_length_mismatch", lambda: ops.stacked_delta([f32(5, 2)] * 2, [f32(2, 7)], ones(2), 1.0),
          r"Bs and As.*same length.*2 and 1"),
    _case("sd_empty", lambda: ops.stacked_delta([], [], ones(0), 1.0), r"Bs and As.*K >= 1"),
    _case("sd_rank_mismatch", lambda: ops.stacked_delta([f32(5, 3)], [f32(2, 7)], ones(1), 1.0),
          r"As\[0\].*\[2, 7\].*r = 3.*Bs\[0\]"),
    _case("sd_m_mismatch", lambda: ops.stacked_delta([f32(5, 2), f32(4, 2)], [f32(2, 7)] * 2, ones(2), 1.0),
          r"Bs\[1\].*m = 5"),
    _case("sd_n_mismatch", lambda: ops.stacked_delta([f32(5, 2)] * 2, [f32(2, 7), f32(2, 6)], ones(2), 1.0),
          r"As\[1\].*n = 7"),
    _case("sd_B_3d", lambda: ops.stacked_delta([f32(5, 2, 1)], [f32(2, 7)], ones(1), 1.0), r"Bs\[0\].*2-d"),
    _case("sd_A_1d", lambda: ops.stacked_delta([f32(5, 2)], [f32(2)], ones(1), 1.0), r"As\[0\].*2-d"),
    _case("sd_weights_wrong_length", lambda: ops.stacked_delta([f32(5, 2)], [f32(2, 7)], ones(2), 1.0),
          r"weights.*\[1\].*got \[2\]"),
    _case("sd_weights_per_rank", lambda: ops.stacked_delta([f32(5, 2)], [f32(2, 7)], torch.ones(1, 2), 1.0),
          r"weights.*got \[1, 2\]"),
    _case("sd_weights_float64", lambda: ops.stacked_delta([f32(5, 2)], [f32(2, 7)], ones(1).double(), 1.0),
          r"weights.*float32"),
    _case("sd_mixed_dtypes", lambda: ops.stacked_delta([f32(5, 2)], [f32(2, 7).half()], ones(1), 1.0),
          r"As\[0\].*Half.*Bs\[0\]"),
    _case("sd_float64", lambda: ops.stacked_delta([f32(5, 2).double()], [f32(2, 7).double()], ones(1), 1.0),
          r"Bs\[0\].*Double"),
    _case("sd_scale_nan", lambda: ops.stacked_delta([f32(5, 2)], [f32(2, 7)], ones(1), math.nan), r"scale.*finite"),
    # stacked_delta_: the target W.
    _case("sdi_length_mismatch", lambda: ops.stacked_delta_(f32(5, 7), [f32(5, 2)], [], ones(1), 1.0),
          r"Bs and As.*1 and 0"),
    _case("sdi_W_wrong_shape", lambda: ops.stacked_delta_(f32(5, 6), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0),
          r"W.*\[5, 6\].*\[5, 7\]"),
    _case("sdi_W_wrong_shape_transpose",
          lambda: ops.stacked_delta_(f32(5, 7), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0, True),
          r"W.*\[5, 7\].*\[7, 5\].*transpose"),
    _case("sdi_W_3d", lambda: ops.stacked_delta_(f32(5, 7, 1), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0), r"W.*2-d"),
    _case("sdi_W_dtype", lambda: ops.stacked_delta_(f32(5, 7).half(), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0),
          r"W.*Half.*Bs\[0\]"),
    _case("sdi_W_float64", lambda: ops.stacked_delta_(f32(5, 7).double(), [], [], ones(0), 1.0), r"W.*Double"),
    _case("sdi_W_expanded", lambda: ops.stacked_delta_(f32(1, 7).expand(5, 7), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0),
          r"W.*overlapping"),
    _case("sdi_empty_weights_wrong", lambda: ops.stacked_delta_(f32(5, 7), [], [], ones(1), 1.0),
          r"weights.*\[0\].*got \[1\]"),
    _case("sdi_rank_mismatch", lambda: ops.stacked_delta_(f32(5, 7), [f32(5, 3)], [f32(2, 7)], ones(1), 1.0),
          r"As\[0\].*r = 3"),
]


@pytest.mark.parametrize("call, match", CASES)
def test_malformed_call_raises_naming_the_argument(call, match):
    """The call raises RuntimeError or ValueError and the message matches (names the argument)."""
    with pytest.raises(ERRORS, match=match):
        call()


def _shared_buffer():
    """W [5, 7] and factors cut from one buffer: B overlaps W's tail, A overlaps W's middle."""
    buffer = f32(100)
    return buffer[:35].view(5, 7), buffer[30:40].view(5, 2), buffer[20:34].view(2, 7)


def test_w_overlapping_a_b_factor_is_rejected():
    """W sharing memory with B_k would read half-updated factors: rejected, naming Bs[k]."""
    W, B, _ = _shared_buffer()
    with pytest.raises(ERRORS, match=r"W shares memory with Bs\[1\]"):
        ops.stacked_delta_(W, [f32(5, 2), B], [f32(2, 7), f32(2, 7)], ones(2), 1.0)


def test_w_overlapping_an_a_factor_is_rejected():
    """W sharing memory with A_k is rejected too, naming As[k]."""
    W, _, A = _shared_buffer()
    with pytest.raises(ERRORS, match=r"W shares memory with As\[0\]"):
        ops.stacked_delta_(W, [f32(5, 2)], [A], ones(1), 1.0)


def test_w_being_a_factor_is_rejected():
    """The same tensor as W and as a factor (a square LoRA factor merged into itself)."""
    W = f32(5, 5)
    with pytest.raises(ERRORS, match=r"W shares memory with Bs\[0\]"):
        ops.stacked_delta_(W, [W], [f32(5, 5)], ones(1), 1.0)


def test_disjoint_strided_tensors_are_not_overlap():
    """Separate tensors never overlap, whatever their strides: a sliced view beside another tensor
    must be accepted (today the overlap check treats every non-dense pair as overlapping)."""
    ops.gaussian_noise_([torch.zeros(4), torch.zeros(8)[::2]], 1.0, 0, 0)
    ops.stacked_delta_(torch.zeros(5, 7), [f32(5, 2)], [f32(2, 14)[:, ::2]], ones(1), 1.0)


META_CASES = [
    _case("norms", lambda m: ops.per_sample_norms([f32(3, 4), f32(3, 4, device=m)]), r"per_sample_grads\[1\].*meta"),
    _case("norms_meta_first", lambda m: ops.per_sample_norms([f32(3, 4, device=m), f32(3, 4)]),
          r"per_sample_grads\[1\].*cpu"),
    _case("dp", lambda m: ops.dp_clip_noise([f32(3, 4), f32(3, 2, device=m)], 1.0, 1.0, 1.0, 0, 0),
          r"per_sample_grads\[1\].*meta"),
    _case("noise", lambda m: ops.gaussian_noise_([f32(4), f32(4, device=m)], 1.0, 0, 0), r"tensors\[1\].*meta"),
    _case("ws_xs", lambda m: ops.weighted_sum([f32(3, 2), f32(3, 2, device=m)], ones(2), 1, 2), r"xs\[1\].*meta"),
    _case("ws_weights", lambda m: ops.weighted_sum([f32(3, 2)], torch.ones(1, device=m), 1, 2), r"weights.*meta"),
    _case("sd_As", lambda m: ops.stacked_delta([f32(5, 2)], [f32(2, 7, device=m)], ones(1), 1.0), r"As\[0\].*meta"),
    _case("sd_weights", lambda m: ops.stacked_delta([f32(5, 2)], [f32(2, 7)], torch.ones(1, device=m), 1.0),
          r"weights.*meta"),
    _case("sdi_W", lambda m: ops.stacked_delta_(f32(5, 7, device=m), [f32(5, 2)], [f32(2, 7)], ones(1), 1.0),
          r"W.*meta"),
]


@pytest.mark.parametrize("call, match", META_CASES)
def test_mixed_devices_raise_naming_the_argument(call, match):
    """A meta tensor among CPU tensors (a second device type that every build has) is rejected with a
    message naming the tensor, instead of silently running the fake kernel on real CPU tensors."""
    with pytest.raises(ERRORS, match=match):
        call("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.cuda
def test_cpu_and_cuda_tensors_raise():
    """A CPU tensor among CUDA tensors is rejected, naming it."""
    with pytest.raises(ERRORS, match=r"xs\[1\].*cpu"):
        ops.weighted_sum([f32(3, 2, device="cuda"), f32(3, 2)], torch.ones(2, device="cuda"), 1, 2)
