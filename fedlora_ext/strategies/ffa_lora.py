"""FFA-LoRA (Sun et al., ICLR'24, arXiv 2403.12313): A random, shared by every client, frozen forever;
only B trains and travels, so averaging B is exact: sum p_k B_k A = (sum p_k B_k) A.

Every client derives the same A from the run's shared initialisation seed (no bytes on the wire); the
simulator keeps that one A in the server state.
"""

from __future__ import annotations

from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.strategies.base import Strategy, factor_kind, register


@register
class FFALoRA(Strategy):
    name = "ffa_lora"
    averages_updates = True
    heterogeneous_ranks = False

    def download(self, state: GlobalState, client: ClientState, round_index: int):
        return {n: t.clone() for n, t in state.tensors.items() if factor_kind(n) != "lora_A"}

    def prepare(self, model, client, payload, round_index) -> None:
        # the shared A: every client derives it from the run's shared seed (kept once here)
        super().prepare(model, client, {**self._state_a, **payload}, round_index)

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        self._state_a = {n: t for n, t in state.tensors.items() if factor_kind(n) == "lora_A"}
        return state

    def trainable(self, round_index: int) -> dict[str, bool]:
        return {"A": False, "B": True, "head": True}
