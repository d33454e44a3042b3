"""Methods that fold adapter products into the frozen base weights (FLoRA, FedEx-LoRA).

The server keeps float32 master copies of the adapted base weights in ``GlobalState.base`` and merges
``W += sum_k w_k B_k A_k`` through the fused ``stacked_delta_`` (transposed for GPT-2's Conv1D). What a
client downloads to follow is the stacked factors of every merge since it last took part, so the
simulator keeps those stacks until every client has them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedlora_ext.core import adapters
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.strategies.base import Strategy

_STACK_PREFIX = "round"  # download names of the stacks: "round<r>.<module>.B_stacked"


class MergingStrategy(Strategy):
    """Base-merging bookkeeping shared by FLoRA and FedEx-LoRA: the client downloads the global tensors
    and the stacks it missed; in the simulator its base is already the merged one (the server's), so
    prepare loads only the global tensors."""

    merges_base = True

    def download(self, state: GlobalState, client: ClientState, round_index: int) -> dict[str, Tensor]:
        return {**self.missed_stacks(state, client), **{n: t.clone() for n, t in state.tensors.items()}}

    def prepare(self, model, client, payload, round_index) -> None:
        tensors = {n: t for n, t in payload.items() if not n.startswith(_STACK_PREFIX)}
        super().prepare(model, client, tensors, round_index)

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        state.base = {n: w.detach().float().clone() for n, w in adapters.base_weights(model).items()}
        self._fan_in_fan_out = {n: adapters.is_fan_in_fan_out(model, n) for n in state.base}
        state.info["stacks"] = {}  # round -> {"<module>.B_stacked": [m, R], "<module>.A_stacked": [R, n]}
        return state

    def merge(self, state: GlobalState, module: str, Bs: list[Tensor], As: list[Tensor], weights: Tensor,
              round_index: int) -> None:
        """``base[module] += sum_k weights_k B_k A_k``, applied as the stacked product B_s A_s that clients
        download, so a client following the merges on its own copy of the base gets the same bits."""
        stack = state.info["stacks"].setdefault(round_index, {})
        stack[f"{module}.B_stacked"] = torch.cat([b.float() for b in Bs], dim=1)
        stack[f"{module}.A_stacked"] = torch.cat([w * a.float() for w, a in zip(weights.tolist(), As)], dim=0)
        apply_stack(state.base[module], stack[f"{module}.B_stacked"], stack[f"{module}.A_stacked"],
                    self._fan_in_fan_out[module])

    def missed_stacks(self, state: GlobalState, client: ClientState) -> dict[str, Tensor]:
        """The stacked factors of every merge since the client last took part (what it must download)."""
        # A client that trained in round L had every merge before L; it needs those of rounds >= L.
        since = client.info.get("last_round", 0)
        return {f"{_STACK_PREFIX}{r}.{n}": t for r, stack in sorted(state.info["stacks"].items()) if r >= since
                for n, t in stack.items()}

    def follow_merges(self, base: dict[str, Tensor], payload: Mapping[str, Tensor], merged_through: int) -> int:
        """Applies the downloaded stacks of every round >= ``merged_through`` to a client's own copy of
        the merged base (float32, by module), in round order; returns the next round it lacks. Stacks of
        rounds it has already merged are skipped, so a download that repeats one (the server missed a
        reply) is harmless."""
        rounds = sorted({int(n.split(".", 1)[0].removeprefix(_STACK_PREFIX)) for n in payload
                         if n.startswith(_STACK_PREFIX)})
        for r in rounds:
            if r < merged_through:
                continue
            prefix = f"{_STACK_PREFIX}{r}."
            for module in sorted({n[len(prefix):].rsplit(".", 1)[0] for n in payload if n.startswith(prefix)}):
                if module not in base:
                    raise ValueError(f"download: stack for unknown module {module!r}; known: {sorted(base)[:4]}...")
                apply_stack(base[module], payload[f"{prefix}{module}.B_stacked"],
                            payload[f"{prefix}{module}.A_stacked"], self._fan_in_fan_out[module])
            merged_through = r + 1
        return merged_through

    def end_round(self, state: GlobalState, clients: list[ClientState]) -> None:
        """Drops the stacks every client has merged already."""
        everyone_has = min(c.info.get("last_round", 0) for c in clients)  # merges before this are delivered
        for r in [r for r in state.info["stacks"] if r < everyone_has]:
            del state.info["stacks"][r]


def apply_stack(W: Tensor, B_stacked: Tensor, A_stacked: Tensor, fan_in_fan_out: bool) -> None:
    """``W += B_s A_s`` in place (transposed for fan_in_fan_out): one merge, on the server or a client."""
    adapters.merge_stacked_(W, [B_stacked], [A_stacked], torch.ones(1), fan_in_fan_out)

