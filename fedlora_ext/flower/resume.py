"""A Flower run continued after its SuperLink / ServerApp stopped: ``resume = true`` with the same out-dir.

After every round the ServerApp checkpoints into its out-dir in ``fedlora run``'s format
(:mod:`fedlora_ext.federated.checkpoint`): the global state, the server's view of each client (rank,
example count, info; the node keeps the rest), DP-FedAvg's account and noise offset, the byte ledger,
the history (whose ``trainings`` rebuild the server's privacy ledger) and torch's generator, and what
only a Flower server holds (``nodes``): the run key under which the nodes keep their state files and
each node's own privacy report. Which node holds which client is learnt again from the nodes' replies.

A resumed run is a new Flower run (a new run id): its messages carry the first run's key, so a node with
a ``state-dir`` continues its client (account, noise offset, kept tensors); one without follows the
server's count of the steps it asked, so no budget is reset and no noise offset is used twice. A run
stopped between rounds continues exactly as the uninterrupted one; a round the server did not finish is
trained again, and a node that trained in it has spent those steps already (its account counts them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import GlobalState
from fedlora_ext.federated.checkpoint import RunState, read_index, read_run
from fedlora_ext.federated.comm import CommLedger
from fedlora_ext.federated.run_inputs import check_same_inputs
from fedlora_ext.federated.simulation import keep_generations


def check_resumable(out: Path, config: FedConfig, *, ranks: bool = False) -> int:
    """The rounds done of the Flower run in ``out``, which ``config`` (the run config given with
    ``resume = true``) continues. ``ranks``: compare ``client_ranks`` too (known once the nodes said theirs).

    Raises:
        ValueError: one line: no checkpoint, a ``fedlora run`` run, a completed run, or a configuration
            that differs from the run's (naming the key).
    """
    try:
        index = read_index(out)
    except ValueError:
        raise ValueError(f"resume = true: {out} holds no checkpoint.json (no round of a run finished there); "
                         "start the run without resume") from None
    if index.get("nodes") is None:
        raise ValueError(f"resume = true: {out} holds a `fedlora run` run, not a Flower one; continue it with "
                         f"`fedlora run --resume {out}`")
    stored, given = index["config"], json.loads(json.dumps(config.to_dict()))  # as JSON holds it: lists
    done = int(index["rounds_done"])
    if done >= int(stored["rounds"]):
        raise ValueError(f"resume = true: the run in {out} completed all {stored['rounds']} rounds; nothing to "
                         "continue (a new run needs another out-dir, or overwrite = true)")
    skip = {"out_dir"} | (set() if ranks else {"client_ranks"})
    for key in sorted(set(stored) | set(given)):
        if key not in skip and stored.get(key) != given.get(key):
            raise ValueError(f"resume = true: {key.replace('_', '-')} = {given.get(key)!r} differs from the run's "
                             f"{stored.get(key)!r} (in {out}/checkpoint.json); a resumed run continues with its own "
                             "configuration: give the same run config")
    return done


def run_state(strategy, rounds_done: int) -> RunState:
    """The Flower server's run after ``rounds_done`` rounds, as a checkpoint holds it (live objects)."""
    server = strategy.server
    privacy = server.privacy
    return RunState(rounds_done, strategy.config.to_dict(), server.state, strategy.clients,
                    None if privacy is None else {"history": privacy.account.history, "offset": privacy.noise.offset,
                                                  "seed": privacy.noise.seed},
                    server.ledger.rounds, strategy.history, torch.get_rng_state(),
                    nodes={"run_key": strategy.run_key, "reports": strategy.client_reports})


def continue_run(strategy, data: dict) -> RunState:
    """Puts the checkpoint of the strategy's out-dir into the freshly set-up ``strategy`` (the nodes known,
    the server built from the same configuration and seeds); returns it. ``data``: the rebuilt run's
    description, whose fingerprints must be the ones the run started with.

    Raises:
        ValueError: one line: a configuration that differs (the nodes' ranks included), changed inputs,
            nodes whose clients do not match the checkpoint's, a damaged checkpoint.
    """
    out, config, server = strategy.out_dir, strategy.config, strategy.server
    check_resumable(out, config, ranks=True)
    check_same_inputs(config, data, out, {})
    try:
        run = read_run(out, device=server.device, keys=True)
    except ValueError as error:
        raise ValueError(f"resume = true: {error}") from None
    stored = {c.cid: c.num_examples for c in run.clients}
    nodes = {c.cid: c.num_examples for c in strategy.clients}
    if stored != nodes:
        cid = next(c for c in sorted(set(stored) | set(nodes)) if stored.get(c) != nodes.get(c))
        raise ValueError(f"resume = true: the node of client {cid} holds {nodes.get(cid)} training examples, the "
                         f"run's client {cid} {stored.get(cid)} (in {out}/checkpoint.json); start the nodes of the run")
    strategy.clients = run.clients
    server.state = GlobalState(tensors=run.state.tensors, base={n: t.clone() for n, t in run.state.base.items()},
                               info=run.state.info)
    if run.server_privacy is not None:
        server.privacy.account.history = run.server_privacy["history"]
        server.privacy.noise.seed, server.privacy.noise.offset = run.server_privacy["seed"], run.server_privacy["offset"]
    server.ledger = CommLedger(rounds=run.ledger)
    strategy.history = run.history
    if server.privacy_ledger is not None:  # the steps asked of each client, from the rounds' trainings
        server.privacy_ledger.replay(strategy.history, strategy.clients)
    strategy.run_key, strategy.client_reports = int(run.nodes["run_key"]), dict(run.nodes["reports"])
    strategy.rounds_done = run.rounds_done
    keep_generations(out, run.rounds_done)
    torch.set_rng_state(run.rng)
    return run


def metrics_lines(history: list[dict]) -> bytes:
    """metrics.jsonl of the rounds in ``history`` (a resumed run rewrites it: a killed server may have
    logged a round it did not checkpoint)."""
    return "".join(json.dumps(m) + "\n" for m in history).encode()


class Continued(FlowerStrategy):
    """``strategy`` after ``rounds_done`` rounds, for Flower's ``start``, which counts its rounds from 1:
    round r of ``start`` is the run's round ``rounds_done + r``."""

    def __init__(self, strategy: FlowerStrategy, rounds_done: int) -> None:
        self.strategy, self.rounds_done = strategy, rounds_done

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round + self.rounds_done, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round + self.rounds_done, replies)

    def summary(self) -> None:
        self.strategy.summary()
