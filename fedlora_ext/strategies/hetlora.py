"""HetLoRA (Cho et al., EMNLP'24, arXiv 2401.06432): heterogeneous client ranks r_k <= r_max.

Client: takes the first r_k ranks of the global factors and trains with the rank self-pruning penalty
lambda * ||B[:, g r_k:]||_F * ||A[g r_k:, :]||_F (g = hetlora_gamma), summed over modules; when the tail
norm fell since its last round it shrinks r_k <- floor(g r_k) for the next one.
Server: zero-pads every client's factors to r_max and averages them with sparsity weights
w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F, per module.
"""

from __future__ import annotations

import math

import torch

from fedlora_ext.core import adapters
from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import (
    Strategy,
    average_tensors,
    factor_kind,
    fedavg_weights,
    register,
)


def product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B A||_F without forming B A: sqrt(trace((B^T B)(A A^T))), r x r work."""
    B, A = B.double(), A.double()
    return float(torch.sqrt(torch.clamp(torch.trace((B.T @ B) @ (A @ A.T)), min=0.0)))


@register
class HetLoRA(Strategy):
    name = "hetlora"

    def tail_start(self, rank: int) -> int:
        return int(math.floor(self.config.hetlora_gamma * rank))

    def penalty(self, model, client):
        lam = self.config.hetlora_lambda
        if lam == 0:
            return None
        start = self.tail_start(client.rank)
        layers = adapters.adapter_layers(model)

        def tail_penalty() -> torch.Tensor:
            total = 0.0
            for layer in layers.values():
                A = layer.lora_A[adapters.ADAPTER].weight
                B = layer.lora_B[adapters.ADAPTER].weight
                total = total + torch.linalg.norm(B[:, start:]) * torch.linalg.norm(A[start:, :])
            return lam * total

        return tail_penalty

    def local_update(self, trainer, model, client, round_index: int) -> float:
        loss = super().local_update(trainer, model, client, round_index)
        tail = self._tail_norm(model, client.rank)
        previous = client.info.get("tail_norm")
        if previous is not None and tail < previous and client.rank > 1:
            client.info["next_rank"] = max(1, self.tail_start(client.rank))  # self-pruning
        client.info["tail_norm"] = tail
        return loss

    @torch.no_grad()
    def _tail_norm(self, model, rank: int) -> float:
        start = self.tail_start(rank)
        return sum(float(torch.linalg.norm(l.lora_B[adapters.ADAPTER].weight[:, start:]) *
                         torch.linalg.norm(l.lora_A[adapters.ADAPTER].weight[start:, :]))
                   for l in adapters.adapter_layers(model).values())

    def keep(self, model, client, round_index):
        if "next_rank" in client.info:  # the pruned rank applies from the client's next round
            client.rank = client.info.pop("next_rank")
            client.info.pop("tail_norm", None)
        return {}

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        r_max = self.global_rank()
        modules = sorted({n.rsplit(".", 1)[0] for n in replies[0].tensors if factor_kind(n) == "lora_A"})
        updated = {}
        for module in modules:
            a, b = f"{module}.lora_A", f"{module}.lora_B"
            norms = torch.tensor([product_norm(r.tensors[b], r.tensors[a]) for r in replies], dtype=torch.float64)
            weights = (norms / norms.sum() if norms.sum() > 0 else torch.full_like(norms, 1 / len(replies))).float()
            updated.update(average_tensors(replies, [a, b], weights, {a: r_max, b: r_max}))
        heads = [n for n in replies[0].tensors if factor_kind(n) == "head"]
        updated.update(average_tensors(replies, heads, fedavg_weights(replies)))
        return GlobalState(tensors={**state.tensors, **updated}, base=state.base, info=state.info)
