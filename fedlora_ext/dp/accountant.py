"""Privacy accounting over every step a party takes, with opacus's RDP and PRV accountants.

RDP is computed by :mod:`fedlora_ext.dp.rdp` (opacus's numbers, vectorised and cached), PRV by opacus.
A :class:`PrivacyAccount` belongs to one party for the whole run (a client for sample-level DP-SGD,
the server for client-level DP-FedAvg). It is never reset: every noisy step of every round is
appended to its history, so epsilon only grows. ``calibrate`` turns a target epsilon into the noise
multiplier that meets it after the most steps the party can take, before any training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from fedlora_ext.dp.rdp import rdp_epsilon, rdp_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


def default_delta(population: int) -> float:
    """``1 / n^1.1``: below ``1 / n``, the rate at which releasing one record in full would be allowed."""
    return 1.0 / population**1.1


def check_privacy_arguments(*, who: str, epsilon: float | None = None, delta: float | None = None,
                            noise_multiplier: float | None = None, max_norm: float | None = None,
                            accountant: str | None = None) -> None:
    """Raises ``ValueError`` naming ``who`` and the argument for any value outside its domain."""
    if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"{who}: target epsilon must be a finite number > 0, got {epsilon!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"{who}: delta must be in (0, 1), got {delta!r}")
    if noise_multiplier is not None and not (isinstance(noise_multiplier, (int, float))
                                             and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"{who}: noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"{who}: clipping norm must be a finite number > 0, got {max_norm!r}")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ValueError(f"{who}: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (opacus's search, to 0.01 in epsilon) whose epsilon after ``steps``
    steps at ``sample_rate`` is at most ``target_epsilon``."""
    if accountant == "rdp":
        return rdp_noise_multiplier(target_epsilon, delta, sample_rate, steps)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
        except ValueError as error:
            raise ValueError(f"cannot reach epsilon {target_epsilon} at delta {delta:g} in {steps} steps at "
                             f"q = {sample_rate:g} with the {accountant} accountant: {error}") from None


@dataclass
class PrivacyAccount:
    """One party's privacy spend: the mechanism's parameters and every step taken so far.

    Attributes:
        accountant: ``"rdp"`` or ``"prv"`` (opacus).
        delta: the delta epsilon is reported at.
        noise_multiplier: sigma of every step.
        sample_rate: q, the probability that a record (a sample, or a client) is in a step's batch.
        history: opacus's format, ``[(sigma, q, steps), ...]``, appended to and never reset.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def calibrate(cls, *, who: str, population: int, sample_rate: float, max_steps: int, accountant: str = "rdp",
                  target_epsilon: float | None = None, delta: float | None = None,
                  noise_multiplier: float | None = None) -> PrivacyAccount:
        """The account of a party whose records number ``population``; sigma from ``target_epsilon``
        over ``max_steps`` steps, or the given ``noise_multiplier``. ``delta`` defaults to
        :func:`default_delta` and must stay below ``1 / population``."""
        check_privacy_arguments(who=who, epsilon=target_epsilon, delta=delta, noise_multiplier=noise_multiplier,
                                accountant=accountant)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(f"{who}: give exactly one of target epsilon ({target_epsilon}) and noise multiplier "
                             f"({noise_multiplier})")
        if population < 1:
            raise ValueError(f"{who}: the party has no records to protect (population {population})")
        delta = default_delta(population) if delta is None else delta
        if delta >= 1.0 / population:
            raise ValueError(f"{who}: delta = {delta:g} must be < 1 / n = {1.0 / population:g} (n = {population}); "
                             "a larger delta allows releasing a record outright")
        if target_epsilon is not None:
            noise_multiplier = noise_for_epsilon(target_epsilon, delta, sample_rate, max_steps, accountant)
        return cls(accountant=accountant, delta=delta, noise_multiplier=float(noise_multiplier),
                   sample_rate=float(sample_rate))

    def step(self, count: int = 1) -> None:
        """Records ``count`` noisy steps with this account's sigma and q."""
        if self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            sigma, q, steps = self.history[-1]
            self.history[-1] = (sigma, q, steps + count)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, count))

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step, inf when sigma is 0)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        with warnings.catch_warnings():  # opacus's numeric hints (largest alpha; log(0) at q = 1 in PRV)
            warnings.simplefilter("ignore")
            if self.accountant == "rdp":
                return rdp_epsilon(self.history, self.delta)
            from opacus.accountants import PRVAccountant

            accountant = PRVAccountant()
            accountant.history = list(self.history)
            return float(accountant.get_epsilon(delta=self.delta))

    def report(self) -> dict[str, float | int | str]:
        """epsilon, delta, sigma, q, steps and the accountant: one line of a privacy report."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "sigma": self.noise_multiplier,
                "q": self.sample_rate, "steps": self.steps, "accountant": self.accountant}
