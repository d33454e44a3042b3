"""RoLoRA (Chen et al., "Robust federated finetuning of LLMs via alternating optimization of LoRA",
NeurIPS'25, arXiv 2502.01755): alternate which LoRA factor trains, so that averaging it is exact.

Rounds 1, 3, ... train B with A frozen, rounds 2, 4, ... train A with B frozen (B first: a fresh B is 0,
so A has no gradient until B has moved). A client uploads only the factor it trained (and the head); the
server sets it to the FedAvg of the uploads, B = sum_k p_k B_k (or A = sum_k p_k A_k), p_k = n_k / n.
This is exact because every client held the same other factor: sum_k p_k B_k A = (sum_k p_k B_k) A.
The aggregate is an average of same-shaped uploads, so DP-FedAvg and the server optimizers apply to it.
The alternation and the download are :class:`~fedlora_ext.strategies.alternating.Alternating`'s.
"""

from __future__ import annotations

from fedlora_ext.strategies.alternating import Alternating
from fedlora_ext.strategies.base import register


@register
class RoLoRA(Alternating):
    name = "rolora"
    averages_updates = True
    heterogeneous_ranks = False
