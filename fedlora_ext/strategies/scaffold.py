"""SCAFFOLD (Karimireddy et al., ICML'20, arXiv 1910.06378, Algorithm 1 with option II) over the LoRA
parameters: as FedIT, A, B and the head train and are averaged, and control variates correct each
client's drift towards its own optimum.

Every trained tensor (A, B, head) has a server variate c and, on each client k, a variate c_k (both
start at 0). Client k downloads x and c and takes its K local SGD steps with the corrected gradient

    y <- y - lr (g(y) - c_k + c),

then sets c_k+ = c_k - c + (x - y) / (K lr) (option II; K the steps it took, lr this round's learning
rate, so a cosine schedule's round uses its own), keeps c_k+ and uploads y (the same bytes as
dy = y - x, which the server forms, since it knows x) and dc_k = c_k+ - c_k. The server, over the
replies S of the round and N clients in all:

    x <- x + lr_g (1/|S|) sum_k dy_k   (lr_g = ``server_lr``; a uniform mean, as Algorithm 1)
    c <- c + (|S| / N) (1/|S|) sum_k dc_k.

c lives in ``GlobalState.info["scaffold_c"]`` and c_k in the client's own ``ClientState.tensors``, so
both are checkpointed; c travels with x (the download doubles) and dc_k with y (the upload doubles).

Under DP-SGD the correction is added to the noised gradient (post-processing) and dc_k = -c + (x - y) /
(K lr) is a function of the noised update and public values, so nothing a client sends is outside its
guarantee. Refused: ``optimizer = "adamw"`` (the rule is SGD's; a correction inside Adam's
preconditioned step has no principled form in the paper), DP-FedAvg (the variate update needs every
participant's exact dc_k and the exact |S|, which client-level DP hides), ``server_optimizer`` (the
global step is ``server_lr``) and robust aggregation. A client whose reply is lost after it trained
keeps its c_k+ while c misses its dc_k, as in any deployment of the algorithm. ``max_update_norm``
bounds the norm of the whole upload against the download: y - x and dc_k together.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedlora_ext import ops
from fedlora_ext.core import adapters
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.core.validation import check_tensors
from fedlora_ext.strategies.base import Strategy, average_tensors, factor_kind, register

#: name prefixes of the variates on the wire and in the client's storage
SERVER_C = "scaffold.c."  # download: the server variate c of a tensor
CLIENT_C = "scaffold.c_k."  # ClientState.tensors: the client's own c_k
DELTA_C = "scaffold.dc."  # upload: dc_k = c_k+ - c_k
INFO_KEY = "scaffold_c"


def _strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}


@register
class Scaffold(Strategy):
    name = "scaffold"
    heterogeneous_ranks = False
    averages_updates = False  # x moves by lr_g times the mean update and c moves too: not a plain average

    def __init__(self, config) -> None:
        super().__init__(config)
        self._server_c: dict[int, dict[str, Tensor]] = {}  # cid -> c as downloaded this round (prepare)
        self._variates: dict[int, tuple[dict, dict]] = {}  # cid -> (c_k+, dc_k) from local_update, for upload/keep

    def validate(self, config) -> None:
        method = "method 'scaffold'"
        if config.optimizer != "sgd":
            raise ValueError(f"{method} takes SGD local steps, y <- y - lr (g(y) - c_k + c) (Karimireddy et al.); "
                             f"set optimizer = \"sgd\", got optimizer = {config.optimizer!r}")
        if config.server_dp:
            raise ValueError(f"{method} cannot run under server DP (DP-FedAvg): its variate update "
                             "c += (|S|/N) mean(dc_k) needs every exact dc_k and |S|; unset server_dp_epsilon / "
                             "server_dp_noise_multiplier (sample-level DP-SGD works)")
        if config.server_optimizer != "none":
            raise ValueError(f"{method} takes its own global step (server_lr); set server_optimizer = \"none\", "
                             f"got {config.server_optimizer!r}")
        if config.aggregation != "mean":
            raise ValueError(f"{method} averages its updates and variates; set aggregation = \"mean\", got "
                             f"{config.aggregation!r}")
        super().validate(config)

    # ---- server ----------------------------------------------------------------------------------
    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        kinds = self.upload_kinds(0)
        state.info[INFO_KEY] = {n: torch.zeros_like(t) for n, t in state.tensors.items() if factor_kind(n) in kinds}
        return state

    def download(self, state: GlobalState, client: ClientState, round_index: int) -> dict[str, Tensor]:
        """x and the server variate c of every trained tensor."""
        return {**{n: t.clone() for n, t in state.tensors.items()},
                **{SERVER_C + n: c.clone() for n, c in state.info[INFO_KEY].items()}}

    def check_upload(self, tensors, template, client, round_index) -> None:
        kinds = self.upload_kinds(round_index)
        trained = {n: t for n, t in template.items() if factor_kind(n) in kinds}
        check_tensors(tensors, {**trained, **{DELTA_C + n: t for n, t in trained.items()}})

    def aggregate(self, state: GlobalState, replies, round_index: int) -> GlobalState:
        names = self.upload_names(state, round_index)
        count = len(replies)
        means = average_tensors(replies, names, torch.full((count,), 1.0 / count))  # (1/|S|) sum_k y_k
        lr_g = self.config.server_lr
        x = {n: state.tensors[n] + lr_g * (means[n] - state.tensors[n]) for n in names}
        # c + (1/N) sum_k dc_k, the same as c + (|S| / N) mean_k dc_k
        deltas = [_strip(r.tensors, DELTA_C) for r in replies]
        weights = torch.full((count,), 1.0 / self.config.num_clients)
        c = dict(state.info[INFO_KEY])
        for n in names:
            flat = ops.weighted_sum([d[n].reshape(1, -1) for d in deltas], weights.to(c[n].device), 0, 1)
            c[n] = c[n] + flat.reshape(c[n].shape)
        return GlobalState(tensors={**state.tensors, **x}, base=state.base, info={**state.info, INFO_KEY: c})

    # ---- client ----------------------------------------------------------------------------------
    def prepare(self, model, client: ClientState, payload, round_index: int) -> None:
        """Loads x (the client's own tensors are variates, not model weights) and notes c for the steps."""
        adapters.write_tensors(model, {n: t for n, t in payload.items() if not n.startswith(SERVER_C)})
        adapters.set_trainable(model, **self.trainable(round_index))
        self._server_c[client.cid] = _strip(payload, SERVER_C)

    def local_update(self, trainer, model, client: ClientState, round_index: int) -> float:
        params = adapters.trainable_parameters(model)
        x = {n: p.detach().clone() for n, p in params.items()}
        c = self._server_c.pop(client.cid)
        own = _strip(client.tensors, CLIENT_C)
        c_k = {n: own[n] if n in own else torch.zeros_like(x[n]) for n in params}
        before = trainer.steps
        loss = trainer.train(model, penalty=self.penalty(model, client),
                             correction={n: c[n] - c_k[n] for n in params})
        scale = 1.0 / ((trainer.steps - before) * trainer.lr)  # 1 / (K lr)
        new = {n: c_k[n] - c[n] + (x[n] - p.detach()) * scale for n, p in params.items()}  # option II
        self._variates[client.cid] = (new, {n: new[n] - c_k[n] for n in params})
        return loss

    def upload(self, model, client, start, round_index) -> dict[str, Tensor]:
        """y (every trained tensor) and dc_k."""
        _, delta = self._variates[client.cid]
        trained = super().upload(model, client, start, round_index)
        return {**trained, **{DELTA_C + n: t.clone() for n, t in delta.items()}}

    def keep(self, model, client, round_index) -> dict[str, Tensor]:
        """c_k+ (the client's own variate until its next round)."""
        new, _ = self._variates.pop(client.cid)
        return {CLIENT_C + n: t for n, t in new.items()}
