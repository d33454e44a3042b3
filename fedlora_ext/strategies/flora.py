"""FLoRA (Wang et al., NeurIPS'24, arXiv 2409.05976): fresh LoRA every round at each client's own rank;
the server stacks A_s = [p_1 s_1 A_1; ...; p_K s_K A_K] and B_s = [B_1 ... B_K], so B_s A_s =
sum_k p_k s_k B_k A_k exactly, and merges it into the frozen base.

Unlike the reference code, stacking is over the clients that replied, with their own ranks, and the
download is the stacks of every merge the client missed: (sum_k r_k)(m + n) per module and round.
"""

from __future__ import annotations

from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import (
    adapted_modules,
    average_tensors,
    factor_kind,
    fedavg_weights,
    register,
)
from fedlora_ext.strategies.merging import MergingStrategy


@register
class FLoRA(MergingStrategy):
    name = "flora"

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        state.tensors = {n: t for n, t in state.tensors.items() if factor_kind(n) == "head"}
        return state

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        p = fedavg_weights(replies)
        weights = self.product_weights(replies)  # p_k s_k
        for module in adapted_modules(replies[0]):
            Bs = [r.tensors[f"{module}.lora_B"] for r in replies]
            As = [r.tensors[f"{module}.lora_A"] for r in replies]
            self.merge(state, module, Bs, As, weights, round_index)
        heads = [n for n in replies[0].tensors if factor_kind(n) == "head"]
        state.tensors.update(average_tensors(replies, heads, p))
        return state
