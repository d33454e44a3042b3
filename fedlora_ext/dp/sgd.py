"""The pieces of one DP-SGD step (opacus 1.6 semantics, METHODS.md) for a federated client.

Poisson sampling from a secret generator, a loss that is a sum of per-sample losses, per-sample
gradients (:mod:`fedlora_ext.dp.per_sample`), then one fused ``dp_clip_noise`` call:
``grad = (sum_i min(1, C / (n_i + 1e-6)) g_i + N(0, (sigma C)^2)) / (q n)``.
The noise key is drawn from the OS CSPRNG and lives only in the client's :class:`NoiseStream`; every
step takes a fresh offset, so no stretch of the stream is ever used twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora_ext import ops
from fedlora_ext.dp.accountant import PrivacyAccount


@dataclass
class NoiseStream:
    """A secret Philox key and the next unused offset. The key is never sent, logged or printed."""

    seed: int = field(repr=False)
    offset: int = 0

    @classmethod
    def fresh(cls) -> NoiseStream:
        """A key from the OS CSPRNG (``secrets``)."""
        return cls(secrets.randbits(63))

    def next_offset(self) -> int:
        offset = self.offset
        self.offset += 1
        return offset

    def poisson_sample(self, population: int, rate: float, offset: int, stream: int = 0x5A) -> np.ndarray:
        """Indices of a Poisson sample (each record independently with probability ``rate``), drawn from
        a generator keyed by the secret, the step's offset and ``stream`` (one label per use):
        unpredictable without the key."""
        rng = np.random.default_rng([self.seed, offset, stream])
        return np.flatnonzero(rng.random(population) < rate)


@dataclass
class ClientPrivacy:
    """A client's DP-SGD state for the whole run: its account, its noise stream and the clipping bound."""

    account: PrivacyAccount
    noise: NoiseStream
    max_grad_norm: float

    @property
    def noise_multiplier(self) -> float:
        return self.account.noise_multiplier

    def refusal(self, steps: int, who: str) -> str | None:
        """Why the client may not take ``steps`` more DP-SGD steps (its budget would be exceeded), or None."""
        return self.account.refusal(steps, who)


def summed_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The sum over the batch of each sample's own loss: cross-entropy for classification, the mean
    next-token cross-entropy of the sample's labelled tokens (labels -100 ignored) for a causal LM.
    (Hugging Face's loss averages tokens over the whole batch, which couples the samples.)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction="sum")
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counts = (targets != -100).sum(1).clamp(min=1)
    return (token_loss.sum(1) / counts).sum()


def noisy_gradients_(params: Sequence[nn.Parameter], grad_samples: Sequence[Tensor | None], batch_size: int,
                     privacy: ClientPrivacy, expected_batch_size: float, offset: int,
                     masks: Sequence[Tensor | None] | None = None) -> Tensor:
    """Sets every ``p.grad`` to its clipped, noised, averaged gradient; returns the per-sample norms.

    ``grad_samples[i]`` is ``[batch_size, *params[i].shape]`` or None (no gradient reached it: zeros).
    ``masks[i]``, broadcastable to ``params[i]``, zeroes coordinates that must not train (LoRA-A2's
    unselected ranks) before clipping, so they spend no clipping budget, and again after the noise.
    """
    per_sample = []
    for i, (p, g) in enumerate(zip(params, grad_samples)):
        g = g if g is not None else p.new_zeros((batch_size, *p.shape))
        if masks is not None and masks[i] is not None:
            g = g * masks[i].to(g.dtype)
        per_sample.append(g)
    grads, norms = ops.dp_clip_noise(per_sample, privacy.max_grad_norm, privacy.noise_multiplier,
                                     float(expected_batch_size), privacy.noise.seed, offset)
    for i, (p, grad) in enumerate(zip(params, grads)):
        if masks is not None and masks[i] is not None:
            grad = grad * masks[i].to(grad.dtype)
        p.grad = grad.view_as(p)
    return norms
