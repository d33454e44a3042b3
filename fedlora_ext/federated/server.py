"""The server side of a federated run: the global state, client sampling, and the byte ledger.

It is transport-agnostic: the in-process simulator hands it replies directly, and a Flower ServerApp
can do the same with replies decoded from ArrayRecords. The method's math is the strategy's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.core.validation import RejectedUpdate
from fedlora_ext.federated.client import derive_seed
from fedlora_ext.federated.comm import CommLedger, payload_bytes
from fedlora_ext.federated.robust import robust_update, update_norm
from fedlora_ext.strategies.base import Strategy
from fedlora_ext.strategies.server_optimizer import ServerOptimizer

if TYPE_CHECKING:
    from fedlora_ext.federated.privacy import PrivacyLedger, ServerPrivacy

log = logging.getLogger("fedlora_ext.server")


class Server:
    """Holds the global state between rounds and accounts every byte sent and received."""

    def __init__(self, strategy: Strategy, state: GlobalState, seed: int, privacy: ServerPrivacy | None = None,
                 template: Callable[[int], dict[str, Tensor]] | None = None, device: torch.device | None = None,
                 privacy_ledger: PrivacyLedger | None = None) -> None:
        self.strategy = strategy
        self.state = state
        self.seed = seed
        self.ledger = CommLedger()
        self.privacy = privacy
        self.template = template  # rank -> the shared tensors of a model at that rank (meta), for checks
        self.device = device  # where the global state lives and uploads are aggregated (None: where they come)
        self._trains_at: dict[int, int] = {}  # cid -> the rank it was configured with this round
        self._sent: dict[int, dict[str, Tensor]] = {}  # cid -> what it downloaded this round
        # the server's own count of every client's DP-SGD steps (sample-level DP runs), which admits clients
        self.privacy_ledger = privacy_ledger
        self.trainings: list[dict] = []  # every training asked this round (retries included), with its steps
        # Reddi et al.'s server step over whatever produced the round's aggregate (None: the aggregate is the model)
        config = strategy.config
        self.optimizer = ServerOptimizer(config) if config.server_optimizer != "none" else None

    def sample(self, round_index: int, clients: list[ClientState], attempt: int = 0) -> list[ClientState]:
        """The clients of a round: a seeded sample of ``participation * len(clients)`` (at least one;
        ``attempt`` > 0 draws a retry's); under DP-FedAvg a Poisson sample (possibly empty) from the
        server's secret generator, once per round: the analysis allows no second draw."""
        if self.privacy is not None:
            return self.privacy.sample(round_index, clients) if attempt == 0 else []
        k = max(1, int(round(self.strategy.config.participation * len(clients))))
        labels = ("sample", round_index) if attempt == 0 else ("sample", round_index, attempt)
        rng = np.random.default_rng(derive_seed(self.seed, *labels))
        return [clients[i] for i in np.sort(rng.choice(len(clients), size=k, replace=False))]

    def admit(self, sampled: list[ClientState], round_index: int) -> tuple[list[ClientState], dict[str, str]]:
        """The sampled clients whose privacy budget allows this round's steps by the server's own ledger,
        and (cid -> reason) the ones left out of the round (logged): no client is asked to train past
        its target, whatever it reports. A client that said it is out of budget is not asked either."""
        admitted, refused = [], {}
        for client in sampled:
            reason = self.privacy_ledger.refusal(client) if self.privacy_ledger is not None else None
            reason = reason or client.info.get("budget_exhausted") or None
            if reason is None:
                admitted.append(client)
            else:
                refused[str(client.cid)] = reason
                log.warning("round %d: %s; the client is left out of the round (privacy budget exhausted)",
                            round_index + 1, reason)
        return admitted, refused

    def start_round(self) -> None:
        self.ledger.start_round()
        self.trainings = []

    def configure(self, client: ClientState, round_index: int, attempt: int = 0) -> dict[str, Tensor]:
        """What the client downloads to train this round (and its bytes, on the ledger); the training
        and its steps are recorded in ``trainings`` and, under DP-SGD, charged to the privacy ledger."""
        if self.privacy_ledger is not None:
            self.trainings.append(self.privacy_ledger.ask(client, attempt))
        else:
            self.trainings.append({"client": client.cid, "attempt": attempt,
                                   "steps": self.strategy.local_steps_per_round(client.num_examples)})
        payload = self.strategy.download(self.state, client, round_index)
        self._trains_at[client.cid] = client.rank  # HetLoRA may lower client.rank once it has trained
        self._sent[client.cid] = payload
        self.ledger.record("down", client.cid, payload_bytes(payload))
        return payload

    def receive(self, reply: Reply, client: ClientState, round_index: int) -> str | None:
        """Accounts a client's upload and checks it against what the method sends at the client's rank;
        returns the reason it is rejected (logged, and it must not be aggregated) or None."""
        self.ledger.record("up", reply.cid, payload_bytes(reply.tensors))
        if self.device is not None:  # uploads that crossed a network arrive as CPU tensors
            reply.tensors = {n: t.to(self.device) for n, t in reply.tensors.items()}
        if self.template is None:
            return None
        try:
            rank = self._trains_at.get(client.cid, client.rank)
            self.strategy.check_upload(reply.tensors, self.template(rank), client, round_index)
            bound = self.strategy.config.max_update_norm
            if bound is not None:
                norm = update_norm(reply.tensors, self._sent.get(client.cid, {}))
                if norm > bound:
                    raise RejectedUpdate(f"update norm {norm:.4g} exceeds max_update_norm = {bound:g}")
        except RejectedUpdate as error:
            reason = f"client {reply.cid}, round {round_index + 1}: update rejected: {error}"
            log.warning(reason)
            return reason
        return None

    def aggregate(self, replies: list[Reply], round_index: int, clients: list[ClientState]) -> GlobalState:
        """Merges the round's replies into the next global state (DP-FedAvg's noisy mean when private),
        then takes the server optimizer's step from it (``server_optimizer``)."""
        how = self.strategy.config.aggregation
        start = self.state
        if self.privacy is not None:
            self.state = self.privacy.aggregate(self.state, replies, round_index)
        elif how != "mean":  # untrusted clients: a coordinate-wise statistic of the deltas
            config = self.strategy.config
            updated = {n: robust_update(self.state.tensors[n], [r.tensors[n] for r in replies], how, config.trim_fraction)
                       for n in self.strategy.upload_names(self.state, round_index)}
            self.state = GlobalState(tensors={**self.state.tensors, **updated}, base=self.state.base, info=self.state.info)
        else:
            self.state = self.strategy.aggregate(self.state, replies, round_index)
        if self.optimizer is not None:  # post-processing of the aggregate: no privacy cost under DP-FedAvg
            self.state = self.optimizer.step(start, self.state, self.strategy.upload_names(start, round_index))
        self.strategy.end_round(self.state, clients)
        return self.state
