"""Baselines: centralized (one client holding all the data) and standalone (every client alone)."""

from __future__ import annotations

from fedlora_ext.core import adapters
from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies.base import Strategy, register


@register
class Centralized(Strategy):
    """All data pooled into one client; its FedAvg is the identity."""

    name = "centralized"
    heterogeneous_ranks = False
    adapter_kinds = ("lora", "vera")
    pool_clients = True


@register
class Standalone(Strategy):
    """Every client trains alone from the same start: nothing is sent, nothing aggregated."""

    name = "standalone"
    heterogeneous_ranks = True
    adapter_kinds = ("lora", "vera")
    personalised = True
    global_model = False

    def download(self, state, client, round_index):
        return {}

    def upload(self, model, client, start, round_index):
        return {}

    def upload_kinds(self, round_index):
        return set()

    def keep(self, model, client, round_index):
        return {n: p.detach().clone() for n, p in adapters.shared_parameters(model).items()}

    def prepare(self, model, client, payload, round_index) -> None:
        if not client.tensors:  # first round: the common initial adapter, truncated to the client's rank
            payload = self._initial(client)
        super().prepare(model, client, payload, round_index)

    def init_state(self, model) -> GlobalState:
        state = super().init_state(model)
        self._start = state
        return state

    def _initial(self, client):
        return Strategy.download(self, self._start, client, 0)

    def aggregate(self, state, replies, round_index):
        return state
