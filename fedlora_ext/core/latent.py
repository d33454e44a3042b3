"""LoRA-SB's trainable r x r matrix R between peft's ``lora_A`` and ``lora_B`` (Ponkshe et al., arXiv
2411.19557; federated as Fed-SB, arXiv 2502.15436): the update becomes s B R A.

peft's LoRA layer adds ``lora_B(lora_A(dropout(x))) * s``. Putting a :class:`LatentDown` in place of
its ``lora_A`` module (an ``nn.Linear`` whose weight is A, followed by ``R = nn.Linear(r, r, bias=False)``)
gives s B R (A x) without touching peft's forward, and R is an ``nn.Linear`` of its own, so the
per-sample gradient rule of :mod:`fedlora_ext.dp.per_sample` applies to it unchanged (its input is A x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentDown(nn.Linear):
    """A peft ``lora_A`` module with R after it: ``forward(x) = R (A x)``; ``weight`` is A ``[r, in]``,
    ``R.weight`` is R ``[r, r]`` (starts at 0: the update s B R A starts at 0)."""

    def __init__(self, down: nn.Linear) -> None:
        factory = {"device": down.weight.device, "dtype": down.weight.dtype}
        super().__init__(down.in_features, down.out_features, bias=False, **factory)
        with torch.no_grad():
            self.weight.copy_(down.weight)
        self.weight.requires_grad_(down.weight.requires_grad)
        self.R = nn.Linear(down.out_features, down.out_features, bias=False, **factory)
        with torch.no_grad():
            self.R.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.R(F.linear(x, self.weight))

    def plain(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding A (a copy), for a model without R."""
        down = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                         dtype=self.weight.dtype)
        with torch.no_grad():
            down.weight.copy_(self.weight)
        return down
