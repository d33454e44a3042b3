"""An opacus ``DPOptimizer`` whose clip -> accumulate -> noise -> scale is one fused op.

opacus 1.6 runs ``clip_and_accumulate(); add_noise(); scale_grad()`` as a few ATen calls per parameter;
:class:`FusedDPOptimizer` runs the same math as one ``fedlora_ext.ops.dp_clip_noise`` call over every
parameter (flat clipping, ``c_i = min(1, C / (n_i + 1e-6))``, noise ``N(0, (sigma C)^2)``, division by
``expected_batch_size * accumulated_iterations`` for mean reduction). With the noise off the result
equals opacus's to float rounding; with it on the noise has the same distribution, drawn from the
fedlora Philox stream with a seed from the OS CSPRNG that never leaves the optimizer.

One line turns an opacus training loop onto the fused path::

    model, optimizer, loader = PrivacyEngine().make_private(module=model, optimizer=optimizer, ...)
    optimizer = fedlora_ext.dp.fuse(optimizer)   # the accountant hook comes along

Cases the fused op does not cover fall back to opacus's own step, so behaviour never changes: gradient
accumulation across skipped (virtual) steps, ``secure_mode`` noise, a user ``generator``, and parameters
of mixed dtypes or devices, or of a dtype outside float32 / bfloat16 / float16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _mark_as_processed

from fedlora_ext import ops
from fedlora_ext.dp.sgd import NoiseStream

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedDPOptimizer(DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` with the DP step fused into one op (same arguments).

    Args:
        optimizer: the wrapped optimizer.
        noise_multiplier: sigma.
        max_grad_norm: the clipping bound C.
        expected_batch_size: the mean-reduction denominator (Poisson sampling's expected batch).
        loss_reduction: ``"mean"`` or ``"sum"``.
        noise_seed: for tests only: a fixed noise key. By default a fresh secret from ``secrets``.
        **kwargs: passed on to ``DPOptimizer`` (``generator``, ``secure_mode`` select opacus's own noise).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int | None, loss_reduction: str = "mean", noise_seed: int | None = None,
                 **kwargs) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)
        # one offset per fused step: a fresh stretch of the stream every time
        self._noise = NoiseStream.fresh() if noise_seed is None else NoiseStream(int(noise_seed))

    @classmethod
    def from_optimizer(cls, dp_optimizer: DPOptimizer, *, noise_seed: int | None = None) -> FusedDPOptimizer:
        """The fused twin of an existing ``DPOptimizer`` (e.g. from ``PrivacyEngine.make_private``),
        wrapping the same inner optimizer and keeping its accountant hook."""
        if type(dp_optimizer) is not DPOptimizer:
            raise TypeError(
                f"fuse: expected an opacus DPOptimizer (flat clipping, non-distributed), got "
                f"{type(dp_optimizer).__name__}; per-layer, adaptive and distributed clipping are not fused"
            )
        fused = cls(dp_optimizer.original_optimizer, noise_multiplier=dp_optimizer.noise_multiplier,
                    max_grad_norm=dp_optimizer.max_grad_norm, expected_batch_size=dp_optimizer.expected_batch_size,
                    loss_reduction=dp_optimizer.loss_reduction, generator=dp_optimizer.generator,
                    secure_mode=dp_optimizer.secure_mode, noise_seed=noise_seed)
        fused.step_hook = dp_optimizer.step_hook
        fused._step_skip_queue = dp_optimizer._step_skip_queue
        return fused

    def _fusable(self) -> bool:
        if self.secure_mode or self.generator is not None:
            return False  # the caller asked for opacus's own noise source
        if any(p.summed_grad is not None for p in self.params) or self._check_skip_next_step(pop_next=False):
            return False  # accumulating across virtual steps: opacus's step keeps the bookkeeping
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        return len(dtypes) == 1 and dtypes.pop() in _FUSED_DTYPES and len(devices) == 1

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        grad_samples = self.grad_samples
        if grad_samples is None or len(grad_samples) == 0:
            return True
        if not self._fusable():
            return super().pre_step(closure)
        params = self.params
        denominator = (self.expected_batch_size * self.accumulated_iterations
                       if self.loss_reduction == "mean" else 1.0)
        per_sample = [g.to(p.dtype) for g, p in zip(grad_samples, params)]
        grads, _ = ops.dp_clip_noise(per_sample, self.max_grad_norm, self.noise_multiplier, float(denominator),
                                     self._noise.seed, self._noise.next_offset())
        for p, grad in zip(params, grads):
            p.grad = grad.view_as(p)
            _mark_as_processed(p.grad_sample)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


def fuse(dp_optimizer: DPOptimizer) -> FusedDPOptimizer:
    """``optimizer = fuse(optimizer)``: the one line that puts an opacus training loop on the fused step."""
    return FusedDPOptimizer.from_optimizer(dp_optimizer)
