"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR'21, arXiv 2003.00295): the
server treats the round's aggregate as a step proposal and takes its own optimizer step.

With x the global tensor before the round and ``aggregate`` what the round produced from the uploads
(the method's average, DP-FedAvg's noised average, or a robust median / trimmed mean), the
pseudo-gradient is d = aggregate - x, per coordinate, over the tensors the method's upload updated
this round (``Strategy.upload_names``: FedIT A, B and head; FFA-LoRA B and head; FedSA-LoRA A only):

* ``fedavgm`` (server momentum, Hsu et al., arXiv 1909.06335): v = beta v + d;  x += lr v
* ``fedadagrad``: m = b1 m + (1 - b1) d;  v = v + d^2
* ``fedadam``:    m as above;             v = b2 v + (1 - b2) d^2
* ``fedyogi``:    m as above;             v = v - (1 - b2) d^2 sign(v - d^2)
* then, for the three adaptive ones, x += lr m / (sqrt(v) + tau).

As Algorithm 2 of the paper prints them: m starts at 0 and v at tau^2 (v_{-1} >= tau^2: the least
value it allows), and there is no bias correction. (The authors' experiment code used Keras's
optimizers instead: Adam with bias correction, Adagrad and Yogi from an accumulator of 0. We follow the
algorithm as published.) ``none`` keeps the aggregate as the new global tensor.

The moments live in ``GlobalState.info["server_optimizer"]`` (tensors there are checkpointed, so a
resumed run continues bit for bit). It is post-processing of what the round released, so under
DP-FedAvg it costs no privacy. Only methods whose server update is an average of same-shaped uploads at
one rank (``Strategy.averages_updates``) may use it; ``Strategy.validate`` refuses the others.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import GlobalState

#: where the moments live in ``GlobalState.info``: {"m": {name: [..]}, "v": {name: [..]}}
INFO_KEY = "server_optimizer"


class ServerOptimizer:
    """The configured server optimizer; stateless itself (its moments are in the global state)."""

    def __init__(self, config: FedConfig) -> None:
        if config.server_optimizer == "none":
            raise ValueError("ServerOptimizer: server_optimizer is 'none'; there is no step to take")
        self.config = config

    def step(self, start: GlobalState, aggregate: GlobalState, names: Iterable[str]) -> GlobalState:
        """The next global state: ``aggregate`` with each named tensor replaced by ``x + step(d)``
        (x from ``start``, d = aggregate - x); the moments are updated in ``aggregate.info``."""
        moments = aggregate.info.setdefault(INFO_KEY, {})
        stepped = {}
        for name in names:
            x = start.tensors[name]
            d = aggregate.tensors[name].to(x.dtype) - x
            stepped[name] = x + self._update(name, d, moments)
        return GlobalState(tensors={**aggregate.tensors, **stepped}, base=aggregate.base, info=aggregate.info)

    def _update(self, name: str, d: Tensor, moments: dict) -> Tensor:
        """The increment of x for pseudo-gradient ``d``; updates ``moments[...][name]`` in place of the dict."""
        c = self.config
        m_all, v_all = moments.setdefault("m", {}), moments.setdefault("v", {})
        if c.server_optimizer == "fedavgm":  # the momentum buffer is the "m" slot
            v = c.server_momentum * m_all[name] + d if name in m_all else d.clone()
            m_all[name] = v
            return c.server_lr * v
        m = m_all.get(name, torch.zeros_like(d))
        v = v_all.get(name, torch.full_like(d, c.server_tau ** 2))
        m = c.server_beta1 * m + (1 - c.server_beta1) * d
        square = d * d
        if c.server_optimizer == "fedadagrad":
            v = v + square
        elif c.server_optimizer == "fedadam":
            v = c.server_beta2 * v + (1 - c.server_beta2) * square
        else:  # fedyogi
            v = v - (1 - c.server_beta2) * square * torch.sign(v - square)
        m_all[name], v_all[name] = m, v
        return c.server_lr * m / (torch.sqrt(v) + c.server_tau)
