"""FedSVD (aimed at DP-SGD; reference code sw-programmer/FedSVD, ``reinit_lora``): FFA-LoRA's training of
B with A frozen (arXiv 2403.12313), plus a periodic re-factorisation of the global adapter.

Client: trains B (and the head) with A frozen, uploads B (r m per layer). Server: B = sum_k p_k B_k,
exact since every client holds the same A. After every ``svd_period``-th aggregation the server takes
the SVD of the global product, B A = U S V^T (rank <= r, from the factors: never [m, n]), and restarts
A <- V_r^T (orthonormal rows), B <- U_r S_r: s B A is unchanged (s = alpha / r is the same before and
after), only the basis moves, so the next rounds train B against an orthonormal A. A round skipped for
too few replies leaves the global state as it was and does not count towards the period.

Download: B and the head every round, and A (r n per layer) when it was re-factorised since the client
last trained (its kept copy is then stale); until the first re-factorisation A is the one every client
derives from the run's shared seed, as in FFA-LoRA, and costs no bytes.

DP: B's update is an average of same-shaped uploads, so DP-FedAvg, a robust statistic and a server
optimizer can replace or follow it; the re-factorisation runs in ``end_round``, after whichever of them
produced B, and uses only the aggregate: post-processing of a DP output, no privacy cost. Under DP-SGD
the upload is the noised B. A server optimizer's moments of B are carried into the new basis
(:func:`rotate_moments`), so its next step means what it meant before the re-factorisation.
"""

from __future__ import annotations

import torch

from fedlora_ext.core import adapters
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.strategies.base import Strategy, factor_kind, register
from fedlora_ext.strategies.lowrank import svd_of_product

#: where a server optimizer keeps its moments in ``GlobalState.info`` (``server_optimizer.INFO_KEY``)
SERVER_OPTIMIZER = "server_optimizer"


def rotate_moments(moments: dict, name: str, change: torch.Tensor) -> None:
    """Carries a server optimizer's moments of B into the new basis B' = B M (``change`` = M [r, r]), in
    place. A pseudo-gradient d of B moves W by d A = (d M) A' whenever A's rows lie in the span of
    A' = V_r^T (B A of rank r), so the first moment (FedAvgM's buffer, Adam's m), linear in d, becomes
    m' = m M and m' A' = m A; the second moment v ~ d^2 per coordinate has no exact image: it takes the
    variance of d M for independent coordinates, v' = v (M * M) (exact when M is a signed permutation)."""
    first, second = moments.get("m", {}), moments.get("v", {})
    if name in first:
        first[name] = (first[name].double() @ change).to(first[name].dtype)
    if name in second:
        second[name] = (second[name].double() @ (change * change)).to(second[name].dtype)


@register
class FedSVD(Strategy):
    name = "fedsvd"
    averages_updates = True
    heterogeneous_ranks = False

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        # the A every client derives from the run's shared seed (kept once here, never sent)
        self._initial_a = {n: t.clone() for n, t in state.tensors.items() if factor_kind(n) == "lora_A"}
        state.info["aggregations"] = 0  # aggregations so far: the period counts these
        state.info["refactored_after"] = None  # see end_round
        return state

    def trainable(self, round_index: int) -> dict[str, bool]:
        return {"A": False, "B": True, "head": True}

    def needs_a(self, state: GlobalState, client: ClientState) -> bool:
        """Whether A was re-factorised since the client last trained (so its copy is stale)."""
        refactored, last = state.info.get("refactored_after"), client.info.get("last_round")
        return refactored is not None and (last is None or refactored >= last)

    def download(self, state: GlobalState, client: ClientState, round_index: int):
        send_a = self.needs_a(state, client)
        return {n: t.clone() for n, t in state.tensors.items() if factor_kind(n) != "lora_A" or send_a}

    def prepare(self, model, client, payload, round_index) -> None:
        # the shared initial A, then the A the client kept, then what it downloaded (a newer A)
        super().prepare(model, client, {**self._initial_a, **client.tensors, **payload}, round_index)

    def keep(self, model, client, round_index):
        return {n: p.detach().clone() for n, p in adapters.adapter_parameters(model).items()
                if factor_kind(n) == "lora_A"}

    def end_round(self, state: GlobalState, clients: list[ClientState]) -> None:
        """Every ``svd_period``-th aggregation: A <- V_r^T, B <- U_r S_r from the SVD of B A, in place."""
        state.info["aggregations"] = state.info.get("aggregations", 0) + 1
        if state.info["aggregations"] % self.config.svd_period:
            return
        for name in [n for n in state.tensors if factor_kind(n) == "lora_A"]:
            b = f"{name.rsplit('.', 1)[0]}.lora_B"
            A, B = state.tensors[name], state.tensors[b]
            r = A.shape[0]
            U, S, Vh = svd_of_product(B, A)
            k = min(r, S.shape[0])  # below r only when r > min(m, n): the extra rows stay zero
            new_A, new_B = A.new_zeros(A.shape), B.new_zeros(B.shape)
            new_A[:k] = Vh[:k].to(A.dtype)
            new_B[:, :k] = (U[:, :k] * S[:k]).to(B.dtype)
            state.tensors[name], state.tensors[b] = new_A, new_B
            # B A V_r = U_r S_r: the new B is the old one in the basis M = A V_r [r, r]
            change = A.new_zeros(r, r, dtype=torch.float64)
            change[:, :k] = A.double() @ Vh[:k].T
            rotate_moments(state.info.get(SERVER_OPTIMIZER, {}), b, change)
        # the latest round any client trained in: a client that trained then or earlier holds a stale A
        state.info["refactored_after"] = max((c.info.get("last_round", -1) for c in clients), default=-1)
