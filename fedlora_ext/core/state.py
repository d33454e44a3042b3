"""The state types strategies and the runtime exchange: the server's global state, a client's own state,
a client's reply, and the local trainer a strategy drives (as a protocol, so strategies need no runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn


@dataclass
class GlobalState:
    """What the server holds between rounds.

    Attributes:
        tensors: global shared tensors by name (factors at the global rank, head).
        base: merged base weights of adapted modules (FLoRA, FedEx-LoRA), float32, by module path;
            empty while nothing was merged.
        info: strategy bookkeeping (JSON-friendly scalars and lists).
    """

    tensors: dict[str, Tensor]
    base: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientState:
    """What one client keeps between rounds, in its own storage (never a shared model object).

    Attributes:
        cid: client id.
        rank: its current adapter rank.
        num_examples: local training examples (FedAvg weight n_k).
        tensors: persistent local tensors (FedSA's B, a personalised head, standalone models).
        info: scalars such as HetLoRA's last tail norm or the last round it took part in.
        privacy: its DP-SGD state (``fedlora_ext.dp.ClientPrivacy``: account, secret noise stream) when
            the run is private; it never leaves the client.
    """

    cid: int
    rank: int
    num_examples: int
    tensors: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    privacy: Any = field(default=None, repr=False)


@dataclass
class Reply:
    """A client's answer to the server: only what the method uploads, and ``metrics`` it may release.

    Under DP-SGD every field is covered by the client's guarantee (docs/PRIVACY.md lists each with its
    verdict): ``tensors`` are the noised update, ``num_examples`` and ``metrics`` (``epsilon``) are
    public under the stated adjacency. ``local`` holds the client's own notes of the round (training
    loss, seconds in the DP step): they are never sent, because the loss is an exact function of the
    records; the client logs them (:func:`fedlora_ext.federated.client.log_local`).
    """

    cid: int
    num_examples: int
    tensors: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    local: dict[str, float] = field(default_factory=dict, repr=False)


class Trainer(Protocol):
    """What a strategy's ``local_update`` may call: local steps on the client's data
    (``fedlora_ext.federated.client.LocalTrainer``)."""

    #: optimizer steps taken so far, and this round's learning rate (SCAFFOLD's K and lr)
    steps: int
    lr: float

    def train(self, model: nn.Module, *, steps: int | None = None, penalty: Callable[[], Tensor] | None = None,
              masks: Mapping[str, Tensor] | None = None, correction: Mapping[str, Tensor] | None = None) -> float: ...
