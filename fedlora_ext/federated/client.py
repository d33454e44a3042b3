"""The client side: a model bench reused across clients, the local trainer, and one client round.

Clients hold no model object between rounds: their persistent state is a ``ClientState`` of tensors.
For each round the bench hands out a model of the client's rank whose every shared tensor and base
weight is overwritten before training, so nothing of an earlier client can leak into a later one
(the FedSA-LoRA reference shares one model object among clients; METHODS.md).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_ext.federated import adapters
from fedlora_ext.federated.config import FedConfig
from fedlora_ext.strategies.base import ClientState, GlobalState, Reply, Strategy


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a run seed and labels (round, client, purpose)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


class ModelBench:
    """One peft model per rank, built lazily from one base model and reused by every client of that
    rank. ``checkout`` resets it completely: base weights from the global state (or the pristine base),
    adapters re-initialised from a seed; the strategy then loads its tensors."""

    def __init__(self, config: FedConfig, base_model: nn.Module) -> None:
        self.config = config
        self._base = base_model
        self._models: dict[int, nn.Module] = {}
        self._pristine: dict[str, Tensor] = {}  # base weights of adapted modules, before any merge
        self._heads: dict[str, Tensor] = {}  # initial head, identical for every rank's model
        self.spec = adapters.AdapterSpec(kind=config.adapter, rank=config.rank, alpha=config.alpha,
                                         target_modules=tuple(config.target_modules), rslora=config.rslora)

    @property
    def task_type(self) -> str:
        return "SEQ_CLS" if self.config.task == "classification" else "CAUSAL_LM"

    def model(self, rank: int) -> nn.Module:
        if rank not in self._models:
            model = adapters.attach_adapter(copy.deepcopy(self._base), self.spec, self.task_type, rank=rank)
            if not self._models:
                self._pristine = {n: w.detach().clone() for n, w in adapters.base_weights(model).items()}
                self._heads = {n: p.detach().clone() for n, p in adapters.head_parameters(model).items()}
            self._models[rank] = model
        return self._models[rank]

    def pristine_base(self) -> dict[str, Tensor]:
        """Base weights of the adapted modules as loaded, before any merge."""
        return self._pristine

    def checkout(self, rank: int, state: GlobalState, seed: int) -> nn.Module:
        """The rank's model with the global base weights and freshly initialised adapters."""
        model = self.model(rank)
        with torch.no_grad():
            for name, weight in adapters.base_weights(model).items():
                weight.copy_(state.base.get(name, self._pristine[name]))
        adapters.reset_adapters(model, seed)
        adapters.write_tensors(model, self._heads)
        model.train()
        return model


class LocalTrainer:
    """Local steps on one client's data: seeded mini-batches, AdamW or SGD, optional FedProx term."""

    def __init__(self, config: FedConfig, data, seed: int) -> None:
        self.config = config
        self.data = data
        self.seed = seed

    def batches(self, steps: int):
        """``steps`` mini-batches sampled without replacement within each pass, seeded."""
        rng = np.random.default_rng(self.seed)
        n, size = len(self.data), min(self.config.batch_size, len(self.data))
        order: list[int] = []
        for _ in range(steps):
            if len(order) < size:
                order.extend(rng.permutation(n).tolist())
            chosen, order = order[:size], order[size:]
            yield self.data[chosen]

    def train(self, model: nn.Module, *, steps: int | None = None, penalty: Callable[[], Tensor] | None = None) -> float:
        """Runs the local steps (default ``local_steps``); returns the mean loss. The FedProx term pulls
        towards the values the trainable parameters had when this call started (the global model)."""
        params = adapters.trainable_parameters(model)
        if not params:
            raise ValueError("LocalTrainer: the model has no trainable adapter parameters")
        if self.config.optimizer == "sgd":
            optimizer = torch.optim.SGD(params.values(), lr=self.config.lr)
        else:
            optimizer = torch.optim.AdamW(params.values(), lr=self.config.lr, weight_decay=0.0)
        mu = self.config.fedprox_mu
        reference = {n: p.detach().clone() for n, p in params.items()}
        losses = []
        for batch in self.batches(steps or self.config.local_steps):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            if penalty is not None:
                loss = loss + penalty()
            if mu > 0:  # FedProx (arXiv 1812.06127): (mu / 2) ||w - w_global||^2
                loss = loss + 0.5 * mu * sum(((p - reference[n]) ** 2).sum() for n, p in params.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))


def run_client_round(strategy: Strategy, bench: ModelBench, state: GlobalState, client: ClientState,
                     payload: Mapping[str, Tensor], data, round_index: int) -> Reply:
    """One client's round: prepare, train, upload; updates ``client.tensors`` with what it keeps."""
    seed = derive_seed(strategy.config.seed, "client", client.cid, round_index)
    model = bench.checkout(client.rank, state, seed)
    strategy.prepare(model, client, payload, round_index)
    start = adapters.read_tensors(model)
    trainer = LocalTrainer(strategy.config, data, seed)
    loss = strategy.local_update(trainer, model, client, round_index)
    upload = strategy.upload(model, client, start, round_index)
    client.tensors = {n: t.detach().clone() for n, t in strategy.keep(model, client, round_index).items()}
    client.info["last_round"] = round_index
    return Reply(cid=client.cid, num_examples=client.num_examples, tensors=upload, metrics={"loss": loss})
