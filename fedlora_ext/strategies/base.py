"""The Strategy base: small hooks that a method overrides, and the registry of methods by name.

A round (DESIGN.md, "Data flow of one round"):
  server ``download(state, client)`` -> client ``prepare(model, client, payload, round)`` ->
  ``local_update(...)`` (the local steps) -> ``upload(model, client, start, round)`` and
  ``keep(model, client, round)`` (what stays on the client) -> server ``aggregate(state, replies, round)``.
The defaults are FedIT's (arXiv 2305.05644): train A and B, upload both, average them (zero-padded to
the largest rank when ranks differ). All server math goes through :mod:`fedlora_ext.ops`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedlora_ext import ops
from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import ClientState, GlobalState, Reply, Trainer
from fedlora_ext.core.validation import check_tensors


def fedavg_weights(replies: list[Reply]) -> Tensor:
    """p_k = n_k / sum_j n_j over the replies, float32 [K]."""
    counts = torch.tensor([float(r.num_examples) for r in replies], dtype=torch.float64)
    return (counts / counts.sum()).to(torch.float32)


def factor_kind(name: str) -> str:
    """``"lora_A"``, ``"lora_B"``, ``"vera_d"``, ``"vera_b"`` or ``"head"`` for a shared tensor name."""
    return "head" if name.startswith("head.") else name.rsplit(".", 1)[1]


def rank_dim(name: str) -> int | None:
    """The rank dimension of a factor (A [r, in]: 0, B [out, r]: 1, VeRA d [r]: 0), None if it has none."""
    return {"lora_A": 0, "lora_B": 1, "vera_d": 0}.get(factor_kind(name))


def truncate_to_rank(name: str, tensor: Tensor, rank: int) -> Tensor:
    """The first ``rank`` components of a factor along its rank dimension (others pass through)."""
    dim = rank_dim(name)
    return tensor if dim is None else tensor.narrow(dim, 0, min(rank, tensor.shape[dim]))


def adapted_modules(reply: Reply) -> list[str]:
    """The adapted modules of an upload (those with a ``lora_A``), sorted."""
    return sorted({n.rsplit(".", 1)[0] for n in reply.tensors if factor_kind(n) == "lora_A"})


def upload_rank(reply: Reply) -> int:
    """The rank of the factors an upload carries (its first ``lora_A``'s rows)."""
    return next(t.shape[0] for n, t in reply.tensors.items() if factor_kind(n) == "lora_A")


def average_tensors(replies: list[Reply], names: list[str], weights: Tensor,
                    out_ranks: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """``sum_k w_k zero_pad(x_k)`` for every name, through ``ops.weighted_sum`` (one call per tensor)."""
    averaged = {}
    for name in names:
        xs = [r.tensors[name] for r in replies]
        weights = weights.to(xs[0].device)  # the weights are built on the CPU; the tensors may be on a GPU
        dim = rank_dim(name)
        if dim is None:  # no rank dimension: a plain weighted mean over a flat view
            flat = ops.weighted_sum([x.reshape(1, -1) for x in xs], weights, 0, 1)
            averaged[name] = flat.reshape(xs[0].shape)
            continue
        out_rank = (out_ranks or {}).get(name, max(x.shape[dim] for x in xs))
        averaged[name] = ops.weighted_sum(xs, weights, dim, out_rank)
    return averaged


class Strategy:
    """A federated LoRA method. Subclasses set ``name`` and override the hooks they change."""

    name: ClassVar[str] = ""
    #: whether clients may train different ranks (FLoRA, HetLoRA, zero-padding FedIT, LoRA-A2 budgets)
    heterogeneous_ranks: ClassVar[bool] = True
    #: whether each client's own model is evaluated on its own test split
    personalised: ClassVar[bool] = False
    #: whether the server's global model is meaningful to evaluate
    global_model: ClassVar[bool] = True
    #: whether the server update is an average of uploaded tensors (a weighted sum), so DP-FedAvg can
    #: replace it and secure aggregation (which reveals only the sum) can feed it
    averages_updates: ClassVar[bool] = False
    #: whether the method merges adapters into the base weights (its models need the pristine base)
    merges_base: ClassVar[bool] = False
    #: adapter kinds the method supports
    adapter_kinds: ClassVar[tuple[str, ...]] = ("lora",)
    #: whether the adapter carries LoRA-SB's r x r matrix R between A and B (update s B R A; Fed-SB)
    latent_factor: ClassVar[bool] = False

    def __init__(self, config: FedConfig) -> None:
        self.config = config
        self.validate(config)

    # ---- configuration ---------------------------------------------------------------------------
    def validate(self, config: FedConfig) -> None:
        """Rejects configurations the method cannot run, before any training."""
        if config.heterogeneous and not self.heterogeneous_ranks:
            raise ValueError(
                f"method {self.name!r} cannot take heterogeneous client ranks {list(config.ranks())}; "
                "use one rank (or flora, hetlora, fedit with zero-padding, lora_a2)"
            )
        if config.adapter not in self.adapter_kinds:
            raise ValueError(f"method {self.name!r} supports adapters {self.adapter_kinds}, got {config.adapter!r}")
        if config.aggregation != "mean" and not (self.averages_updates and not config.heterogeneous
                                                 and not config.server_dp):
            raise ValueError(
                f"aggregation {config.aggregation!r} replaces an average of same-shaped uploads (fedit, fedprox, "
                f"ffa_lora, fedsa_lora and variants, one rank, no server DP); got method {self.name!r}"
                + (f" with ranks {list(config.ranks())}" if config.heterogeneous else "")
                + (" with server DP" if config.server_dp else ""))
        if config.server_dp and not (self.averages_updates and not config.heterogeneous):
            raise ValueError(
                f"server DP (DP-FedAvg) needs a method that averages one set of same-shaped uploads (fedit, fedprox, "
                f"ffa_lora, fedsa_lora and variants) at one rank; got method {self.name!r}"
                + (f" with ranks {list(config.ranks())}" if config.heterogeneous else "")
            )
        if config.server_optimizer != "none" and not (self.averages_updates and not config.heterogeneous):
            raise ValueError(
                f"server_optimizer {config.server_optimizer!r} steps from an average of same-shaped uploads at one "
                f"rank ({', '.join(averaging_methods())}), got method {self.name!r}"
                + (f" with ranks {list(config.ranks())}" if config.heterogeneous else "")
                + "; set server_optimizer = \"none\"")
        if config.secure_aggregation and not (self.averages_updates and not config.heterogeneous):
            raise ValueError(
                f"secure_aggregation reveals only the weighted mean of same-shaped uploads at one rank; method "
                f"{self.name!r}" + (f" with ranks {list(config.ranks())}" if config.heterogeneous else "")
                + f" needs each client's own upload to aggregate; use one of {', '.join(averaging_methods())}")

    def scaling(self, rank: int | None = None) -> float:
        """The LoRA scale s = alpha / r (rsLoRA alpha / sqrt(r)) at ``rank`` (default: the config's)."""
        spec = adapters.AdapterSpec(rank=rank or self.config.rank, alpha=self.config.alpha, rslora=self.config.rslora)
        return spec.scaling()

    def product_weights(self, replies: list[Reply], dtype: torch.dtype = torch.float32) -> Tensor:
        """p_k s_k for every reply (s_k at the rank it uploaded): the weights of sum_k p_k s_k B_k A_k."""
        p = fedavg_weights(replies).to(dtype)
        return p * p.new_tensor([self.scaling(upload_rank(r)) for r in replies])

    def client_rank(self, assigned: int) -> int:
        """The adapter rank of a client whose configured rank is ``assigned``."""
        return assigned

    def global_rank(self) -> int:
        """Rank of the server's global adapter: the largest client rank."""
        return max(self.config.ranks())

    # ---- server ----------------------------------------------------------------------------------
    def global_tensors(self, state: GlobalState) -> dict[str, Tensor]:
        """The tensors of the server's model (evaluated and saved as the final adapter)."""
        return dict(state.tensors)

    def init_state(self, model: nn.Module) -> GlobalState:
        """The initial global state from a freshly initialised model at the global rank."""
        return GlobalState(tensors=adapters.read_tensors(model))

    def download(self, state: GlobalState, client: ClientState, round_index: int) -> dict[str, Tensor]:
        """What the server sends a client: the global tensors, truncated to the client's rank."""
        return {n: truncate_to_rank(n, t, client.rank).clone() for n, t in state.tensors.items()}

    def aggregate(self, state: GlobalState, replies: list[Reply], round_index: int) -> GlobalState:
        """FedAvg of every uploaded tensor with p_k = n_k / n, zero-padded to the global rank.

        Returns the next state. Methods that merge into the base (FLoRA, FedEx-LoRA) update ``state``
        in place and return it, so a [m, n] base weight is never copied per round.
        """
        names = list(replies[0].tensors)
        out_ranks = {n: self.global_rank() for n in names if rank_dim(n) is not None}
        averaged = average_tensors(replies, names, fedavg_weights(replies), out_ranks)
        return GlobalState(tensors={**state.tensors, **averaged}, base=state.base, info=state.info)

    def end_round(self, state: GlobalState, clients: list[ClientState]) -> None:
        """Bookkeeping after a round, seeing every client's state (nothing by default)."""

    def upload_kinds(self, round_index: int) -> set[str]:
        """The factor kinds (``lora_A``, ``lora_B``, ``vera_d``, ``vera_b``, ``head``) a client uploads."""
        parts = self.trainable(round_index)
        kinds = {"lora_A": parts["A"], "vera_d": parts["A"], "lora_B": parts["B"], "vera_b": parts["B"],
                 "head": parts["head"]}
        return {kind for kind, on in kinds.items() if on}

    def upload_names(self, state: GlobalState, round_index: int) -> list[str]:
        """The global tensors a client's upload updates this round (what it trains)."""
        kinds = self.upload_kinds(round_index)
        return sorted(n for n in state.tensors if factor_kind(n) in kinds)

    def check_upload(self, tensors: Mapping[str, Tensor], template: Mapping[str, Tensor], client: ClientState,
                     round_index: int) -> None:
        """Refuses (:class:`~fedlora_ext.core.validation.RejectedUpdate`) an upload that is not what
        this method sends from a model like ``template`` (the shared tensors at the client's rank, e.g.
        meta tensors): other names, shapes or dtypes, or non-finite values."""
        kinds = self.upload_kinds(round_index)
        check_tensors(tensors, {n: t for n, t in template.items() if factor_kind(n) in kinds})

    # ---- client ----------------------------------------------------------------------------------
    def trainable(self, round_index: int) -> dict[str, bool]:
        """Which parts train this round: A, B (VeRA: d, b) and the head."""
        return {"A": True, "B": True, "head": True}

    def prepare(self, model: nn.Module, client: ClientState, payload: Mapping[str, Tensor], round_index: int) -> None:
        """Loads the client's kept tensors, then the download, into a freshly reset model."""
        adapters.write_tensors(model, client.tensors)
        adapters.write_tensors(model, payload)
        adapters.set_trainable(model, **self.trainable(round_index))

    def penalty(self, model: nn.Module, client: ClientState) -> Callable[[], Tensor] | None:
        """An extra term of the local loss (HetLoRA's rank self-pruning), or None.

        The method's own term only: FedProx's (mu / 2) ||w - w_global||^2 (``fedprox_mu > 0``) is added by
        the local trainer over exactly the trainable tensors the client downloaded this round (w_global =
        their downloaded values); tensors it keeps locally (FedSA's B, a personal head) are not pulled."""
        return None

    def local_steps_per_round(self, num_examples: int) -> int:
        """The most optimizer steps a client with ``num_examples`` takes in one round (privacy budget)."""
        return self.config.local_steps

    def local_update(self, trainer: Trainer, model: nn.Module, client: ClientState, round_index: int) -> float:
        """The local steps; returns the mean training loss."""
        return trainer.train(model, penalty=self.penalty(model, client))

    def upload(self, model: nn.Module, client: ClientState, start: Mapping[str, Tensor],
               round_index: int) -> dict[str, Tensor]:
        """What the client sends: every tensor it trained (values, not deltas)."""
        return {n: p.detach().clone() for n, p in adapters.trainable_parameters(model).items()}

    def keep(self, model: nn.Module, client: ClientState, round_index: int) -> dict[str, Tensor]:
        """What stays on the client until its next round (nothing for FedIT)."""
        return {}


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: makes a strategy available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"strategy name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def averaging_methods() -> list[str]:
    """The registered methods whose server update is an average of uploads (``averages_updates``)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.averages_updates)


def make_strategy(config: FedConfig) -> Strategy:
    """The strategy named by ``config.method``, validated against the configuration."""
    if config.method not in _REGISTRY:
        raise ValueError(f"unknown method {config.method!r}; known methods: {strategy_names()}")
    cls = _REGISTRY[config.method]
    if cls.merges_base and config.quantization != "none":
        raise ValueError(f"method {config.method!r} merges each round's update into the base weights, which a "
                         f"{config.quantization} base cannot hold exactly (re-quantising would round the merges "
                         "away); use --quantize none or a method that keeps the base fixed")
    return cls(config)
