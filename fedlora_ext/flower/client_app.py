"""The ClientApp: one client of a run per Flower node, running our client round (DP included).

Every message carries the run's configuration from the server; the node's ``node_config`` says which
client it is (``partition-id``, and ``num-partitions`` must equal ``num_clients``), optionally its
adapter ``rank`` and its ``device`` (``"cuda:1"``: where this node trains, instead of the run's
``device``; transport stays CPU arrays). The client's state (kept tensors, account, noise key and
offset, merged base) lives in ``context.state`` on the node and, with ``state-dir`` in its
``node_config``, in a file there that survives a SuperNode restart (:mod:`fedlora_ext.flower.node_state`):
the key never leaves the node. A train message says how many DP-SGD steps the server has asked of the
client before it (``steps-asked``); the node's account and noise offset never fall below that, so
even a node that lost its state neither resets its budget nor reuses a (key, offset) pair. Replies
hold only what the method uploads and fields public under the privacy guarantee (n_k, rank, the
account's report; docs/PRIVACY.md); a private client's training loss stays in the node's own log.
Under secure aggregation (``secure_aggregation``) a train message runs Flower's SecAgg+ client
(:func:`secure_train_mod`): the upload leaves only masked, as the change from where the client started
(:func:`secure_layout`), and its count only as the weight inside the masked vector.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.device import resolve_device
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.data.task import build_task
from fedlora_ext.federated.client import ModelBench, client_log, run_client_round
from fedlora_ext.federated.client_state import client_meta, restore_client
from fedlora_ext.federated.evaluate import evaluate
from fedlora_ext.federated.privacy import client_privacy
from fedlora_ext.federated.simulation import (
    SCORES,
    client_model,
    initial_model,
    partition_clients,
)
from fedlora_ext.flower.node_state import load_state, save_state, state_file
from fedlora_ext.flower.records import config_from_record, from_arrays, to_arrays
from fedlora_ext.strategies.base import make_strategy
from fedlora_ext.strategies.merging import MergingStrategy

log = logging.getLogger("fedlora_ext.flower")

app = ClientApp()
client_log.setLevel(logging.INFO)  # the node's own log holds what its client keeps (training loss, steps)

_STATE = "fedlora.client"  # ConfigRecord: the client's meta (JSON, with its key), the merge marker
_TENSORS = "fedlora.tensors"  # ArrayRecord: what the client keeps between rounds
_BASE = "fedlora.base"  # ArrayRecord: its copy of the merged base (FLoRA, FedEx-LoRA)


def node_identity(node_config, config: FedConfig) -> tuple[int, int | None]:
    """(client id, rank or None) from the node's config, checked against the run."""
    if "partition-id" not in node_config:
        raise ValueError("node_config: 'partition-id' is missing; start the supernode with "
                         "--node-config \"partition-id=<k> num-partitions=<num_clients>\"")
    cid = int(node_config["partition-id"])
    parts = int(node_config.get("num-partitions", config.num_clients))
    if parts != config.num_clients or not 0 <= cid < config.num_clients:
        raise ValueError(f"node_config: partition-id {cid} of num-partitions {parts} does not fit the run's "
                         f"num_clients = {config.num_clients}")
    rank = node_config.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"node_config: rank must be an int >= 1, got {rank!r}")
    return cid, rank


def node_device(node_config, config: FedConfig) -> str:
    """The device this node trains on: its ``node_config`` ``device`` when set (checked against what
    torch sees here), else the run's ``device``."""
    device = node_config.get("device")
    if device is None or device == "":
        return config.device
    try:
        config.replace(device=device)  # FedConfig's check of the format: 'auto', 'cpu', 'cuda', 'cuda:N'
    except ValueError as error:
        raise ValueError(str(error).replace("FedConfig: ", "node_config: ", 1)) from None
    try:
        resolve_device(device)
    except ValueError as error:
        raise ValueError(f"node_config: {error}") from None
    return device


class NodeRuntime:
    """What a node builds once per run and configuration: its data shard, the model bench, the
    strategy with its shared initial state (seeded exactly as on the server and in the simulator)."""

    def __init__(self, config: FedConfig, cid: int) -> None:
        self.config, self.cid = config, cid
        self.strategy = make_strategy(config)
        torch.manual_seed(config.seed)
        task = build_task(config.replace(out_dir=None))
        client, self.train_data, self.test_data = partition_clients(config, self.strategy, task.train)[cid]
        self.num_examples = client.num_examples
        self.bench = ModelBench(config, task.model)
        self.initial = self.strategy.init_state(initial_model(self.bench, self.strategy))

    def new_client(self) -> ClientState:
        client = ClientState(cid=self.cid, rank=self.strategy.client_rank(self.config.ranks()[self.cid]),
                             num_examples=self.num_examples)
        if self.config.sample_dp:
            client.privacy = client_privacy(self.config, self.strategy, self.cid, self.num_examples)
        return client

    def load(self, context: Context, run_key: int) -> tuple[ClientState, dict[str, torch.Tensor], int]:
        """The client, its merged base and merge marker from the node's state: Flower's, else the
        node's state file under ``run_key`` (a restarted SuperNode, a resumed run), else fresh on first use."""
        if _STATE in context.state:
            meta = json.loads(context.state[_STATE]["meta"])
            client = restore_client(meta, from_arrays(context.state[_TENSORS]))
            base = from_arrays(context.state[_BASE]) if _BASE in context.state else {}
            return client, base, int(context.state[_STATE]["merged-through"])
        path = state_file(context.node_config, run_key, self.cid)
        stored = load_state(path) if path is not None else None
        if stored is not None:
            meta, tensors, base = stored
            log.info("client %d: continuing from its state file %s", self.cid, path)
            return restore_client(meta, tensors), base, int(meta["merged-through"])
        base = {n: w.clone() for n, w in self.initial.base.items()}
        return self.new_client(), base, 0

    def save(self, context: Context, client: ClientState, base: dict, merged_through: int, run_key: int) -> None:
        meta = client_meta(client, secret=True)
        context.state[_STATE] = ConfigRecord({"meta": json.dumps(meta), "merged-through": merged_through})
        context.state[_TENSORS] = to_arrays(client.tensors)
        if base:
            context.state[_BASE] = to_arrays(base)
        path = state_file(context.node_config, run_key, self.cid)
        if path is not None:
            save_state(path, {**meta, "merged-through": merged_through}, client.tensors, base)



_RUNTIMES: dict[tuple, NodeRuntime] = {}


def runtime(message: Message, context: Context) -> tuple[NodeRuntime, FedConfig]:
    """The node's runtime for this run and configuration (built once per process)."""
    config = config_from_record(message.content.config_records.get("config"))
    cid, rank = node_identity(context.node_config, config)
    if rank is not None and config.ranks()[cid] != rank:
        config = config.replace(client_ranks=tuple(rank if c == cid else r for c, r in enumerate(config.ranks())))
    device = node_device(context.node_config, config)
    if device != config.device:  # the node's own device: part of the cache key, so one runtime per device
        config = config.replace(device=device)
    key = (context.run_id, context.node_id, json.dumps(config.to_dict(), sort_keys=True))
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run per node process at a time: drop an earlier run's models
        _RUNTIMES[key] = NodeRuntime(config, cid)
    return _RUNTIMES[key], config


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Who this node is: client id, training examples, rank."""
    node, config = runtime(message, context)
    rank = config.ranks()[node.cid]
    return Message(RecordDict({"node": MetricRecord({"cid": node.cid, "num-examples": node.num_examples,
                                                     "rank": rank})}), reply_to=message)


@dataclass
class Arrival:
    """A train or evaluate message at a node: the download, and the client as it was stored, with its
    copy of the merged base already following the merges the download carries."""

    node: NodeRuntime
    config: FedConfig
    round_index: int
    payload: dict[str, torch.Tensor]
    client: ClientState
    base: dict[str, torch.Tensor]
    merged_through: int
    run_key: int  # the state file's: the run id of the run's first start (a resumed run is a new Flower run)

    @classmethod
    def of(cls, message: Message, context: Context) -> Arrival:
        node, config = runtime(message, context)
        payload = from_arrays(message.content["arrays"])
        run_key = int(message.content["config"].get("run-key", context.run_id))
        client, base, merged_through = node.load(context, run_key)
        if isinstance(node.strategy, MergingStrategy):  # FLoRA / FedEx-LoRA: apply the downloaded merges
            merged_through = node.strategy.follow_merges(base, payload, merged_through)
        return cls(node, config, int(message.content["config"]["round"]), payload, client, base, merged_through,
                   run_key)

    @property
    def state(self) -> GlobalState:
        """What the node knows of the global state: its merged base (the tensors come in the payload)."""
        return GlobalState(tensors={}, base=self.base)

    def save(self, context: Context) -> None:
        self.node.save(context, self.client, self.base, self.merged_through, self.run_key)


def follow_server_count(client: ClientState, asked: int) -> None:
    """A private client's account and noise offset raised to the ``asked`` steps the server counts
    before this round, where they are behind (a node that lost its state): the server's count is
    public and never below what the client took, so the account only grows more conservative and no
    offset of the stream is used twice."""
    if client.privacy is None:
        return
    account, noise = client.privacy.account, client.privacy.noise
    if account.steps < asked:
        log.warning("client %d: its account holds %d DP-SGD steps, the server asked %d; counting the %d missing "
                    "(its state was lost?)", client.cid, account.steps, asked, asked - account.steps)
        account.step(asked - account.steps)
    noise.offset = max(noise.offset, asked)


def _privacy_record(client: ClientState) -> ConfigRecord:
    """The account's report (epsilon, delta, n, sigma, q, steps ...): never the key; no None values."""
    return ConfigRecord({k: v for k, v in client.privacy.account.report().items() if v is not None})


def _budget_refusal(node: NodeRuntime, client: ClientState) -> str | None:
    if client.privacy is None:
        return None
    return client.privacy.refusal(node.strategy.local_steps_per_round(client.num_examples), f"client {client.cid}")


def secure_train_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ on this node for a train message that carries the protocol's record (Flower's own
    ``secaggplus_mod``); any other message passes straight through, so plain runs are unchanged. Of
    the collect stage's reply only the masked vector and what :func:`train` lets leave go back: the
    legacy ``fitres.*`` records, which would carry the client's count in the clear, are dropped."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    reply = secaggplus_mod(message, context, call_next)
    content = reply.content
    for records in (content.array_records, content.metric_records, content.config_records):
        for name in [n for n in records if n.startswith("fitres.")]:
            del records[name]
    return reply


def secure_layout(upload: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], num_examples: int,
                  cid: int, clipping_range: float) -> RecordDict:
    """The reply ``secaggplus_mod`` reads as a legacy FitRes: the client's change this round (upload minus
    where it started: small values, so a small clipping range and a small quantisation step) as float64
    arrays sorted by name (the server expects that order), and its count as the weight the mod folds
    into the masked vector. A non-finite change is refused (it would poison the sum); values beyond the
    clipping range are clipped by the protocol, which is logged here, on the node."""
    missing = sorted(set(upload) - set(reference))
    if missing:
        raise ValueError(f"secure aggregation: client {cid} holds no starting value for {missing[:3]}, so it "
                         "cannot send its change")
    deltas = [(upload[n].detach().double().cpu() - reference[n].detach().double().cpu()).numpy()
              for n in sorted(upload)]
    if not all(np.isfinite(d).all() for d in deltas):
        raise ValueError(f"secure aggregation: client {cid}'s update is not finite; nothing is sent")
    largest = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)
    if largest > clipping_range:
        clipped = sum(int((np.abs(d) > clipping_range).sum()) for d in deltas)
        log.warning("client %d: %d values of its update exceed secagg_clipping_range = %g (largest %.4g); the "
                    "protocol clips them, so the mean is biased: raise secagg_clipping_range", cid, clipped,
                    clipping_range, largest)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), num_examples, {})
    return compat.fitres_to_recorddict(fitres, keep_input=False)


@app.train(mods=[secure_train_mod])
def train(message: Message, context: Context) -> Message:
    """One client round on the downloaded payload; replies with the upload and metrics. A node whose
    privacy budget this round's steps would exceed does not train: it replies with a ConfigRecord
    ``budget`` whose ``refused`` says why (and its account's report); after training, ``budget``'s
    ``exhausted`` says why it could not train another round ("" when it could)."""
    arrival = Arrival.of(message, context)
    node, client = arrival.node, arrival.client
    follow_server_count(client, int(message.content["config"].get("steps-asked", 0)))
    refusal = _budget_refusal(node, client)
    secure = RECORD_KEY_CONFIGS in message.content.config_records
    if refusal is not None:
        log.warning("round %d: %s; not training (privacy budget exhausted)", arrival.round_index + 1, refusal)
        arrival.save(context)
        if secure:  # the protocol has no place for a refusal: the node leaves this round's aggregation
            raise RuntimeError(refusal)
        return Message(RecordDict({"budget": ConfigRecord({"refused": refusal}),
                                   "privacy": _privacy_record(client)}), reply_to=message)
    start = {**client.tensors, **arrival.payload}  # where each trained tensor started (prepare's order)
    reply = run_client_round(node.strategy, node.bench, arrival.state, client, arrival.payload, node.train_data,
                             arrival.round_index)
    arrival.save(context)
    metrics = {k: float(v) for k, v in reply.metrics.items()}
    metrics["rank"] = client.rank
    if secure:  # the update goes masked inside the protocol, the count inside it as the weight
        content = secure_layout(reply.tensors, start, reply.num_examples, client.cid, arrival.config.secagg_clipping_range)
        content["metrics"] = MetricRecord(metrics)
    else:
        metrics["num-examples"] = reply.num_examples
        content = RecordDict({"arrays": to_arrays(reply.tensors), "metrics": MetricRecord(metrics)})
    if client.privacy is not None:  # the account's report (epsilon, delta, sigma, q, steps): never the key
        content["privacy"] = _privacy_record(client)
        content["budget"] = ConfigRecord({"exhausted": _budget_refusal(node, client) or ""})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate_own_model(message: Message, context: Context) -> Message:
    """The client's own model (kept tensors plus the download) on its own test split."""
    arrival = Arrival.of(message, context)
    node = arrival.node
    scores = {}
    if len(node.test_data):
        model = client_model(node.bench, node.strategy, arrival.state, arrival.client, arrival.payload,
                             arrival.round_index)
        scores = {k: float(v) for k, v in evaluate(model, node.test_data).items() if k in SCORES}
    arrival.save(context)
    return Message(RecordDict({"metrics": MetricRecord({**scores, "num-examples": len(node.test_data)})}),
                   reply_to=message)
