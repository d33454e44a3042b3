"""LoRA-A2 (Koo et al., ACL'25, arXiv 2410.22815): alternating freeze and adaptive rank selection.

Rounds 1, 3, ... train B with A frozen; rounds 2, 4, ... train A with B frozen, so the server's update
of the trained factor is exact (the other factor is shared). After one local epoch each client scores
every rank i of every module, S_B[m, i] = ||dB[:, i] A[i, :]||_F (or ||B[:, i] dA[i, :]||_F), keeps the
top ``budget * N`` ranks jointly across all N modules, restarts from the round's start and trains all
local steps with the update masked to them. It uploads only the selected rank slices of the update and
their indices (int32). The server adds B <- B + sum_k w_k (dB_k * M_k), w_k = n_k / n, unrenormalised.

The alternation, the download (the factor updated last round, both factors after a skipped round) and
what a client keeps are :class:`~fedlora_ext.strategies.alternating.Alternating`'s, shared with RoLoRA.

Heterogeneous budgets: ``client_ranks`` are then per-client budgets (ranks per module on average);
every client's adapter has the global ``rank``.
"""

from __future__ import annotations

import math

import torch

from fedlora_ext import ops
from fedlora_ext.core import adapters
from fedlora_ext.core.state import GlobalState
from fedlora_ext.core.validation import RejectedUpdate, check_tensors
from fedlora_ext.strategies.alternating import Alternating
from fedlora_ext.strategies.base import (
    average_tensors,
    factor_kind,
    fedavg_weights,
    rank_dim,
    register,
)


@register
class LoRAA2(Alternating):
    name = "lora_a2"

    def validate(self, config) -> None:
        super().validate(config)
        if config.client_ranks and max(config.client_ranks) > config.rank:
            raise ValueError(f"lora_a2: client budgets {list(config.client_ranks)} exceed the adapter rank {config.rank}")

    def client_rank(self, assigned: int) -> int:
        return self.config.rank  # every adapter has the global rank; client_ranks are budgets

    def global_rank(self) -> int:
        return self.config.rank

    def budget(self, cid: int) -> float:
        return float(self.config.client_ranks[cid]) if self.config.client_ranks else self.config.lora_a2_budget

    def scoring_steps(self, num_examples: int) -> int:
        """Steps of the scoring epoch: one pass over the local data, at most ``local_steps``."""
        return max(1, min(self.config.local_steps, math.ceil(num_examples / self.config.batch_size)))

    def local_steps_per_round(self, num_examples: int) -> int:
        return self.scoring_steps(num_examples) + self.config.local_steps  # the scoring epoch sees data too

    def local_update(self, trainer, model, client, round_index: int) -> float:
        factor = self.factor(round_index)
        start = {n: p.detach().clone() for n, p in adapters.trainable_parameters(model).items()}
        trainer.train(model, steps=self.scoring_steps(client.num_examples))  # the scoring epoch
        masks = self.select_ranks(model, start, factor, self.budget(client.cid))
        adapters.write_tensors(model, start)  # restart the round from where it began, now masked
        loss = trainer.train(model, masks=adapters.rank_masks(masks))
        client.info["a2_masks"] = masks
        return loss

    @staticmethod
    def select_ranks(model, start, factor: str, budget: float) -> dict[str, torch.Tensor]:
        """Boolean masks [r] per module of the top ``budget * N`` rank scores across all modules."""
        scores = {}
        for module, layer in adapters.adapter_layers(model).items():
            A = layer.lora_A[adapters.ADAPTER].weight.detach()
            B = layer.lora_B[adapters.ADAPTER].weight.detach()
            if factor == "lora_B":
                dB = B - start[f"{module}.lora_B"]
                scores[module] = torch.linalg.norm(dB, dim=0) * torch.linalg.norm(A, dim=1)  # ||dB_i A_i||_F
            else:
                dA = A - start[f"{module}.lora_A"]
                scores[module] = torch.linalg.norm(B, dim=0) * torch.linalg.norm(dA, dim=1)
        flat = torch.cat(list(scores.values()))
        keep = min(flat.numel(), max(1, int(round(budget * len(scores)))))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.topk(flat, keep).indices] = True
        masks, start_index = {}, 0
        for module, s in scores.items():
            masks[module] = chosen[start_index : start_index + s.numel()]
            start_index += s.numel()
        return masks

    def upload(self, model, client, start, round_index):
        factor = self.factor(round_index)
        masks = client.info.pop("a2_masks")
        params = adapters.adapter_parameters(model)
        out = {}
        for module, mask in masks.items():
            ranks = mask.nonzero().flatten()
            if ranks.numel() == 0:
                continue
            name = f"{module}.{factor}"
            delta = params[name].detach() - start[name]
            out[f"{name}_delta"] = delta.index_select(rank_dim(name), ranks).clone()
            out[f"{name}_ranks"] = ranks.to(torch.int32)
        out.update({n: p.detach().clone() for n, p in adapters.head_parameters(model).items()})
        return out

    def check_upload(self, tensors, template, client, round_index: int) -> None:
        """The head as usual, and per module either nothing (no rank selected there) or a pair: the
        selected rank indices (int32, distinct, in [0, r)) and the update's slices at those ranks."""
        factor = self.factor(round_index)
        heads = {n: t for n, t in template.items() if factor_kind(n) == "head"}
        expected = dict(heads)
        for name in (n for n in template if factor_kind(n) == factor):
            if f"{name}_ranks" not in tensors and f"{name}_delta" not in tensors:
                continue
            ranks, dim, full = tensors.get(f"{name}_ranks"), rank_dim(name), template[name]
            r = full.shape[dim]
            if not (isinstance(ranks, torch.Tensor) and ranks.dtype == torch.int32 and ranks.dim() == 1
                    and 0 < ranks.numel() <= r):
                got = f"{ranks.dtype} {tuple(ranks.shape)}" if isinstance(ranks, torch.Tensor) else repr(ranks)
                raise RejectedUpdate(f"tensor {name + '_ranks'!r} must be int32 [1..{r}] rank indices, got {got}")
            if int(ranks.min()) < 0 or int(ranks.max()) >= r or len(set(ranks.tolist())) != ranks.numel():
                raise RejectedUpdate(f"tensor {name + '_ranks'!r} must hold distinct ranks in [0, {r}), "
                                     f"got {ranks.tolist()}")
            shape = list(full.shape)
            shape[dim] = ranks.numel()
            expected[f"{name}_ranks"] = ranks
            expected[f"{name}_delta"] = torch.empty(shape, dtype=full.dtype, device="meta")
        check_tensors(tensors, expected)

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        factor = self.factor(round_index)
        p = fedavg_weights(replies)
        updated = {}
        for name, current in state.tensors.items():
            if factor_kind(name) != factor:
                continue
            dim, r = rank_dim(name), current.shape[rank_dim(name)]
            deltas, weights = [], torch.zeros(len(replies), r, device=current.device)
            for k, reply in enumerate(replies):
                dense = torch.zeros_like(current)
                if f"{name}_ranks" in reply.tensors:
                    ranks = reply.tensors[f"{name}_ranks"].long()
                    dense.index_copy_(dim, ranks, reply.tensors[f"{name}_delta"])
                    weights[k, ranks] = p[k]  # w_k on the selected ranks, 0 elsewhere: the mask
                deltas.append(dense)
            updated[name] = current + ops.weighted_sum(deltas, weights, dim, r)
        heads = [n for n in replies[0].tensors if factor_kind(n) == "head"]
        updated.update(average_tensors(replies, heads, p))
        return GlobalState(tensors={**state.tensors, **updated}, base=state.base, info=state.info)
