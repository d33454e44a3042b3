"""FedEx-LoRA (Singhal et al., ACL'25, arXiv 2410.09432): FedIT's averages A = sum p_k A_k, B = sum p_k B_k,
plus the exact residual folded into the base: W0 += s (sum_k p_k B_k A_k - B A).

The residual is one stacked_delta_ call with K + 1 factor pairs (the last with weight -s), added to W
as stored: transposed for GPT-2's Conv1D (the reference GLUE code adds it transposed for every layer,
which only square q/v matrices hide). The download is A, B and the residual in factored form,
(K + 1) r (m + n) per module.
"""

from __future__ import annotations

import torch

from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import (
    average_tensors,
    factor_kind,
    fedavg_weights,
    register,
)
from fedlora_ext.strategies.merging import MergingStrategy


@register
class FedExLoRA(MergingStrategy):
    name = "fedex_lora"
    heterogeneous_ranks = False

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        p = fedavg_weights(replies)
        averaged = average_tensors(replies, list(replies[0].tensors), p)
        s = self.scaling()
        weights = torch.cat([p * s, torch.tensor([-s])])  # CPU; merge_stacked_ moves them
        modules = sorted({n.rsplit(".", 1)[0] for n in averaged if factor_kind(n) == "lora_A"})
        for module in modules:
            Bs = [r.tensors[f"{module}.lora_B"] for r in replies] + [averaged[f"{module}.lora_B"]]
            As = [r.tensors[f"{module}.lora_A"] for r in replies] + [averaged[f"{module}.lora_A"]]
            self.merge(state, module, Bs, As, weights, round_index)
        state.tensors.update(averaged)
        return state
