"""An opacus ``DPOptimizer`` whose clip -> accumulate -> noise -> scale runs as fused list ops.

opacus 1.6 runs ``clip_and_accumulate(); add_noise(); scale_grad()`` as a few ATen calls per parameter;
:class:`FusedDPOptimizer` does the per-sample work (norms, flat clipping ``c_i = min(1, C / (n_i + 1e-6))``,
the clipped sum, the noise ``N(0, (sigma C)^2)`` and the division by ``expected_batch_size *
accumulated_iterations`` for mean reduction) as one ``fedlora_ext.ops.dp_clip_noise_with_sum`` call over
every parameter: one read of the per-sample gradients gives both the clipped sum, kept in ``p.summed_grad``
as opacus keeps it, and the noised gradient. Virtual steps accumulate into ``p.summed_grad`` instead
(``dp_clip_noise`` with the noise off); the real step after them scales the accumulated sum with one
``_foreach_div`` and noises it with one ``fedlora_ext.ops.gaussian_noise_`` call. Either way the noise takes
the stream positions ``dp_clip_noise`` would give it (DESIGN.md "The noise stream").
With the noise off the result equals opacus's to float rounding; with it on the noise has the same
distribution, drawn from the fedlora Philox stream instead of torch's generator.

One line turns an opacus training loop onto the fused path::

    model, optimizer, loader = PrivacyEngine().make_private(module=model, optimizer=optimizer, ...)
    optimizer = fedlora_ext.dp.fuse(optimizer)   # the accountant hook and every opacus attribute come along

opacus's bookkeeping is kept exactly: per-sample gradients already used by a step are refused with
opacus's ``ValueError`` (call ``zero_grad()`` between steps; nothing moves and the accountant counts
nothing), ``p.summed_grad`` holds the clipped sum, ``p.grad_sample`` is left in place and marked as used,
``signal_skip_step`` / ``BatchMemoryManager`` virtual steps accumulate into ``p.summed_grad`` and set
``_is_last_step_skipped``, several backward passes before a step (``accumulated_iterations``) divide by
``expected_batch_size * accumulated_iterations``, and the step hook (the accountant) runs on real steps only.

Noise key. By default a fresh 63-bit secret from the OS CSPRNG (``secrets``), never torch's global RNG,
with one offset per step, so ``torch.manual_seed`` does not replay the noise (opacus's default does).
Reproducible noise is an explicit choice: ``fuse(optimizer, seed=...)`` fixes the key (offsets count the
steps from 0), and a ``torch.Generator`` (opacus's ``generator`` / ``make_private(noise_generator=...)``,
or ``fuse(optimizer, generator=...)``) gives every step the key ``randint(0, 2**63 - 1, generator=...)``
at offset 0, drawn only when the noise is on: the noise is then a function of the generator's state, as
opacus's is (reseed it to replay; ``generator=torch.default_generator`` follows ``torch.manual_seed``).

Fallbacks to opacus's own code, each where the fused ops cannot run:

* ``secure_mode=True``: opacus's whole step. Its noise (four normals summed, robust to floating-point
  attacks) comes from opacus's secure generator, which the Philox stream does not replace.
* parameters of mixed dtypes or devices, or of a dtype other than float32 / bfloat16 / float16 (the
  fused ops take one dtype and one device, and clip over all parameters at once): opacus's
  ``clip_and_accumulate`` and ``scale_grad``; the noise is opacus's ``_generate_noise`` from the user's
  generator if there is one, else from a private per-device ``torch.Generator`` seeded from the secret
  key (still never the global RNG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)

from fedlora_ext import ops
from fedlora_ext.dp.sgd import NoiseStream

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SEED_BOUND = 2**63 - 1  # randint's upper bound is exclusive: keys in [0, 2^63 - 1)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"fuse: seed must be an int in [0, 2^63), got {seed!r}")
    return seed


class FusedDPOptimizer(DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` with the DP step fused into list ops (same arguments).

    Args:
        optimizer: the wrapped optimizer.
        noise_multiplier: sigma.
        max_grad_norm: the clipping bound C.
        expected_batch_size: the mean-reduction denominator (Poisson sampling's expected batch).
        loss_reduction: ``"mean"`` or ``"sum"``.
        noise_seed: a fixed noise key in ``[0, 2^63)`` (reproducible runs). By default a fresh secret from
            ``secrets``. Not together with ``generator``.
        **kwargs: passed on to ``DPOptimizer``: ``generator`` (a ``torch.Generator``: every step's noise key
            is drawn from it, see the module docstring) and ``secure_mode`` (opacus's own step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int | None, loss_reduction: str = "mean", noise_seed: int | None = None,
                 **kwargs) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)
        self._init_noise(noise_seed)

    def _init_noise(self, seed: int | None) -> None:
        if seed is not None and self.generator is not None:
            raise ValueError("fuse: give either a seed or a generator for the noise, not both")
        # one offset per fused step: a fresh stretch of the stream every time
        self._noise = NoiseStream.fresh() if seed is None else NoiseStream(_check_seed(seed))
        self._fallback_generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_optimizer(cls, dp_optimizer: DPOptimizer, *, seed: int | None = None,
                       generator: torch.Generator | None = None) -> FusedDPOptimizer:
        """The fused twin of an existing ``DPOptimizer`` (e.g. from ``PrivacyEngine.make_private``):
        the same inner optimizer, accountant hook, skip queue, generator and every other attribute
        (``p.summed_grad`` of a half-accumulated virtual step included)."""
        if type(dp_optimizer) is not DPOptimizer:
            raise TypeError(
                f"fuse: expected an opacus DPOptimizer (flat clipping, non-distributed), got "
                f"{type(dp_optimizer).__name__}; per-layer, adaptive and distributed clipping are not fused"
            )
        fused = cls.__new__(cls)
        fused.__dict__.update(dp_optimizer.__dict__)  # DPOptimizer keeps all its state in attributes
        if generator is not None:
            if dp_optimizer.generator is not None and dp_optimizer.generator is not generator:
                raise ValueError("fuse: the optimizer already has a noise generator")
            fused.generator = generator
        fused._init_noise(seed)
        return fused

    # ------------------------------------------------------------------------------------ noise keys

    def _noise_key(self) -> tuple[int, int]:
        """(seed, offset) of this step's noise: from the user's generator, else the stream's next offset."""
        if self.generator is not None:
            g = self.generator
            seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=g, device=g.device).item())
            return seed, 0
        return self._noise.seed, self._noise.next_offset()

    def _fallback_generator(self, device: torch.device) -> torch.Generator:
        """A private generator per device, seeded from the secret key (fallback noise, no user generator)."""
        if device not in self._fallback_generators:
            digest = hashlib.blake2b(f"{self._noise.seed}/{device}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "little") >> 1
            self._fallback_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._fallback_generators[device]

    # ------------------------------------------------------------------------------------ the step

    def _fusable(self, params: list[torch.nn.Parameter]) -> bool:
        if self.secure_mode:
            return False  # opacus's floating-point-attack-resistant noise from its secure generator
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        return len(dtypes) == 1 and dtypes.pop() in _FUSED_DTYPES and len(devices) == 1

    def add_noise(self) -> None:
        """opacus's ``add_noise`` (fallback path only), but never from torch's global RNG."""
        if self.secure_mode or self.generator is not None:
            return super().add_noise()
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            generator = self._fallback_generator(p.summed_grad.device) if std > 0 else None
            noise = _generate_noise(std=std, reference=p.summed_grad, generator=generator, secure_mode=False)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        return None

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        # opacus's params and grad_samples properties rebuild their lists on every access: read them once
        # (a Python-level pass per parameter is a visible share of a fused step over a few dozen LoRA tensors)
        params = self.params
        grad_samples = [self._get_flat_grad_sample(p) for p in params]  # what self.grad_samples returns
        if len(grad_samples) == 0:
            return True
        if not self._fusable(params):
            return super().pre_step(closure)

        # clip_and_accumulate: refuse per-sample grads a step already used (opacus's ValueError)
        for p in params:
            _check_processed_flag(p.grad_sample)
        # (no .to() call where the dtype already matches: a Python-level op per parameter is a visible
        # share of a fused step over a few dozen LoRA tensors)
        per_sample = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grad_samples, params)]
        denominator = (self.expected_batch_size * self.accumulated_iterations
                       if self.loss_reduction == "mean" else 1)
        # A real step with nothing accumulated needs the clipped sum and the noised gradient from the same
        # data: one pass. Virtual steps (and the real step after them) accumulate into p.summed_grad first.
        one_pass = not self._check_skip_next_step(pop_next=False) and all(p.summed_grad is None for p in params)
        if one_pass:
            self._clip_noise_in_one_pass(params, per_sample, denominator)
        else:
            self._accumulate(params, per_sample)
        if self._check_skip_next_step():  # pops the queue, as opacus does on every step
            self._is_last_step_skipped = True
            return False
        if not one_pass:
            self._noise_and_scale(params, denominator)

        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _clip_noise_in_one_pass(self, params, per_sample, denominator) -> None:
        """p.summed_grad (the clipped sum) and p.grad (noised and scaled) from one read of the per-sample
        gradients; the noise takes the stream positions gaussian_noise_ would give it."""
        sigma = self.noise_multiplier
        seed, offset = self._noise_key() if sigma * self.max_grad_norm > 0 else (0, 0)
        grads, sums, _ = ops.dp_clip_noise_with_sum(per_sample, self.max_grad_norm, sigma, float(denominator),
                                                    seed, offset)
        for p, s, grad in zip(params, sums, grads):
            s._processed = True  # _mark_as_processed(p.summed_grad), without its type checks
            p.summed_grad = s
            p.grad = grad if grad.shape == p.shape else grad.view_as(p)  # g_j.shape[1:] is p's shape
            _mark_as_processed(p.grad_sample)

    def _accumulate(self, params, per_sample) -> None:
        """clip_and_accumulate: clip and sum in one call, add into p.summed_grad, mark the grads used."""
        sums, _ = ops.dp_clip_noise(per_sample, self.max_grad_norm, 0.0, 1.0, 0, 0)
        for p, s in zip(params, sums):
            if p.summed_grad is not None:
                p.summed_grad += s
            else:
                p.summed_grad = s
            _mark_as_processed(p.grad_sample)

    def _noise_and_scale(self, params, denominator) -> None:
        """add_noise + scale_grad on the accumulated sum: p.grad = (summed + N(0, (sigma C)^2)) / denominator."""
        summed = [p.summed_grad for p in params]
        for s in summed:
            _check_processed_flag(s)
        grads = torch._foreach_div(summed, float(denominator))
        std = self.noise_multiplier * self.max_grad_norm / denominator
        if std > 0:
            ops.gaussian_noise_(grads, std, *self._noise_key())
        for p, grad in zip(params, grads):
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)


def fuse(dp_optimizer: DPOptimizer, *, seed: int | None = None,
         generator: torch.Generator | None = None) -> FusedDPOptimizer:
    """``optimizer = fuse(optimizer)``: the one line that puts an opacus training loop on the fused step.

    Args:
        dp_optimizer: a plain opacus ``DPOptimizer`` (e.g. from ``PrivacyEngine.make_private``).
        seed: a fixed noise key in ``[0, 2^63)`` for reproducible runs; by default a fresh secret.
        generator: a ``torch.Generator`` to draw every step's noise key from (opacus's ``generator``
            semantics; ``torch.default_generator`` follows ``torch.manual_seed``). An optimizer made with
            ``make_private(noise_generator=g)`` already carries ``g``.
    """
    return FusedDPOptimizer.from_optimizer(dp_optimizer, seed=seed, generator=generator)
