"""The alternating freeze shared by LoRA-A2 (arXiv 2410.22815) and RoLoRA (arXiv 2502.01755).

Rounds 1, 3, ... (round indices 0, 2, ...) train B with A frozen; rounds 2, 4, ... train A with B frozen.
Since every client holds the same frozen factor, the server's average of the trained factor is exact:
sum_k p_k B_k A = (sum_k p_k B_k) A.

Download: a client that took part in the previous round still holds the factor that was frozen then
(it kept it, and the server did not change it), so it gets only the factor the server updated last round
and the head; any other client gets both factors. Each client keeps the frozen factor of its round.
"""

from __future__ import annotations

from fedlora_ext.core import adapters
from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import Strategy, factor_kind


class Alternating(Strategy):
    """A method that trains B in rounds 1, 3, ... and A in rounds 2, 4, ... (the other factor frozen)."""

    def factor(self, round_index: int) -> str:
        """The factor trained in round ``round_index`` (0-based): ``"lora_B"`` or ``"lora_A"``."""
        return "lora_B" if round_index % 2 == 0 else "lora_A"

    def trainable(self, round_index: int) -> dict[str, bool]:
        trains_b = self.factor(round_index) == "lora_B"
        return {"A": not trains_b, "B": trains_b, "head": True}

    def download(self, state: GlobalState, client, round_index: int):
        everything = super().download(state, client, round_index)
        if round_index > 0 and client.info.get("last_round") == round_index - 1:
            updated = self.factor(round_index - 1)  # the client still holds the other factor
            return {n: t for n, t in everything.items() if factor_kind(n) in (updated, "head")}
        return everything

    def keep(self, model, client, round_index: int):
        frozen = "lora_A" if self.factor(round_index) == "lora_B" else "lora_B"
        return {n: p.detach().clone() for n, p in adapters.adapter_parameters(model).items() if factor_kind(n) == frozen}
