"""Our methods as a Flower strategy (Message API): configure and aggregate delegate to the registry.

The server side of a run is the simulator's: the same :class:`~fedlora_ext.federated.server.Server`
(sampling, download, byte ledger, update checks, aggregation, DP-FedAvg) over the same strategy, so
a deployment with the same seeds ends with the same adapter. Flower carries the messages.

Before round 1 the strategy waits for ``num_clients`` nodes and asks each (a QUERY message) for its
client id, training examples and rank; a node's ``node_config`` (``partition-id``, ``rank``) decides
them, so heterogeneous ranks are set per node.

With ``secure_aggregation`` a round's train step runs SecAgg+ (:mod:`fedlora_ext.flower.secure`): the
server gets the weighted mean of the uploads and aggregates it as one reply standing for the round's
clients, which for the methods allowed (``Strategy.averages_updates``) equals aggregating each upload.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.core.validation import RejectedUpdate
from fedlora_ext.data.task import build_task
from fedlora_ext.federated.checkpoint import CheckpointWriter, write_atomic
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.federated.privacy import PrivacyLedger, ServerPrivacy, privacy_report
from fedlora_ext.federated.release import release_statement
from fedlora_ext.federated.server import Server
from fedlora_ext.federated.simulation import (
    append_generations,
    check_private_model,
    data_description,
    global_model,
    global_scores,
    initial_model,
    mean_scores,
    personal_evaluation,
    personal_scope,
    privacy_metrics,
    round_metrics,
    save_adapter,
    write_run_config,
)
from fedlora_ext.flower.records import config_record, from_arrays, to_arrays
from fedlora_ext.flower.secure import SecureAggregationError, SecureSettings, secure_mean
from fedlora_ext.flower.resume import continue_run, metrics_lines, run_state
from fedlora_ext.strategies.base import make_strategy

log = logging.getLogger("fedlora_ext.flower")


def pause_for_tests(point: str) -> None:
    """For tests (python_tests/pausing.py): with <FEDLORA_TEST_PAUSE_DIR>/pause-<point> there, the server
    says paused-<point> and waits until the request is removed."""
    pauses = os.environ.get("FEDLORA_TEST_PAUSE_DIR")
    if pauses and (request := Path(pauses) / f"pause-{point}").exists():
        (Path(pauses) / f"paused-{point}").touch()
        while request.exists():
            time.sleep(0.05)


class FlowerRunError(RuntimeError):
    """The run cannot go on (too few nodes or valid replies); what was aggregated is saved."""


class FedLoRAStrategy(FlowerStrategy):
    """A Flower strategy running ``config.method`` from our registry.

    Args:
        config: the run (the nodes receive it with every message and run exactly it).
        node_timeout: seconds to wait for ``num_clients`` nodes to connect before the first round.
        resume: continue the run checkpointed in ``config.out_dir`` (:mod:`fedlora_ext.flower.resume`).
    """

    def __init__(self, config: FedConfig, *, node_timeout: float = 300.0, resume: bool = False) -> None:
        if getattr(make_strategy(config), "pool_clients", False):
            raise ValueError(f"method {config.method!r} pools every client's data in one place, which a "
                             "federation cannot do; run it with `fedlora run`")
        if resume and not config.out_dir:
            raise ValueError("resume: a run continues from the checkpoint in its out_dir, and config.out_dir is not set")
        self.config = config
        self.node_timeout = node_timeout
        self.nodes: dict[int, int] = {}  # cid -> Flower node id
        self.clients: list[ClientState] = []
        self.history: list[dict] = []
        self.client_reports: dict[str, dict] = {}
        self.server: Server | None = None
        self._round: dict = {}
        self.round_timeout: float | None = None  # each secure-aggregation stage's (the ServerApp's round-timeout)
        self.resume, self.rounds_done = resume, 0
        self.run_key: int | None = None  # the nodes keep their state under it: the first start's run id
        self.checkpoints: CheckpointWriter | None = None

    # ---- setup -----------------------------------------------------------------------------------
    def connect(self, grid: Grid) -> None:
        """Waits for the nodes, learns who is who, then builds the server side of the run."""
        config = self.config
        deadline = time.monotonic() + self.node_timeout
        while len(node_ids := list(grid.get_node_ids())) < config.num_clients:
            if time.monotonic() > deadline:
                raise FlowerRunError(f"{len(node_ids)} of num_clients = {config.num_clients} nodes connected within "
                                     f"{self.node_timeout:.0f} s; start more supernodes or lower num_clients")
            time.sleep(0.5)
        found = self._ask_who(grid, node_ids)
        if len(found) < len(node_ids):
            raise FlowerRunError(f"{len(found)} of {len(node_ids)} nodes answered within {self.node_timeout:.0f} s")
        if sorted(found) != list(range(config.num_clients)):
            raise FlowerRunError(f"nodes hold partitions {sorted(found)}, expected 0..{config.num_clients - 1} "
                                 f"(num_clients = {config.num_clients})")
        ranks = tuple(found[c][2] for c in range(config.num_clients))
        if ranks != config.ranks():  # ranks come from the nodes (node_config "rank")
            config = config.replace(client_ranks=ranks)
        self.run_key = grid.run.run_id  # a resumed run's is its checkpoint's
        self.setup(config, {c: found[c][0] for c in found}, {c: found[c][1] for c in found})

    def _ask_who(self, grid: Grid, node_ids: list[int]) -> dict[int, tuple[int, int, int]]:
        """Asks ``node_ids`` (a QUERY message) who they are: client id -> (node id, n_k, rank)."""
        hello = [Message(RecordDict({"config": config_record(self.config)}), node_id, MessageType.QUERY)
                 for node_id in node_ids]
        replies = list(grid.send_and_receive(hello, timeout=self.node_timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in hello}
        found: dict[int, tuple[int, int, int]] = {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                raise FlowerRunError(f"node {node} failed to start: {reply.error.reason}")
            m = reply.content["node"]
            cid, n, rank = int(m["cid"]), int(m["num-examples"]), int(m["rank"])
            if cid in found:
                raise FlowerRunError(f"nodes {found[cid][0]} and {node} both claim partition-id "
                                     f"{cid}; give every supernode its own --node-config partition-id")
            found[cid] = (node, n, rank)
        return found

    def rediscover(self, grid: Grid, round_index: int) -> None:
        """Nodes that joined since the run started (a restarted SuperNode comes back with a new node id)
        are asked who they are; one that holds a client of the run, with its n_k and rank, takes over
        that client's messages. Anything else about it is logged and it is left out."""
        known = set(self.nodes.values())
        new = [node for node in grid.get_node_ids() if node not in known]
        if not new:
            return
        try:
            found = self._ask_who(grid, new)
        except FlowerRunError as error:
            log.warning("round %d: a new node could not say who it is: %s", round_index + 1, error)
            return
        for cid, (node, n, rank) in found.items():
            client = next((c for c in self.clients if c.cid == cid), None)
            if client is None or client.num_examples != n or self.config.ranks()[cid] != rank:
                log.warning("round %d: node %s claims client %d (n = %d, rank %d), which does not match the run's; "
                            "left out", round_index + 1, node, cid, n, rank)
                continue
            log.info("round %d: client %d is now at node %s (was %s)", round_index + 1, cid, node, self.nodes[cid])
            self.nodes[cid] = node

    def setup(self, config: FedConfig, nodes: dict[int, int], num_examples: dict[int, int]) -> None:
        """The server state of the run: model, initial adapter (seeded as on every node) and clients."""
        self.config = config
        strategy = make_strategy(config)
        torch.manual_seed(config.seed)
        task = build_task(config.replace(out_dir=None))
        self.test_data, self.label_names, self.tokenizer = task.test, task.label_names, task.tokenizer
        self.bench = ModelBench(config, task.model)
        init = initial_model(self.bench, strategy)
        if config.sample_dp:
            check_private_model(config, strategy, init)
        privacy = ServerPrivacy(config, strategy, config.num_clients) if config.server_dp else None
        self.nodes = dict(nodes)
        self.clients = [ClientState(cid=c, rank=strategy.client_rank(config.ranks()[c]), num_examples=num_examples[c])
                        for c in sorted(nodes)]
        # the server's own count of each node's DP-SGD steps: what admits a node, whatever it reports
        ledger = PrivacyLedger(config, strategy, self.clients) if config.sample_dp else None
        self.server = Server(strategy, strategy.init_state(init), config.seed, privacy, self.bench.template,
                             device=self.bench.device, privacy_ledger=ledger)
        out = self.out_dir
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            data = data_description(task, task.train, task.test)
            resumed = continue_run(self, data) if self.resume else None
            write_run_config(out, config, task.label_names, data)
            write_atomic(out / "metrics.jsonl", metrics_lines(self.history))
            self.checkpoints = CheckpointWriter(out, resumed=resumed)

    @property
    def strategy(self):
        return self.server.strategy

    @property
    def state(self) -> GlobalState:
        return self.server.state

    @property
    def out_dir(self) -> Path | None:
        return Path(self.config.out_dir) if self.config.out_dir else None

    def global_arrays(self) -> ArrayRecord:
        return to_arrays(self.strategy.global_tensors(self.state))

    def _message(self, client: ClientState, kind: str, round_index: int, payload, **extra) -> Message:
        content = RecordDict({"arrays": to_arrays(payload),  # run-key: where the node keeps its state
                              "config": config_record(self.config, round=round_index, **{"run-key": self.run_key},
                                                      **extra)})
        return Message(content, self.nodes[client.cid], kind)

    def _train_message(self, client: ClientState, round_index: int) -> Message:
        """A train message; under DP-SGD it tells the node the steps the server asked of it before
        (``steps-asked``), below which its account and noise offset must not be."""
        ledger = self.server.privacy_ledger
        asked = ledger.steps(client.cid) if ledger is not None else 0
        payload = self.server.configure(client, round_index)  # charges this round's steps to the ledger
        return self._message(client, MessageType.TRAIN, round_index, payload, **{"steps-asked": asked})

    # ---- training --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_index = server_round - 1
        self.rediscover(grid, round_index)
        self.server.start_round()
        sampled, exhausted = self.server.admit(self.server.sample(round_index, self.clients), round_index)
        log.info("round %d: training on clients %s", server_round, [c.cid for c in sampled])
        messages = [self._train_message(c, round_index) for c in sampled]
        self._round = {"index": round_index, "sent": list(zip(messages, sampled)), "started": time.perf_counter(),
                       "exhausted": exhausted}
        if self.config.secure_aggregation:  # the train step runs inside SecAgg+: Flower has nothing left to send
            self._secure_round(grid, messages, sampled, round_index)
            return []
        return messages

    def _secure_round(self, grid: Grid, messages: list[Message], sampled: list[ClientState], round_index: int) -> None:
        """The round's train step under SecAgg+ (:mod:`fedlora_ext.flower.secure`): the collect-stage
        replies (no update in them) stand in for the train replies, the mean for the uploads."""
        names = self.strategy.upload_names(self.state, round_index)
        node_of = {c.cid: self.nodes[c.cid] for c in sampled}
        try:
            result = secure_mean(grid, {node_of[c.cid]: m for m, c in zip(messages, sampled)},
                                 {node_of[c.cid]: c.num_examples for c in sampled},
                                 {n: tuple(self.state.tensors[n].shape) for n in names},
                                 SecureSettings.of(self.config, self.round_timeout),
                                 after_stage=lambda stage: pause_for_tests(f"after-round-{round_index + 1}-{stage}"))
        except SecureAggregationError as error:
            self._finish_partial(round_index, {"secure_aggregation": str(error)})
            raise FlowerRunError(f"round {round_index + 1}: secure aggregation failed: {error}; stopping. "
                                 + (f"Rounds 1..{round_index} are saved" + (f" in {self.out_dir}" if self.out_dir else "")
                                    if round_index else "No round had completed")) from None
        self._round.update(secure=result, names=names, start={n: self.state.tensors[n] for n in names},
                           sent=[(result.collect_messages.get(node_of[c.cid], m), c) for m, c in zip(messages, sampled)],
                           left={c.cid: result.failed[node_of[c.cid]] for c in sampled if node_of[c.cid] in result.failed})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_index = self._round["index"]
        # a reply names the message it answers; the SuperLink's error for a lost node comes from itself
        sampled = [client for _, client in self._round["sent"]]
        sent = {message.metadata.message_id: client for message, client in self._round["sent"]}
        accepted, failed, answered = [], {}, set()
        exhausted = dict(self._round.get("exhausted", {}))
        if "secure" in self._round:  # Flower sent nothing: the protocol's collect-stage replies are the round's
            replies = self._round["secure"].collect_replies
        for message in replies:
            client = sent.get(message.metadata.reply_to_message_id)
            if client is None or client.cid in answered:
                log.warning("round %d: a reply to no message of this round (from node %s) is ignored",
                            server_round, message.metadata.src_node_id)
                continue
            answered.add(client.cid)
            refused = self._budget(message, client, round_index)
            if refused is not None:  # the node would have spent past its target: not a failure
                exhausted[str(client.cid)] = refused
                continue
            reply, reason = self._accept(message, client, round_index)
            if reply is not None:
                accepted.append(reply)
            else:
                failed[str(client.cid)] = reason
        for client in sampled:  # no reply at all: the round timed out on it
            if client.cid not in answered:
                failed[str(client.cid)] = f"client {client.cid}: " + self._round.get("left", {}).get(
                    client.cid, "no reply within the round's timeout")
                log.warning("round %d: %s", server_round, failed[str(client.cid)])
        needed = min(self.config.min_clients, len(sampled) - sum(str(c.cid) in exhausted for c in sampled))
        if len(accepted) < needed:
            self._finish_partial(round_index, failed)
            raise FlowerRunError(
                f"round {server_round}: {len(accepted)} valid replies from {len(sampled)} sampled clients, "
                f"fewer than min_clients = {self.config.min_clients}; stopping. Failures: {failed}. "
                + (f"Rounds 1..{round_index} are saved" + (f" in {self.out_dir}" if self.out_dir else "")
                   if round_index else "No round had completed"))
        accepted.sort(key=lambda r: r.cid)  # replies arrive in any order; sums must not depend on it
        trained = time.perf_counter()
        if accepted or self.server.privacy is not None:
            self.server.aggregate(self._secure_mean_reply(accepted) if "secure" in self._round else accepted,
                                  round_index, self.clients)
        metrics = round_metrics(round_index, accepted, self.server.ledger)
        metrics["trainings"] = list(self.server.trainings)
        if failed:
            metrics["failed"] = failed
        if exhausted:
            metrics["budget_exhausted"] = exhausted
        epsilons = self._ledger_epsilons()
        metrics.update(privacy_metrics(self.config, epsilons, self.clients, self.server.privacy))
        metrics.update(seconds_train=trained - self._round["started"],
                       seconds_aggregate=time.perf_counter() - trained)
        self._round["metrics"] = metrics
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        return self.global_arrays(), MetricRecord(scalars)

    def _ledger_epsilons(self) -> dict[str, float]:
        """Epsilon by the server's ledger of every client asked to train this round (kept in
        ``client.info`` for ``epsilon_max``): what the records say, whatever the nodes report."""
        ledger, epsilons = self.server.privacy_ledger, {}
        if ledger is not None:
            for cid in dict.fromkeys(t["client"] for t in self.server.trainings):
                client = next(c for c in self.clients if c.cid == cid)
                epsilons[str(cid)] = client.info["epsilon"] = ledger.accounts[cid].epsilon()
        return epsilons

    def _budget(self, message: Message, client: ClientState, round_index: int) -> str | None:
        """What a node says of its privacy budget: why it refused to train this round (returned, and the
        client is not sampled again), or, after training, why it cannot train another round (noted, so
        the next samples skip it)."""
        if message.has_error() or "budget" not in message.content.config_records:
            return None
        budget = message.content.config_records["budget"]
        refused = str(budget.get("refused", "") or "")
        if refused:
            self._keep_privacy_report(message, client)
            client.info["budget_exhausted"] = refused
            log.warning("round %d: %s; the node did not train (privacy budget exhausted)", round_index + 1, refused)
            return refused
        if budget.get("exhausted"):
            client.info["budget_exhausted"] = str(budget["exhausted"])
        return None

    def _keep_privacy_report(self, message: Message, client: ClientState) -> None:
        """The node's account report (its privacy record), when the reply carries one."""
        if "privacy" in message.content.config_records:
            self.client_reports[str(client.cid)] = dict(message.content.config_records["privacy"])

    def _accept(self, message: Message, client: ClientState, round_index: int) -> tuple[Reply | None, str | None]:
        """Decodes and checks one reply: (the reply, None), or (None, why it is refused)."""
        if message.has_error():
            reason = f"client {client.cid}: the node failed: {message.error.reason}"
            log.warning("round %d: %s", round_index + 1, reason)
            return None, reason
        if "secure" in self._round:
            return self._accept_secure(message, client, round_index)
        try:
            content = message.content
            tensors = from_arrays(content.array_records.get("arrays"))
            stats = content.metric_records.get("metrics")
            if stats is None:
                raise RejectedUpdate("the reply has no MetricRecord 'metrics'")
        except RejectedUpdate as error:
            reason = f"client {client.cid}, round {round_index + 1}: update rejected: {error}"
            log.warning(reason)
            return None, reason
        metrics = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        reply = Reply(cid=client.cid, num_examples=client.num_examples, tensors=tensors, metrics=metrics)
        reason = self.server.receive(reply, client, round_index)
        if reason is not None:
            return None, reason
        client.info["last_round"] = round_index  # the client holds what it trained (LoRA-A2, FLoRA)
        new_rank = int(metrics.get("rank", client.rank))
        if 1 <= new_rank <= client.rank:  # HetLoRA prunes a client's rank; it never grows
            client.rank = new_rank
        self._keep_privacy_report(message, client)
        return reply, None

    def _accept_secure(self, message: Message, client: ClientState, round_index: int) -> tuple[Reply | None, str | None]:
        """A collect-stage reply: the client is in the round exactly when its masked vector is in the sum;
        the reply holds no update, only its metrics and account report (what the node lets leave)."""
        result, node = self._round["secure"], self.nodes[client.cid]
        if node not in result.contributors:
            reason = f"client {client.cid}, round {round_index + 1}: {result.failed.get(node, 'not in the sum')}"
            log.warning(reason)
            return None, reason
        self.server.ledger.record("up", client.cid, result.bytes_up[node])
        stats = message.content.metric_records.get("metrics") or {}
        metrics = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        client.info["last_round"] = round_index
        self._keep_privacy_report(message, client)
        return Reply(cid=client.cid, num_examples=client.num_examples, tensors={}, metrics=metrics), None

    def _secure_mean_reply(self, accepted: list[Reply]) -> list[Reply]:
        """One reply standing for the round's clients: where the round started plus the mean change, with
        their total count. For a method whose aggregate is the weighted mean of the uploads, aggregating
        it equals aggregating the uploads one by one (its weight is 1)."""
        mean, start = self._round["secure"].mean, self._round["start"]
        tensors = {n: (start[n].double() + torch.from_numpy(mean[n]).to(start[n].device)).to(start[n].dtype)
                   for n in self._round["names"]}
        return [Reply(cid=-1, num_examples=sum(r.num_examples for r in accepted), tensors=tensors)]

    # ---- evaluation ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Personalised methods (and ``personal_eval``): the round's participants (the clients whose
        reply was aggregated) evaluate their own models, and every client does after the last round and
        every ``eval_every`` rounds (:func:`personal_scope`, as in the simulator)."""
        if not personal_evaluation(self.config, self.strategy):
            return []
        round_index = server_round - 1
        scope = personal_scope(self.config, round_index)
        replied = set(self._round["metrics"].get("clients", []))
        self._round["personal_scope"] = scope
        chosen = [c for c in self.clients if scope == "all" or c.cid in replied]
        return [self._message(c, MessageType.EVALUATE, round_index, self.strategy.download(self.state, c, round_index))
                for c in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global evaluation on the server's test split, the clients' scores, and the round's record."""
        metrics = self._round.pop("metrics")
        started = time.perf_counter()
        if self.strategy.global_model:
            metrics.update(global_scores(global_model(self.bench, self.strategy, self.state), self.config,
                                         self.test_data, self.label_names, server_round - 1, self.tokenizer))
            append_generations(self.out_dir, server_round, metrics.pop("generations", None))
        personal = [r.content["metrics"] for r in replies if not r.has_error() and "metrics" in r.content]
        personal = [m for m in personal if m["num-examples"] > 0]
        if "personal_scope" in self._round:
            metrics.update(personal_scope=self._round.pop("personal_scope"), personal_clients=len(personal))
        metrics.update(mean_scores("personal", [dict(m) for m in personal]))
        metrics["seconds_eval"] = time.perf_counter() - started
        metrics["seconds"] = time.perf_counter() - self._round["started"]
        self._record(metrics)
        return MetricRecord({k: float(v) for k, v in metrics.items()
                             if k.startswith(("test_", "personal_")) and isinstance(v, (int, float))})

    # ---- records ---------------------------------------------------------------------------------
    def _record(self, metrics: dict) -> None:
        """Appends the round to the history and, with an ``out_dir``, to metrics.jsonl and the adapter."""
        self.history.append(metrics)
        log.info("round %d: %s", metrics["round"], {k: v for k, v in metrics.items() if "accuracy" in k or k == "clients"})
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            save_adapter(self.out_dir / "adapter.safetensors", self.strategy, self.state, self.bench.pristine_base())
            self.checkpoints.save(run_state(self, metrics["round"]))
        pause_for_tests(f"after-round-{metrics['round']}")

    def _finish_partial(self, round_index: int, failed: dict) -> None:
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"round": round_index + 1, "stopped": True, "failed": failed}) + "\n")
        self.finish()

    def finish(self) -> dict:
        """The privacy report (and privacy.json); the adapter is already saved after the last round."""
        release = release_statement(self.config, personal=personal_evaluation(self.config, self.strategy))
        report = privacy_report(self.server.privacy_ledger, self.server.privacy, self.client_reports, release)
        if self.out_dir is not None and report:
            (self.out_dir / "privacy.json").write_text(json.dumps(report, indent=2))
        return report

    def summary(self) -> None:
        log.info("fedlora %s: %d clients, rank(s) %s, %d rounds, min_clients %d", self.config.method,
                 self.config.num_clients, list(self.config.ranks()), self.config.rounds, self.config.min_clients)
