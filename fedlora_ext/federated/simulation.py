"""The in-process simulator: every client of a federated run on one machine, round by round.

``simulate(config)`` builds the model, the data and its partition, runs the rounds with the configured
strategy, evaluates, accounts bytes and privacy, and writes ``metrics.jsonl``, ``config.json``, the final
global adapter (``adapter.safetensors``) and, for a private run, ``privacy.json`` to ``config.out_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.data.inputs import model_fingerprint
from fedlora_ext.data.task import build_task
from fedlora_ext.dp.per_sample import PerSampleGradients
from fedlora_ext.errors import RunError
from fedlora_ext.federated.checkpoint import (
    CheckpointWriter,
    RunState,
    read_index,
    read_run,
    update_config,
    write_atomic,
)
from fedlora_ext.federated.client import ModelBench, derive_seed, run_client_round
from fedlora_ext.federated.comm import CommLedger
from fedlora_ext.federated.evaluate import eval_subset, evaluate, evaluate_sft
from fedlora_ext.federated.extension import check_budget, extended_config
from fedlora_ext.federated.partition import (
    dirichlet_partition,
    iid_partition,
    split_train_test,
)
from fedlora_ext.federated.privacy import PrivacyLedger, ServerPrivacy, client_privacy, privacy_report
from fedlora_ext.federated.release import release_statement
from fedlora_ext.federated.run_inputs import check_same_inputs, relocated
from fedlora_ext.federated.server import Server
from fedlora_ext.strategies.base import Strategy, make_strategy

log = logging.getLogger("fedlora_ext.simulation")


@dataclass
class SimulationResult:
    """What a run leaves behind: metrics per round, the final server state, every client's state and
    the privacy report (:func:`fedlora_ext.federated.privacy.privacy_report`; empty without DP)."""

    history: list[dict]
    state: GlobalState
    clients: list[ClientState]
    ledger: CommLedger
    out_dir: Path | None = None
    strategy: Strategy | None = field(default=None, repr=False)
    privacy: dict = field(default_factory=dict)


class Simulation:
    """A federated run in one process. Build it, then ``run()``; ``step(round)`` runs one round."""

    def __init__(self, config: FedConfig, *, train_data=None, test_data=None, base_model=None) -> None:
        if config.secure_aggregation:  # one process sees every update anyway: nothing to hide it from
            raise ValueError("secure_aggregation is a Flower feature (SecAgg+ between nodes); run it with "
                             "`flwr run apps/fedlora`, or set secure_aggregation = false for `fedlora run`")
        self.config = config
        self.strategy = make_strategy(config)
        seed = config.seed
        task = build_task(config) if train_data is None or test_data is None or base_model is None else None
        self.train_data = train_data if train_data is not None else task.train
        self.test_data = test_data if test_data is not None else task.test
        base = base_model if base_model is not None else task.model
        self.label_names = task.label_names if task is not None else []
        self.tokenizer = task.tokenizer if task is not None else None  # decodes SFT sample generations
        self.data = data_description(task, self.train_data, self.test_data, config.model)
        self.bench = ModelBench(config, base)
        self.clients, self.client_data = self._make_clients()
        init = initial_model(self.bench, self.strategy)
        if config.sample_dp:  # fail before training if DP-SGD has nothing it can train
            check_private_model(config, self.strategy, init)
        server_privacy = ServerPrivacy(config, self.strategy, len(self.clients)) if config.server_dp else None
        ledger = PrivacyLedger(config, self.strategy, self.clients) if config.sample_dp else None
        self.server = Server(self.strategy, self.strategy.init_state(init), seed, server_privacy, self.bench.template,
                             device=self.bench.device, privacy_ledger=ledger)
        self.history: list[dict] = []
        self.generations: list[dict] | None = None  # the last round's SFT sample generations
        self.rounds_done = 0
        self.extended_from: int | None = None  # resumed with more rounds: the total planned before
        self._checkpoints: CheckpointWriter | None = None
        self._touched: set[int] = set()  # clients sampled since the last checkpoint

    @property
    def state(self) -> GlobalState:
        return self.server.state

    @state.setter
    def state(self, value: GlobalState) -> None:
        self.server.state = value

    @property
    def ledger(self) -> CommLedger:
        return self.server.ledger

    def _make_clients(self):
        clients, data = [], []
        for client, train, test in partition_clients(self.config, self.strategy, self.train_data):
            if self.config.sample_dp:
                client.privacy = client_privacy(self.config, self.strategy, client.cid, client.num_examples)
            clients.append(client)
            data.append((train, test))
        return clients, data

    def participants(self, round_index: int) -> list[ClientState]:
        """The clients sampled for a round (seeded; at least one)."""
        return self.server.sample(round_index, self.clients)

    def step(self, round_index: int, progress=None) -> dict:
        """One round: download, local training, upload, checks, aggregation, evaluation; its metrics.

        Clients that fail (an exception, a late or a lost reply: real or injected by
        ``client_failure_rate``) are left out; the round aggregates the rest when at least
        ``min_clients`` of those sampled replied validly (FedAvg weights renormalise over them), else it
        is retried with a fresh sample (``round_retries``) or skipped. A client that trained has spent
        its privacy whether or not its update arrived; a sampled client whose budget this round's steps
        would exceed is left out before it trains (``budget_exhausted``)."""
        started = time.perf_counter()
        self.server.start_round()
        failed: dict[str, str] = {}
        exhausted: dict[str, str] = {}
        trained_any: dict[int, ClientState] = {}
        for attempt in range(self.config.round_retries + 1):
            sampled, refused = self.server.admit(self.server.sample(round_index, self.clients, attempt), round_index)
            self._touched.update(c.cid for c in sampled)  # the clients a round may change: see save_checkpoint
            exhausted.update(refused)
            replies, trained, errors = self._train_clients(round_index, sampled, attempt, failed, progress)
            trained_any.update((c.cid, c) for c in trained)
            check_not_deterministic(round_index, sampled, [e for _, e in errors])
            for cid, _ in errors:
                log.warning("round %d: %s", round_index + 1, failed[str(cid)])
            # a sample whose every client is out of budget is a failed attempt, not an empty round
            needed = min(self.config.min_clients, len(sampled)) if sampled or not refused else 1
            if len(replies) >= needed:
                break
            reason = (f"round {round_index + 1}: {len(replies)} valid replies from {len(sampled)} sampled clients, "
                      f"fewer than min_clients = {self.config.min_clients}")
            log.warning("%s; %s", reason, "retrying with a new sample" if attempt < self.config.round_retries
                        else "skipping the round (the global state is unchanged)")
        trained_at = time.perf_counter()
        skipped = len(replies) < needed
        if not skipped and (replies or self.server.privacy is not None):  # DP-FedAvg noises empty rounds
            self.server.aggregate(replies, round_index, self.clients)
        aggregated = time.perf_counter()
        metrics = round_metrics(round_index, replies, self.ledger)
        metrics["trainings"] = list(self.server.trainings)
        if failed:
            metrics["failed"] = failed
        if skipped:
            metrics["skipped"] = reason
        if exhausted:
            metrics["budget_exhausted"] = exhausted
        metrics.update(self.privacy_metrics(list(trained_any.values())))
        replied = {r.cid for r in replies}  # this round's participants: see evaluate()
        metrics.update(self.evaluate(round_index, [c for c in self.clients if c.cid in replied]))
        self.generations = metrics.pop("generations", None)  # run() writes them beside metrics.jsonl
        finished = time.perf_counter()
        metrics.update(seconds=finished - started, seconds_train=trained_at - started,
                       seconds_dp=sum(r.local.get("dp_seconds", 0.0) for r in replies),
                       seconds_aggregate=aggregated - trained_at, seconds_eval=finished - aggregated)
        self.history.append(metrics)
        return metrics

    def _train_clients(self, round_index: int, sampled: list[ClientState], attempt: int, failed: dict, progress):
        """The sampled clients' rounds: (valid replies, clients that trained, (cid, exception) of the
        clients that raised); failures go to ``failed``."""
        faults = injected_faults(self.config, round_index, attempt, [c.cid for c in sampled])
        replies, trained, errors = [], [], []
        for client in sampled:
            payload = self.server.configure(client, round_index, attempt)
            fault = faults.get(client.cid)
            started = time.perf_counter()
            try:
                reply = run_client_round(self.strategy, self.bench, self.state, client, payload,
                                         self.client_data[client.cid][0], round_index,
                                         fault=_raise_injected if fault == "exception" else None)
            except Exception as error:  # a failing client must not take the round down with it
                failed[str(client.cid)] = f"client {client.cid}: {type(error).__name__}: {error}"
                errors.append((client.cid, error))  # logged by step() unless they stop the run
                trained.append(client)
                continue
            finally:
                if progress is not None:
                    progress.update(1)
            trained.append(client)
            elapsed = time.perf_counter() - started
            timeout = self.config.client_timeout
            if fault in ("timeout", "dropout") or (timeout is not None and elapsed > timeout):
                failed[str(client.cid)] = f"client {client.cid}: " + (
                    "reply lost (dropped out, injected)" if fault == "dropout" else
                    "reply too late (injected timeout)" if fault == "timeout" else
                    f"no reply within client_timeout = {timeout} s (took {elapsed:.2f} s)")
                log.warning("round %d: %s", round_index + 1, failed[str(client.cid)])
                continue
            reason = self.server.receive(reply, client, round_index)
            if reason is None:
                replies.append(reply)
            else:
                failed[str(client.cid)] = reason
        return replies, trained, errors

    def privacy_metrics(self, trained: list[ClientState]) -> dict:
        """Epsilon of every client that trained this round (its update delivered or not)."""
        epsilons = {}
        for client in trained:
            if client.privacy is not None:
                epsilons[str(client.cid)] = client.info["epsilon"] = client.privacy.account.epsilon()
        return privacy_metrics(self.config, epsilons, self.clients, self.server.privacy)

    def privacy_report(self) -> dict:
        own = {str(c.cid): c.privacy.account.report() for c in self.clients if c.privacy is not None}
        return privacy_report(self.server.privacy_ledger, self.server.privacy, own,
                              release_statement(self.config, personal=personal_evaluation(self.config, self.strategy)))

    def global_model(self):
        """The server's model: global tensors (and merged base) at the global rank."""
        return global_model(self.bench, self.strategy, self.state)

    def client_model(self, client: ClientState, round_index: int):
        """A client's own model: what it would start its next round from."""
        payload = self.strategy.download(self.state, client, round_index)
        return client_model(self.bench, self.strategy, self.state, client, payload, round_index)

    def evaluate(self, round_index: int, participants: list[ClientState] | None = None) -> dict:
        """The global model's scores (methods with one) and, under :func:`personal_evaluation`, the mean
        of the clients' own models' scores on their own test splits (``personal_accuracy`` /
        ``personal_loss``): of the round's ``participants`` (``step`` passes the clients whose reply
        arrived and passed the server's checks in the round's last attempt; a client whose reply was
        lost, late or rejected is left out, as a deployment would not hear from it), or of every client
        when :func:`personal_scope` says ``"all"`` (after the last round and every ``eval_every`` rounds)
        or ``participants`` is None. ``personal_scope`` and ``personal_clients`` (how many clients with a
        non-empty test split were evaluated; accuracy and loss are absent when none was) say which.
        Per round it costs the participants, not the population; the scope depends only on the config,
        the round and its participants, so a resumed run evaluates as the uninterrupted one."""
        results = {}
        if self.strategy.global_model:
            results.update(global_scores(self.global_model(), self.config, self.test_data, self.label_names,
                                         round_index, self.tokenizer))
        if personal_evaluation(self.config, self.strategy):
            scope = "all" if participants is None else personal_scope(self.config, round_index)
            clients = self.clients if scope == "all" else participants
            per_client = [evaluate(self.client_model(c, round_index), self.client_data[c.cid][1])
                          for c in clients if len(self.client_data[c.cid][1])]
            results.update(personal_scope=scope, personal_clients=len(per_client))
            results.update(mean_scores("personal", per_client))
        return results

    def run(self, progress: bool = True, on_round: Callable[[dict], None] | None = None) -> SimulationResult:
        """The remaining rounds; ``on_round(metrics)`` is called after each (the CLI prints a line).
        With an ``out_dir`` every round is appended to metrics.jsonl and checkpointed."""
        out_dir = Path(self.config.out_dir) if self.config.out_dir else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(out_dir, self.config, self.label_names, self.data, bench=self.bench)
            if self._checkpoints is not None:  # resumed: an extended total or moved inputs hold from now on
                update_config(out_dir, self.config.to_dict())
            # a resumed run rewrites the rounds it has (a killed run may have logged one more)
            write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history).encode())
            keep_generations(out_dir, self.rounds_done)
            metrics_file = open(out_dir / "metrics.jsonl", "a")
        try:
            for round_index in range(self.rounds_done, self.config.rounds):
                bar = _progress_bar(progress, round_index, self.config.rounds, len(self.participants(round_index)))
                try:
                    metrics = self.step(round_index, bar)
                finally:  # also on Ctrl-C or an error, so the bar ends before the message does
                    if bar is not None:
                        bar.close()
                if on_round is not None:
                    on_round(metrics)
                if out_dir is not None:
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                    append_generations(out_dir, round_index + 1, self.generations)
                    self.save_checkpoint(round_index + 1, out_dir)
                self.rounds_done = round_index + 1
        finally:
            if out_dir is not None:
                metrics_file.close()
        privacy = self.privacy_report()
        if out_dir is not None:
            self.save_adapter(out_dir / "adapter.safetensors")
            if privacy:
                (out_dir / "privacy.json").write_text(json.dumps(privacy, indent=2))
        check_trained(self.history)
        return SimulationResult(self.history, self.state, self.clients, self.ledger, out_dir, self.strategy, privacy)

    def save_checkpoint(self, rounds_done: int, run_dir: str | Path) -> Path:
        """Checkpoints the run after ``rounds_done`` rounds into ``run_dir`` (the global state and the clients
        that changed since the last checkpoint there); returns the index file."""
        if self._checkpoints is None or self._checkpoints.run_dir != Path(run_dir):
            self._checkpoints = CheckpointWriter(run_dir)
        index = self._checkpoints.save(self.run_state(rounds_done), changed=self._touched)
        self._touched = set()
        return index

    def run_state(self, rounds_done: int) -> RunState:
        """The run as a checkpoint holds it (the live objects, not copies)."""
        server = self.server.privacy
        return RunState(rounds_done, self.config.to_dict(), self.state, self.clients,
                        None if server is None else {"history": server.account.history, "offset": server.noise.offset,
                                                     "seed": server.noise.seed},
                        self.ledger.rounds, self.history, torch.get_rng_state())

    @classmethod
    def resume(cls, run_dir: str | Path, *, rounds: int | None = None, dp_epsilon: float | None = None,
               dataset: str | None = None, model: str | None = None) -> Simulation:
        """A run rebuilt from its folder's last checkpoint; ``run()`` continues with the next round.
        Everything is rebuilt from the configuration and seeds as at the start, then the checkpointed
        state replaces what the rounds changed, so the rest of the run is the uninterrupted run's.

        ``rounds``: the new total of rounds, more than done (completed runs too), with ``dp_epsilon`` a
        raised DP-SGD budget (:mod:`fedlora_ext.federated.extension`; ``extended_from`` is then the total
        the run had). ``dataset`` / ``model``: the new place of an input that moved, accepted when its
        fingerprint is the recorded one (:mod:`fedlora_ext.federated.run_inputs`)."""
        run_dir = Path(run_dir)
        try:
            index = read_index(run_dir)
        except ValueError as error:
            raise ValueError(f"resume: {error}") from None
        if index.get("nodes") is not None:  # the server's state only: the clients' is on the nodes
            raise ValueError(f"resume: {run_dir} holds a Flower run; continue it with `flwr run` and the run config "
                             "resume=true (README, \"Running on Flower\")")
        moved = {"dataset": dataset, "model": model}
        planned = FedConfig.from_dict({**index["config"], "out_dir": str(run_dir)})
        config = extended_config(relocated(planned, run_dir, moved), int(index["rounds_done"]), rounds, dp_epsilon)
        torch.manual_seed(config.seed)
        sim = cls(config)
        check_same_inputs(config, sim.data, run_dir, moved)
        try:
            run = read_run(run_dir, device=sim.bench.device, keys=True)
        except ValueError as error:
            raise ValueError(f"resume: {error}") from None
        sim._restore(run)
        if rounds is not None:
            check_budget(sim, sim.rounds_done)
            sim.extended_from = planned.rounds if rounds != planned.rounds else None
        sim._checkpoints = CheckpointWriter(run_dir, resumed=run)
        return sim

    def _restore(self, run: RunState) -> None:
        """Puts a checkpointed run into this freshly built one (same config and partition)."""
        if [c.cid for c in run.clients] != [c.cid for c in self.clients]:
            raise ValueError("resume: the checkpoint's clients do not match the run's partition")
        for client, fresh in zip(run.clients, self.clients):
            if client.privacy is not None and fresh.privacy is not None:
                # the config's budget: raised by an extension, or missing in a checkpoint from before the guard
                client.privacy.account.target_epsilon = fresh.privacy.account.target_epsilon
                check_same_noise(client, fresh)
        self.clients = run.clients
        self.state = GlobalState(tensors=run.state.tensors, base={n: t.clone() for n, t in run.state.base.items()},
                                 info=run.state.info)
        if run.server_privacy is not None:
            privacy = self.server.privacy
            privacy.account.history = run.server_privacy["history"]
            privacy.noise.seed, privacy.noise.offset = run.server_privacy["seed"], run.server_privacy["offset"]
        self.server.ledger = CommLedger(rounds=run.ledger)
        self.history = run.history
        if self.server.privacy_ledger is not None:
            self.server.privacy_ledger.replay(self.history, self.clients)
        torch.set_rng_state(run.rng)
        self.rounds_done = run.rounds_done

    def save_adapter(self, path: Path) -> None:
        save_adapter(path, self.strategy, self.state, self.bench.pristine_base())


def check_trained(history: list[dict]) -> None:
    """Raises RunError when no round produced a model: every round was skipped (every update rejected,
    failed or lost), so the run's model is the untrained one it started from."""
    if not history or not all("skipped" in m for m in history):
        return
    failed = next((reason for m in history for reason in m.get("failed", {}).values()), None)
    raise RunError(f"no round produced a model: all {len(history)} rounds were skipped, the model is the untrained "
                   f"one ({history[-1]['skipped']}" + (f"; e.g. {failed}" if failed else "") + ")")


def check_not_deterministic(round_index: int, sampled: list[ClientState], errors: list[Exception]) -> None:
    """Stops the run when every sampled client raised the same exception (type and message): a
    setting or the data is wrong, and retrying or skipping rounds would only hide it. Injected faults
    and failures that differ are left to the round."""
    real = [(type(e).__name__, str(e)) for e in errors if not isinstance(e, InjectedFault)]
    raised = set(real)
    if sampled and len(real) == len(sampled) and len(raised) == 1:
        kind, message = raised.pop()
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        raise RunError(f"round {round_index + 1}: every sampled client ({len(sampled)}) failed with {kind}: "
                       f"{first_line} (the same error on every client is not a transient failure)")


FAULTS = ("exception", "timeout", "dropout")


def injected_faults(config: FedConfig, round_index: int, attempt: int, cids: list[int]) -> dict[int, str]:
    """The sampled clients that fail this round and how (seeded: a resumed run injects the same)."""
    if config.client_failure_rate == 0 or not cids:
        return {}
    rng = np.random.default_rng(derive_seed(config.seed, "faults", round_index, attempt))
    failing = rng.random(len(cids)) < config.client_failure_rate
    modes = rng.choice(FAULTS, size=len(cids)) if config.client_failure_mode == "mixed" else [config.client_failure_mode] * len(cids)
    return {cid: str(mode) for cid, fail, mode in zip(cids, failing, modes) if fail}


class InjectedFault(RuntimeError):
    """The failure ``client_failure_rate`` injects: the client crashes after training, before replying."""


def _raise_injected() -> None:
    raise InjectedFault("injected crash after local training")


def initial_model(bench: ModelBench, strategy: Strategy):
    """The model every party starts from: adapters at the global rank from the run's shared seed, the
    same on the server, in the simulator and on every Flower node."""
    return bench.checkout(strategy.global_rank(), GlobalState(tensors={}), derive_seed(strategy.config.seed, "init"))


def global_model(bench: ModelBench, strategy: Strategy, state: GlobalState):
    """The server's model: global tensors (and merged base) at the global rank."""
    model = bench.checkout(strategy.global_rank(), state, derive_seed(strategy.config.seed, "eval"))
    adapters.write_tensors(model, strategy.global_tensors(state))
    return model


def client_model(bench: ModelBench, strategy: Strategy, state: GlobalState, client: ClientState, payload,
                 round_index: int):
    """A client's own model after ``round_index``: its kept tensors plus ``payload`` (what it downloads),
    on ``state``'s base, as it would start its next round."""
    model = bench.checkout(client.rank, state, derive_seed(strategy.config.seed, "eval", client.cid))
    strategy.prepare(model, client, payload, round_index + 1)
    return model


def check_private_model(config: FedConfig, strategy: Strategy, model) -> None:
    """Fails before training if DP-SGD has nothing it can train, or a parameter it cannot clip."""
    trainable = strategy.trainable(0)
    adapters.set_trainable(model, **trainable)
    params = adapters.trainable_parameters(model)
    if not params:
        raise ValueError(f"DP-SGD: method {config.method!r} leaves no trainable adapter parameter "
                         f"({trainable}); nothing to train privately")
    PerSampleGradients(model, params.values())  # raises for parameters it cannot differentiate per sample


def round_metrics(round_index: int, replies: list, ledger: CommLedger) -> dict:
    """The round's line of ``metrics.jsonl`` before evaluation: who replied, the bytes and, where the
    clients sent it (runs without DP-SGD; a private client keeps its loss), their mean training loss."""
    metrics = {"round": round_index + 1, "clients": [r.cid for r in replies]}
    if any("loss" in r.metrics for r in replies) or not replies:
        losses = [r.metrics["loss"] for r in replies if "loss" in r.metrics and np.isfinite(r.metrics["loss"])]
        metrics["train_loss"] = float(np.mean(losses)) if losses else None
    return {**metrics, "bytes_up": ledger.round_total("up"), "bytes_down": ledger.round_total("down")}


def privacy_metrics(config: FedConfig, epsilons: dict[str, float], clients: list[ClientState], server_privacy) -> dict:
    """Epsilon spent so far by each client of the round, the maximum over all clients, the server's."""
    out = {}
    if config.sample_dp:
        out["epsilon"] = epsilons
        out["epsilon_max"] = max(c.info.get("epsilon", 0.0) for c in clients)
    if server_privacy is not None:
        out["server_epsilon"] = server_privacy.account.epsilon()
    return out


def data_description(task, train_data, test_data, model: str | None = None) -> dict:
    """What a run trains and evaluates on: sizes, the test split, notes (rows dropped ...) and the
    content's fingerprint, with ``model`` a local model folder's too (``model_fingerprint``); written to
    data.json, printed in the run's header."""
    described = {"train": len(train_data), "test": len(test_data),
                 "eval_split": task.eval_split if task is not None else "given by the caller",
                 "notes": list(task.notes) if task is not None else [],
                 "fingerprint": task.fingerprint if task is not None else ""}
    fingerprint = model_fingerprint(model) if model is not None and task is not None else ""
    return {**described, "model_fingerprint": fingerprint} if fingerprint else described


def check_same_noise(restored: ClientState, fresh: ClientState) -> None:
    """A resumed client's sigma is the one its configuration calibrates (an extended run pins the
    calibration): the noise of a run's rounds is never recalibrated."""
    had, now = restored.privacy.account.noise_multiplier, fresh.privacy.account.noise_multiplier
    if had != now:
        raise ValueError(f"resume: client {restored.cid}'s noise multiplier in the checkpoint ({had:.6g}) differs from "
                         f"the one its configuration calibrates ({now:.6g}); the run's noise cannot change mid-run")


def write_run_config(out_dir: Path, config: FedConfig, label_names: list[str], data: dict | None = None,
                     bench: ModelBench | None = None) -> None:
    """config.json, data.json (:func:`data_description`) and, for classification, labels.json: what
    each class id means (``id2label`` / ``label2id`` as transformers' configs spell them), for
    everything that reads the run later; with the run's ``bench`` and a built-in tiny model also
    ``base_model/`` (:func:`save_base_model`), the base ``fedlora export`` starts from."""
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if data is not None:
        (out_dir / "data.json").write_text(json.dumps(data, indent=2))
    if label_names:
        (out_dir / "labels.json").write_text(json.dumps(label_maps(label_names), indent=2))
    if bench is not None:
        save_base_model(out_dir, config, bench, label_names)


def label_maps(label_names: list[str]) -> dict:
    """``id2label`` (string ids, as transformers' configs write them) and ``label2id``."""
    return {"id2label": {str(i): name for i, name in enumerate(label_names)},
            "label2id": {name: i for i, name in enumerate(label_names)}}


#: the folder of a run that holds its tiny base model (config and weights, safetensors)
BASE_MODEL = "base_model"


def save_base_model(out_dir: Path, config: FedConfig, bench: ModelBench, label_names: list[str]) -> Path | None:
    """For the built-in tiny models (built in code from a seed, with a vocabulary and pad token that
    depend on the data): their config and pristine base weights (before any merge) as
    ``out_dir/base_model/`` (``save_pretrained``, safetensors; ``id2label`` / ``label2id`` in its
    config for classification), written once through a temporary folder and a rename: a resumed run
    keeps the base it started with. Other models are folders already: None."""
    from fedlora_ext.data.tiny_models import TINY

    if config.model not in TINY:
        return None
    folder = Path(out_dir) / BASE_MODEL
    if (folder / "config.json").is_file():
        return folder
    model = bench.base_model
    state = dict(model.state_dict())
    for module, weight in bench.pristine_base().items():  # the adapted weights as loaded, never a merged base
        state[f"{module}.weight"] = weight
    temporary = folder.with_name(f".{BASE_MODEL}.tmp")
    if temporary.exists():
        import shutil

        shutil.rmtree(temporary)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in a run's output
    try:
        model.save_pretrained(str(temporary), state_dict=state)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if config.task == "classification" and label_names:
        saved = json.loads((temporary / "config.json").read_text())
        saved.update(label_maps(label_names))
        (temporary / "config.json").write_text(json.dumps(saved, indent=2))
    temporary.replace(folder)
    return folder


def global_scores(model, config: FedConfig, test_data, label_names: list[str], round_index: int,
                  tokenizer=None) -> dict:
    """The global model's test scores (``test_loss``, ``test_accuracy``; a language model's
    ``test_perplexity`` and, for short SFT answers, ``test_exact_match``) on the same examples every
    round: a fixed seeded subset of ``eval_examples`` test examples (``test_examples`` says how many),
    so that rounds compare like with like. After the last round the whole split is scored too, as
    ``final_test_*`` (when the subset is smaller), with the accuracy per class by label name. SFT with a
    ``tokenizer``: ``generations``, a few decoded prompts, references and greedy outputs (the caller
    writes them to generations.jsonl, not to metrics.jsonl)."""
    last = round_index == config.rounds - 1
    subset = eval_subset(test_data, config.eval_examples, derive_seed(config.seed, "eval_subset"))
    samples = GENERATION_SAMPLES if tokenizer is not None and "prompt_len" in test_data.column_names else 0
    scores = _evaluate(model, subset, config.batch_size * 4, samples)
    out = {f"test_{k}": scores[k] for k in SCORES if k in scores}
    out["test_examples"] = len(subset)
    generations = scores.get("generations", [])
    if last and len(subset) < len(test_data):
        scores = _evaluate(model, test_data, config.batch_size * 4, 0)
        out.update({f"final_test_{k}": scores[k] for k in SCORES if k in scores})
        out["final_test_examples"] = len(test_data)
    if label_names and "class_accuracy" in scores and last:
        out["test_accuracy_per_class"] = dict(zip(label_names, scores["class_accuracy"]))
    if generations:
        out["generations"] = [{key: tokenizer.decode(ids, skip_special_tokens=False) for key, ids in row.items()}
                              for row in generations]
    return out


#: prompts whose greedy answers an SFT evaluation records in generations.jsonl (the first of the test subset)
GENERATION_SAMPLES = 4


def _evaluate(model, data, batch_size: int, samples: int) -> dict:
    return evaluate_sft(model, data, batch_size, samples) if samples else evaluate(model, data, batch_size)


def append_generations(out_dir: Path | None, round_number: int, generations: list[dict] | None) -> None:
    """One line per sample generation in ``out_dir/generations.jsonl``: the round, prompt, reference, output."""
    if out_dir is None or not generations:
        return
    with open(out_dir / GENERATIONS, "a") as handle:
        for row in generations:
            handle.write(json.dumps({"round": round_number, **row}) + "\n")


def keep_generations(out_dir: Path, rounds: int) -> None:
    """generations.jsonl without the lines of rounds after ``rounds`` (a resumed run rewrites them)."""
    path = out_dir / GENERATIONS
    if path.exists():
        lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["round"] <= rounds]
        write_atomic(path, "".join(lines).encode())


GENERATIONS = "generations.jsonl"


#: what an evaluation reports, by task: classification and causal LM loss and accuracy; SFT loss and
#: perplexity over response tokens and, for short references, exact match
SCORES = ("loss", "accuracy", "perplexity", "exact_match")


def mean_scores(prefix: str, per_client: list[dict]) -> dict[str, float]:
    """``<prefix>_<score>``: each score's mean over the clients' own evaluations (none: nothing)."""
    keys = [k for k in SCORES if per_client and all(k in s for s in per_client)]
    return {f"{prefix}_{k}": float(np.mean([s[k] for s in per_client])) for k in keys}


def personal_evaluation(config: FedConfig, strategy: Strategy) -> bool:
    """Whether clients' own models are evaluated on their own test splits (personalised methods, or
    ``personal_eval``); only then does a client hold back ``test_fraction`` of its examples."""
    return strategy.personalised or config.personal_eval


def personal_scope(config: FedConfig, round_index: int) -> str:
    """Whose own models a round evaluates (under :func:`personal_evaluation`): ``"all"`` clients after
    the last round and after every ``eval_every``-th round, else the round's ``"participants"``."""
    last = round_index == config.rounds - 1
    every = config.eval_every is not None and (round_index + 1) % config.eval_every == 0
    return "all" if last or every else "participants"


def partition_clients(config: FedConfig, strategy: Strategy, train_data) -> list[tuple[ClientState, object, object]]:
    """Every client's state (no privacy yet), training split and own test split (empty unless
    :func:`personal_evaluation`), seeded: the same on the simulator and on every Flower node, which
    keeps only its own."""
    n = len(train_data)
    if getattr(strategy, "pool_clients", False):  # centralized: one client with all the data
        shards = [np.arange(n)]
    elif config.dirichlet_alpha is None or not label_skew_possible(config, train_data):
        shards = iid_partition(n, config.num_clients, config.seed)
    else:
        labels = train_data["label"]
        shards = dirichlet_partition(labels.tolist() if hasattr(labels, "tolist") else labels,
                                     config.num_clients, config.dirichlet_alpha, config.seed,
                                     min_size=config.min_client_examples)
    ranks = config.ranks() if len(shards) == config.num_clients else (max(config.ranks()),)
    fraction = config.test_fraction if personal_evaluation(config, strategy) else 0.0
    out = []
    for cid, shard in enumerate(shards):
        train_idx, test_idx = split_train_test(shard, fraction, derive_seed(config.seed, "split", cid))
        client = ClientState(cid=cid, rank=strategy.client_rank(ranks[cid]), num_examples=len(train_idx))
        out.append((client, train_data.select(train_idx.tolist()), train_data.select(test_idx.tolist())))
    return out


def label_skew_possible(config: FedConfig, train_data) -> bool:
    """Whether a Dirichlet partition has classes to skew: always for classification; for SFT only with
    at least two categories (a category column, or the packaged corpora's topics), and for a causal LM
    only on synthetic data (its sequences have kinds); plain documents are partitioned IID."""
    if config.task == "classification":
        return True
    return len({int(label) for label in train_data["label"]}) > 1


def save_adapter(path: Path, strategy: Strategy, state: GlobalState, pristine: dict[str, torch.Tensor]) -> None:
    """The global adapter (and the merged base deltas, for FLoRA / FedEx-LoRA) as safetensors, written
    to a temporary file and renamed, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    tensors = {n: t.detach().cpu().contiguous() for n, t in strategy.global_tensors(state).items()}
    for module, weight in state.base.items():
        tensors[f"base_delta.{module}"] = (weight - pristine[module].to(weight)).cpu().contiguous()
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"method": strategy.config.method, "rounds": str(strategy.config.rounds)})
    temporary.replace(path)


def _progress_bar(enabled: bool, round_index: int, rounds: int, clients: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=clients, desc=f"round {round_index + 1}/{rounds}", unit="client", leave=True)


def simulate(config: FedConfig, *, progress: bool = True, **overrides) -> SimulationResult:
    """Runs a federated job in-process (see :class:`Simulation`)."""
    torch.manual_seed(config.seed)
    return Simulation(config, **overrides).run(progress=progress)
