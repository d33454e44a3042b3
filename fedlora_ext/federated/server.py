"""The server side of a federated run: the global state, client sampling, and the byte ledger.

It is transport-agnostic: the in-process simulator hands it replies directly, and a Flower ServerApp
can do the same with replies decoded from ArrayRecords. The method's math is the strategy's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from fedlora_ext.federated.client import derive_seed
from fedlora_ext.federated.comm import CommLedger, payload_bytes
from fedlora_ext.federated.validation import RejectedUpdate
from fedlora_ext.strategies.base import ClientState, GlobalState, Reply, Strategy

if TYPE_CHECKING:
    from fedlora_ext.federated.privacy import ServerPrivacy

log = logging.getLogger("fedlora_ext.server")


class Server:
    """Holds the global state between rounds and accounts every byte sent and received."""

    def __init__(self, strategy: Strategy, state: GlobalState, seed: int, privacy: ServerPrivacy | None = None,
                 template: Callable[[int], dict[str, Tensor]] | None = None) -> None:
        self.strategy = strategy
        self.state = state
        self.seed = seed
        self.ledger = CommLedger()
        self.privacy = privacy
        self.template = template  # rank -> the shared tensors of a model at that rank (meta), for checks
        self._trains_at: dict[int, int] = {}  # cid -> the rank it was configured with this round

    def sample(self, round_index: int, clients: list[ClientState]) -> list[ClientState]:
        """The clients of a round: a seeded sample of ``participation * len(clients)`` (at least one);
        under DP-FedAvg a Poisson sample (possibly empty) from the server's secret generator."""
        if self.privacy is not None:
            return self.privacy.sample(round_index, clients)
        k = max(1, int(round(self.strategy.config.participation * len(clients))))
        rng = np.random.default_rng(derive_seed(self.seed, "sample", round_index))
        return [clients[i] for i in np.sort(rng.choice(len(clients), size=k, replace=False))]

    def start_round(self) -> None:
        self.ledger.start_round()

    def configure(self, client: ClientState, round_index: int) -> dict[str, Tensor]:
        """What the client downloads this round (and its bytes, on the ledger)."""
        payload = self.strategy.download(self.state, client, round_index)
        self._trains_at[client.cid] = client.rank  # HetLoRA may lower client.rank once it has trained
        self.ledger.record("down", client.cid, payload_bytes(payload))
        return payload

    def receive(self, reply: Reply, client: ClientState, round_index: int) -> str | None:
        """Accounts a client's upload and checks it against what the method sends at the client's rank;
        returns the reason it is rejected (logged, and it must not be aggregated) or None."""
        self.ledger.record("up", reply.cid, payload_bytes(reply.tensors))
        if self.template is None:
            return None
        try:
            rank = self._trains_at.get(client.cid, client.rank)
            self.strategy.check_upload(reply.tensors, self.template(rank), client, round_index)
        except RejectedUpdate as error:
            reason = f"client {reply.cid}, round {round_index + 1}: update rejected: {error}"
            log.warning(reason)
            return reason
        return None

    def aggregate(self, replies: list[Reply], round_index: int, clients: list[ClientState]) -> GlobalState:
        """Merges the round's replies into the next global state (DP-FedAvg's noisy mean when private)."""
        if self.privacy is not None:
            self.state = self.privacy.aggregate(self.state, replies, round_index)
        else:
            self.state = self.strategy.aggregate(self.state, replies, round_index)
        self.strategy.end_round(self.state, clients)
        return self.state
