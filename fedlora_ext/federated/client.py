"""The client side: a model bench reused across clients, the local trainer, and one client round.

Clients hold no model object between rounds: their persistent state is a ``ClientState`` of tensors.
For each round the bench hands out a model of the client's rank whose every shared tensor and base
weight is overwritten before training, so nothing of an earlier client can leak into a later one
(the FedSA-LoRA reference shares one model object among clients; METHODS.md).
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_ext.core import adapters
from fedlora_ext.core.device import autocast, base_dtype, model_device, resolve_device, resolve_dtype, to_device
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.data.quantized import is_quantized
from fedlora_ext.dp.per_sample import PerSampleGradients
from fedlora_ext.dp.sgd import ClientPrivacy, noisy_gradients_, summed_loss
from fedlora_ext.strategies.base import Strategy, make_strategy


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a run seed and labels (round, client, purpose)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


class ModelBench:
    """One peft model per rank over ONE set of base weights, reused by every client of that rank.

    Each rank's model is a shallow shell of the base model (its own module objects, the base's
    parameters and buffers themselves) with that rank's adapters attached, so clients at ranks 8, 4, 2
    and 1 hold the base once. The base is put on the run's device and dtype once; adapters and the
    head are float32 whatever the base's dtype. ``checkout`` resets a model completely: base weights
    from the global state (merging methods only; the pristine copy of the adapted weights exists only
    for them), adapters re-initialised from a seed, the initial head; the strategy then loads its tensors.
    """

    def __init__(self, config: FedConfig, base_model: nn.Module) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        strategy = make_strategy(config)
        self.merges = strategy.merges_base  # whether the method merges into the base
        self._base = place_base(base_model, self.device, resolve_dtype(config.model_dtype))
        self._models: dict[int, nn.Module] = {}
        self._pristine: dict[str, Tensor] = {}  # base weights of adapted modules before any merge (merging methods)
        self._heads: dict[str, Tensor] = {}  # initial head, identical for every rank's model
        self.spec = adapters.AdapterSpec(kind=config.adapter, rank=config.rank, alpha=config.alpha,
                                         target_modules=config.target_modules
                                         or adapters.default_target_modules(base_model, config.adapter),
                                         rslora=config.rslora, latent=strategy.latent_factor)

    @property
    def base_model(self) -> nn.Module:
        """The one base model every rank's model shares (on the run's device, in its dtype)."""
        return self._base

    @property
    def task_type(self) -> str:
        return "SEQ_CLS" if self.config.task == "classification" else "CAUSAL_LM"

    def model(self, rank: int) -> nn.Module:
        if rank not in self._models:
            model = adapters.attach_adapter(shares_weights_with(self._base), self.spec, self.task_type, rank=rank)
            adapters.trainables_to_float32(model)
            if self.config.gradient_checkpointing:
                enable_gradient_checkpointing(model, self.config.model)
            if not self._models:
                if self.merges:
                    self._pristine = {n: w.detach().clone() for n, w in adapters.base_weights(model).items()}
                self._heads = {n: p.detach().clone() for n, p in adapters.head_parameters(model).items()}
            self._models[rank] = model
        return self._models[rank]

    def template(self, rank: int) -> dict[str, Tensor]:
        """The shared tensors of a model at ``rank`` as meta tensors: the names, shapes and dtypes an
        upload is checked against."""
        return {n: torch.empty_like(p, device="meta") for n, p in adapters.shared_parameters(self.model(rank)).items()}

    def pristine_base(self) -> dict[str, Tensor]:
        """Base weights of the adapted modules as loaded, before any merge: a copy kept for merging
        methods, the live (never merged) weights themselves for the others."""
        if self.merges:
            self.model(self.config.rank)  # the copy is taken when the first model is built
            return self._pristine
        model = next(iter(self._models.values()), None) or self.model(self.config.rank)
        return {n: w.detach() for n, w in adapters.base_weights(model).items()}

    def checkout(self, rank: int, state: GlobalState, seed: int) -> nn.Module:
        """The rank's model with the global base weights and freshly initialised adapters."""
        model = self.model(rank)
        if self.merges:  # the merged base is kept float32 in the state; the model holds it in its own dtype
            with torch.no_grad():
                for name, weight in adapters.base_weights(model).items():
                    weight.copy_(state.base.get(name, self._pristine[name]))
        adapters.reset_adapters(model, seed)
        adapters.write_tensors(model, self._heads)
        model.train()
        return model


def place_base(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """The base model on ``device`` in ``dtype`` (None: as loaded), in place, frozen. A quantised base was
    loaded onto its device in its dtype, and bitsandbytes' weights cannot be cast."""
    if is_quantized(model):
        model.requires_grad_(False)
        return model
    if dtype is not None and base_dtype(model) != dtype:
        model.to(dtype=dtype)
    model.to(device)
    model.requires_grad_(False)
    return model


def shares_weights_with(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s module tree whose parameters and buffers ARE the base's (no weight is
    copied): peft can wrap its modules without touching ``base``, and every copy sees one set of weights."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def enable_gradient_checkpointing(model: nn.Module, name: str) -> None:
    """Recomputes each block's activations in the backward pass (non-reentrant, so frozen inputs need
    no gradient and per-sample hooks see each layer once)."""
    inner = model.get_base_model()
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: model {name!r} ({type(inner).__name__}) does not support it; "
                         "set gradient_checkpointing = false")
    if getattr(inner.config, "use_cache", None):  # a KV cache is useless in training and clashes with it
        inner.config.use_cache = False
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class LocalTrainer:
    """Local steps on one client's data: AdamW or SGD, an optional FedProx term and gradient masks.

    Without ``privacy`` it takes seeded mini-batches (without replacement within a pass) and the model's
    own loss. With ``privacy`` every step is DP-SGD: a Poisson sample at rate q, the sum of per-sample
    losses, per-sample gradients from hooks, one fused ``dp_clip_noise`` with a fresh offset of the
    client's secret stream, and one accountant step (empty samples included).
    """

    def __init__(self, config: FedConfig, data, seed: int, privacy: ClientPrivacy | None = None,
                 proximal: Mapping[str, Tensor] | None = None, lr: float | None = None) -> None:
        self.config = config
        self.lr = config.lr if lr is None else lr  # this round's (``FedConfig.round_lr``)
        self.data = data
        self.seed = seed
        self.privacy = privacy
        # FedProx's w_global: the tensors this client downloaded this round, by name (None: every trainable
        # tensor as it was when ``train`` started, for a trainer used outside a federated round)
        self.proximal = proximal
        self.dp_seconds = 0.0  # time in the clip-and-noise step (benchmarks split a round with it)
        self.steps = 0  # optimizer steps taken (DP-SGD: noisy steps, empty samples included)

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

    def train(self, model: nn.Module, *, steps: int | None = None, penalty: Callable[[], Tensor] | None = None,
              masks: Mapping[str, Tensor] | None = None, correction: Mapping[str, Tensor] | None = None) -> float:
        """Runs the local steps (default ``local_steps``); returns the mean loss per sample.

        ``penalty`` is a data-independent term (HetLoRA's); with the FedProx term, which pulls the
        trainable tensors the client downloaded towards their downloaded values (``proximal``; tensors it
        keeps locally, such as FedSA's B, are not pulled), it is added to the gradient after the DP step:
        post-processing, so it costs no privacy. ``masks`` (by parameter name, broadcastable) zero
        gradient coordinates that must not train. ``correction`` (by parameter name, each of its
        parameter's shape; SCAFFOLD's c - c_k) is added to every step's gradient before the optimizer
        step, after the DP step on the private path (post-processing too), masked like the gradient.
        """
        params = adapters.trainable_parameters(model)
        if not params:
            raise ValueError("LocalTrainer: the model has no trainable adapter parameters")
        if self.config.optimizer == "sgd":
            optimizer = torch.optim.SGD(params.values(), lr=self.lr)
        else:
            optimizer = torch.optim.AdamW(params.values(), lr=self.lr, weight_decay=0.0)
        regulariser = self._regulariser(params, penalty)
        steps = steps or self.config.local_steps
        correction = check_correction(params, correction or {})
        if self.privacy is not None:
            return self._private_steps(model, params, optimizer, regulariser, masks or {}, steps, correction)
        losses, device = [], model_device(model)
        for batch in self.batches(steps):
            batch = to_device(batch, device)
            with autocast(model):  # a no-op over a float32 base
                if self.config.task == "sft":  # each example's mean over its own response tokens, as DP-SGD's
                    loss = summed_loss(model, batch) / len(batch["labels"])
                else:
                    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss.float()
            total = loss if regulariser is None else loss + regulariser()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            add_correction_(params, correction)
            for name, mask in (masks or {}).items():
                if params.get(name) is not None and params[name].grad is not None:
                    params[name].grad.mul_(mask.to(params[name].grad.dtype))
            optimizer.step()
            self.steps += 1
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def _regulariser(self, params: dict[str, nn.Parameter], penalty) -> Callable[[], Tensor] | None:
        mu = self.config.fedprox_mu
        if mu == 0:
            return penalty
        if self.proximal is None:
            reference = {n: p.detach().clone() for n, p in params.items()}
        else:  # only what came from the server: w_global is the download, not the client's own tensors
            reference = {n: t.detach().to(params[n].device, params[n].dtype)
                         for n, t in self.proximal.items() if n in params}
        if not reference:
            return penalty

        def regulariser() -> Tensor:  # FedProx (arXiv 1812.06127): (mu / 2) ||w - w_global||^2
            prox = 0.5 * mu * sum(((params[n] - w) ** 2).sum() for n, w in reference.items())
            return prox if penalty is None else prox + penalty()

        return regulariser

    def _private_steps(self, model, params, optimizer, regulariser, masks, steps: int, correction) -> float:
        privacy = self.privacy
        names, tensors = list(params), list(params.values())
        mask_list = [masks.get(n) for n in names]
        n, rate = len(self.data), privacy.account.sample_rate
        device = model_device(model)
        losses, counts = [], []
        with PerSampleGradients(model, tensors) as collector:
            for _ in range(steps):
                offset = privacy.noise.next_offset()
                chosen = privacy.noise.poisson_sample(n, rate, offset)
                collector.clear()
                optimizer.zero_grad(set_to_none=True)
                if len(chosen):
                    with autocast(model):
                        loss = summed_loss(model, to_device(self.data[chosen.tolist()], device))
                    loss.backward()
                    losses.append(float(loss.detach()))
                    counts.append(len(chosen))
                started = time.perf_counter()
                noisy_gradients_(tensors, collector.grad_samples, len(chosen), privacy, rate * n, offset, mask_list)
                self.dp_seconds += time.perf_counter() - started
                if regulariser is not None:
                    extra = torch.autograd.grad(regulariser(), tensors, allow_unused=True)
                    for p, g in zip(tensors, extra):
                        if g is not None:
                            p.grad.add_(g)
                add_correction_(params, correction, masks)
                optimizer.step()
                privacy.account.step()
                self.steps += 1
        return sum(losses) / max(sum(counts), 1) if counts else float("nan")


def check_correction(params: Mapping[str, nn.Parameter], correction: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``correction`` on its parameters' devices and dtypes, every name a trainable parameter of its shape."""
    out = {}
    for name, tensor in correction.items():
        if name not in params:
            raise ValueError(f"LocalTrainer: correction for {name!r}, which is not a trainable parameter "
                             f"(trainable: {sorted(params)[:3]}...)")
        if tensor.shape != params[name].shape:
            raise ValueError(f"LocalTrainer: correction for {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(params[name].shape)}")
        out[name] = tensor.detach().to(params[name].device, params[name].dtype)
    return out


def add_correction_(params: Mapping[str, nn.Parameter], correction: Mapping[str, Tensor],
                    masks: Mapping[str, Tensor] | None = None) -> None:
    """``grad += correction`` for every corrected parameter (a parameter without a gradient gets the
    correction as its gradient), times its mask where ``masks`` has one (the private path masks inside
    the DP step, before this; the plain path masks after it)."""
    for name, term in correction.items():
        p = params[name]
        if masks and masks.get(name) is not None:
            term = term * masks[name].to(term.dtype)
        if p.grad is None:
            p.grad = term.clone()
        else:
            p.grad.add_(term)


def run_client_round(strategy: Strategy, bench: ModelBench, state: GlobalState, client: ClientState,
                     payload: Mapping[str, Tensor], data, round_index: int,
                     fault: Callable[[], None] | None = None) -> Reply:
    """One client's round: prepare, train, upload; updates ``client.tensors`` with what it keeps.
    ``fault`` is called after local training (tests and failure injection make it raise)."""
    seed = derive_seed(strategy.config.seed, "client", client.cid, round_index)
    model = bench.checkout(client.rank, state, seed)
    strategy.prepare(model, client, payload, round_index)
    start = adapters.read_tensors(model)
    trainer = LocalTrainer(strategy.config, data, seed, client.privacy, proximal=payload,
                           lr=strategy.config.round_lr(round_index))
    first_offset = client.privacy.noise.offset if client.privacy is not None else None
    # dropout draws from torch's global generator: seed it per client and round, so a client's round is
    # the same whichever clients ran before it in this process (simulator, Flower node, resumed run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = strategy.local_update(trainer, model, client, round_index)
    if fault is not None:
        fault()
    upload = strategy.upload(model, client, start, round_index)
    client.tensors = {n: t.detach().clone() for n, t in strategy.keep(model, client, round_index).items()}
    client.info["last_round"] = round_index
    local = {"loss": loss, "steps": trainer.steps, "dp_seconds": trainer.dp_seconds}
    if client.privacy is not None:  # the stretch of its stream this round used: [first, last]
        local.update(first_offset=first_offset, last_offset=client.privacy.noise.offset - 1)
    log_local(client.cid, round_index, local)
    if client.privacy is None:  # nothing is promised: the loss may go to the server's records
        metrics = {"loss": loss}
    else:  # the spend so far, a function of public parameters (sigma, q, steps); never the loss or the key
        metrics = {"epsilon": client.privacy.account.epsilon()}
        client.info["epsilon"] = metrics["epsilon"]
    return Reply(cid=client.cid, num_examples=client.num_examples, tensors=upload, metrics=metrics, local=local)


#: the client's own log: what it notes of a round and never sends (the SuperNode's log on Flower; in
#: the simulator, the run's --log-file)
client_log = logging.getLogger("fedlora_ext.client")


def log_local(cid: int, round_index: int, local: Mapping[str, float]) -> None:
    """Notes a round's training loss, steps and noise offsets in the client's own log (it stays there)."""
    offsets = f", noise offsets {local['first_offset']}..{local['last_offset']}" if "first_offset" in local else ""
    client_log.info("client %d, round %d: %d local steps%s, training loss %.6g", cid, round_index + 1,
                    local["steps"], offsets, local["loss"])
