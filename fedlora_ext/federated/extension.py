"""Extending a run: ``fedlora run --resume DIR --rounds N`` continues a run, completed or not, to N rounds
in all (the new total, more than it has done).

What the rounds already run meant does not change, so the configuration pins it when the total changes:
a cosine learning rate keeps the span it was planned over (``lr_schedule_rounds``; the new rounds go on at
its last round's lr), and DP noise keeps the sigma calibrated at the start (``dp_calibration_rounds``, and
``dp_calibration_epsilon`` when the budget is raised). A run extended this way is exactly the run its new
config.json describes; without those pins (a constant lr, no target epsilon) it is exactly a run planned
for N rounds from the start.

Under DP-SGD the new rounds must fit every client's budget, ``dp_epsilon``: :func:`check_budget` refuses,
before anything trains, an extension after which any client could pass it (if sampled in every new round),
naming the client and the epsilon it would reach. ``--epsilon`` with ``--rounds`` raises the budget; the
noise stays as calibrated and the accounting goes on from each client's recorded steps.
"""

from __future__ import annotations

import math

from fedlora_ext.core.config import FedConfig
from fedlora_ext.federated.privacy import calibration_rounds


def extended_config(config: FedConfig, rounds_done: int, rounds: int | None = None,
                    dp_epsilon: float | None = None) -> FedConfig:
    """``config`` (a resumed run's, after ``rounds_done`` rounds) continued to ``rounds`` in all, with a
    DP-SGD budget raised to ``dp_epsilon``; the pins of the module docstring added. None, None: unchanged.

    Raises:
        ValueError: one line naming the flag: a total not above the rounds done, a budget where the run
            has none, or lowered, or more rounds than DP-FedAvg's budget was calibrated for.
    """
    if rounds is None and dp_epsilon is None:
        return config
    if rounds is None:
        raise ValueError(f"--epsilon {dp_epsilon:g} with --resume raises the budget of an extended run: give the "
                         "new total of rounds with --rounds N too")
    if rounds <= rounds_done:
        raise ValueError(f"--rounds {rounds} with --resume is the run's new total of rounds: the run has done "
                         f"{rounds_done} already, give more than {rounds_done}")
    changes: dict = {"rounds": rounds}
    if dp_epsilon is not None:
        changes.update(_raised_budget(config, dp_epsilon))
    if config.server_dp_epsilon is not None and rounds > calibration_rounds(config):
        raise ValueError(f"--rounds {rounds}: DP-FedAvg at the server (server_dp_epsilon = "
                         f"{config.server_dp_epsilon:g}) is calibrated for {calibration_rounds(config)} rounds and its "
                         "budget admits no more; a run with server-level DP cannot be extended past them")
    if rounds != config.rounds:
        if config.lr_schedule != "constant" and config.lr_schedule_rounds is None:
            changes["lr_schedule_rounds"] = config.rounds
        if (config.dp_epsilon is not None or config.server_dp_epsilon is not None) \
                and config.dp_calibration_rounds is None:
            changes["dp_calibration_rounds"] = config.rounds
    return config.replace(**changes)


def _raised_budget(config: FedConfig, dp_epsilon: float) -> dict:
    """The changes that raise the DP-SGD budget to ``dp_epsilon`` and keep sigma where it was calibrated."""
    if config.dp_epsilon is None:
        why = "trains without DP-SGD" if not config.sample_dp else \
            f"has no budget (its sigma is given: dp_noise_multiplier = {config.dp_noise_multiplier:g})"
        raise ValueError(f"--epsilon {dp_epsilon:g} with --resume raises a run's DP-SGD budget, but the run {why}; "
                         "drop --epsilon")
    if dp_epsilon < config.dp_epsilon:
        raise ValueError(f"--epsilon {dp_epsilon:g} is below the run's budget dp_epsilon = {config.dp_epsilon:g}: "
                         "an extension can raise the budget, not lower it")
    if dp_epsilon == config.dp_epsilon:
        return {}
    calibrated = config.dp_epsilon if config.dp_calibration_epsilon is None else config.dp_calibration_epsilon
    return {"dp_epsilon": dp_epsilon, "dp_calibration_epsilon": calibrated,
            "dp_calibration_rounds": calibration_rounds(config)}


def check_budget(simulation, rounds_done: int) -> None:
    """Refuses (one line) an extension after which a client could pass its DP-SGD budget: by the server's
    own ledger, each client sampled in every round from ``rounds_done`` to the new total."""
    ledger = simulation.server.privacy_ledger
    config = simulation.config
    if ledger is None or config.dp_epsilon is None:
        return
    remaining = config.rounds - rounds_done
    over = []
    for client in simulation.clients:
        account = ledger.accounts[client.cid]
        steps = remaining * ledger.steps_per_round(client)
        if not account.can_take(steps):
            over.append((account.epsilon_after(steps), client.cid, steps, account))
    if not over:
        return
    epsilon, cid, steps, account = max(over, key=lambda item: item[0])
    others = f" (and {len(over) - 1} more client{'s' * (len(over) > 2)})" if len(over) > 1 else ""
    raise ValueError(f"--rounds {config.rounds}: client {cid}'s epsilon would reach {epsilon:.4g} > its budget "
                     f"dp_epsilon = {account.target_epsilon:g}{others} after {remaining} more round"
                     f"{'s' * (remaining > 1)} ({steps} more step{'s' * (steps > 1)} at sigma "
                     f"{account.noise_multiplier:.4g}, the noise calibrated at the start); raise the budget with "
                     f"--epsilon {_up(epsilon)} or extend by fewer rounds")


def _up(epsilon: float) -> str:
    """``epsilon`` rounded up to two decimals (a budget that admits it)."""
    return f"{math.ceil(epsilon * 100) / 100:g}" if math.isfinite(epsilon) else "inf"
