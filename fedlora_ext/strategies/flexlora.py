"""FlexLoRA (Bai et al., NeurIPS'24, arXiv 2402.11505): heterogeneous client ranks r_k, A and B trained.

Server: the full-size update dW = sum_k p_k s_k B_k A_k (p_k = n_k / n over the round's replies,
s_k the client's LoRA scale) and its SVD dW = U S V^T, taken from the stacked factors
(:mod:`fedlora_ext.strategies.lowrank`; the [m, n] dW is never formed). Download: client k gets the
rank-r_k truncation split with sqrt(S) on each side and its scale undone,
B_k = U_r sqrt(S_r / s_k), A_k = sqrt(S_r / s_k) V_r^T, so s_k B_k A_k is exactly U_r S_r V_r^T (one
public version puts all of S on one side and loses a factor; sqrt(S) on each side also keeps B and A
on one scale). Upload: B_k and A_k, r_k (m + n) per layer; the head is averaged.

The global model: the server keeps dW's SVD split at the global rank G = ``rank`` (validated >= every
client rank), with scale s_G: B_G = U_G sqrt(S_G / s_G), A_G = sqrt(S_G / s_G) V_G^T, zero-padded
where dW has fewer than G components. Evaluation and export see W0 + s_G B_G A_G, the best rank-G
approximation of dW (Eckart-Young), which IS dW whenever G >= rank(dW) (at most the sum of the round's
client ranks, and min(m, n)): set ``rank`` to the sum of the client ranks, or to the adapted layers'
width, for the paper's full-size global model; ``rank`` = the largest client rank keeps the global at
the largest rank. Every client's download is the first r_k components of B_G, A_G rescaled by
sqrt(s_G / s_k). Components whose singular value is 0 (dW of rank below r_k, e.g. a round where only
small-rank clients replied) download as zero rows and columns, as the paper's rule gives them.

Private by construction: under DP-SGD the uploads are the noised factors and the SVD is
post-processing. DP-FedAvg is refused: the server step is not an average of same-shaped uploads.
"""

from __future__ import annotations

import torch

from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.strategies.base import (
    Strategy,
    adapted_modules,
    average_tensors,
    factor_kind,
    fedavg_weights,
    register,
)
from fedlora_ext.strategies.lowrank import stacked_svd, truncated_factors


@register
class FlexLoRA(Strategy):
    name = "flexlora"

    def validate(self, config) -> None:
        super().validate(config)
        if config.rank < max(config.ranks()):
            raise ValueError(f"flexlora: rank (the global adapter's rank) must be >= every client rank, got rank = "
                             f"{config.rank} and client_ranks {list(config.ranks())}")

    def global_rank(self) -> int:
        """G = ``rank``: the global model is dW's best rank-G approximation (dW itself when G >= rank(dW))."""
        return self.config.rank

    def download(self, state: GlobalState, client: ClientState, round_index: int):
        """The first r_k components of the global factors, rescaled from s_G to the client's s_k once
        they are an SVD split (before the first aggregation B = 0 and A is the shared initialisation,
        sent as it is so that every client starts from the usual LoRA initialisation at its rank)."""
        ratio = (self.scaling(self.global_rank()) / self.scaling(client.rank)) ** 0.5 if state.info.get("svd") else 1.0
        out = {}
        for name, tensor in state.tensors.items():
            kind = factor_kind(name)
            if kind == "lora_A":
                out[name] = (tensor[: client.rank] * ratio).contiguous()
            elif kind == "lora_B":
                out[name] = (tensor[:, : client.rank] * ratio).contiguous()
            else:
                out[name] = tensor.clone()
        return out

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        weights = self.product_weights(replies, torch.float64)  # p_k s_k
        G = self.global_rank()
        s_G = self.scaling(G)
        updated = {}
        for module in adapted_modules(replies[0]):
            a, b = f"{module}.lora_A", f"{module}.lora_B"
            U, S, Vh = stacked_svd([r.tensors[b] for r in replies], [r.tensors[a] for r in replies], weights)
            B, A = truncated_factors(U, S, Vh, G, s_G)
            updated[a] = A.to(state.tensors[a].dtype)
            updated[b] = B.to(state.tensors[b].dtype)
        heads = [n for n in replies[0].tensors if factor_kind(n) == "head"]
        updated.update(average_tensors(replies, heads, fedavg_weights(replies)))
        return GlobalState(tensors={**state.tensors, **updated}, base=state.base, info={**state.info, "svd": True})
