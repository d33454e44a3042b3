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

from fedlora_ext.dp.rdp import (
    MAX_SIGMA,
    BudgetTooLow,
    conversion_floor,
    delta_for_floor,
    rdp_epsilon,
    search_noise_multiplier,
)

ACCOUNTANTS = ("rdp", "prv")

#: calibration searches sigma until epsilon is this close below the target (opacus's tolerance), or a
#: tenth of the target for targets under 0.1, so a small target is met with a positive epsilon
CALIBRATION_TOLERANCE = 0.01

#: how the default delta is chosen, as reports name it
DEFAULT_DELTA_RULE = "default min(1e-5, 1/(10 n))"


def default_delta(population: int) -> float:
    """``min(1e-5, 1 / (10 n))``: the usual 1e-5, and for a party with more than 10^4 records a tenth
    of ``1 / n`` (the rate at which releasing one record in full would be allowed)."""
    return min(1e-5, 1.0 / (10 * population))


def calibration_tolerance(target_epsilon: float) -> float:
    return min(CALIBRATION_TOLERANCE, target_epsilon / 10)


def history_epsilon(history, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` after ``[(sigma, q, steps), ...]`` (entries with the same sigma and q are
    summed first, so a history in pieces gives the number of one in one piece); never negative."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    history = [(sigma, q, steps) for (sigma, q), steps in merged.items() if steps > 0]
    if not history:
        return 0.0
    if any(sigma == 0 and q > 0 for sigma, q, _ in history):
        return math.inf
    with warnings.catch_warnings():  # opacus's numeric hints (largest alpha; log(0) at q = 1 in PRV)
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return rdp_epsilon(history, delta)
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = history
        return max(0.0, float(prv.get_epsilon(delta=delta)))


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


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                      who: str = "", accountant_key: str | None = None, population: int | None = None) -> float:
    """The smallest noise multiplier (opacus's search, to 0.01 in epsilon, sigma up to 1e6) whose
    epsilon after ``steps`` steps at ``sample_rate`` is at most ``target_epsilon``; a one-line
    ``ValueError`` naming the target, q, steps and the sigma it would need when none is enough.

    A target at or below the RDP conversion's floor at ``delta`` (:func:`~fedlora_ext.dp.rdp.conversion_floor`,
    about 0.1029 at delta 1e-5) is unreachable whatever sigma or steps: the message names the floor and
    what reaches the target instead: the PRV accountant when it does (``accountant_key = "prv"``, the
    configuration key that picks the accountant), else a larger PRV target; and the delta above which RDP's floor is below the target, when
    that delta is still below ``1 / population``."""
    def epsilon_at(sigma: float) -> float:
        return history_epsilon([(sigma, sample_rate, steps)], delta, accountant)

    try:
        return search_noise_multiplier(epsilon_at, target_epsilon, calibration_tolerance(target_epsilon))
    except BudgetTooLow as error:
        unreachable = (f"{who + ': ' if who else ''}cannot reach target epsilon {target_epsilon:g} at delta {delta:g} "
                       f"with q = {sample_rate:g} over {steps} steps ({accountant} accountant)")
        floor = conversion_floor(delta) if accountant == "rdp" else 0.0
        if target_epsilon > floor:
            raise ValueError(f"{unreachable}: it would need sigma more than 1e6 (epsilon is still "
                             f"{error.epsilon_at_max:.4g} at sigma {error.sigma_max:g}); raise the target epsilon "
                             "or delta, or train fewer steps") from None
        raise ValueError(f"{unreachable} with any sigma, even sigma more than 1e6: the RDP accountant cannot go "
                         f"below epsilon {floor:.4g} at delta {delta:g} whatever sigma or steps; "
                         + _below_rdp_floor(target_epsilon, floor, sample_rate, steps, error.sigma_max, delta, who,
                                            accountant_key, population)) from None


def _below_rdp_floor(target_epsilon: float, floor: float, sample_rate: float, steps: int, sigma_max: float,
                     delta: float, who: str, accountant_key: str | None, population: int | None) -> str:
    """What reaches a target below RDP's floor: PRV (checked at the largest sigma its search tries), or
    a larger target with PRV; and a larger delta, where one below ``1 / population`` suffices."""
    key = accountant_key or "the accountant"
    needed = _round_up(delta_for_floor(target_epsilon))
    larger_delta = "" if population is not None and needed >= 1.0 / population else f"a delta above {needed:g}"
    prv = history_epsilon([(sigma_max, sample_rate, steps)], delta, "prv")
    if prv <= target_epsilon:  # the PRV search stops at this sigma or a smaller one
        return (f'set {key} = "prv" (the PRV accountant reaches epsilon {target_epsilon:g} here)'
                + (f" or use {larger_delta}" if larger_delta else ""))
    return (f"the PRV accountant does not reach it either (epsilon {prv:.4g} at sigma {sigma_max:g}): raise the "
            f'target epsilon above {prv:.4g} with {key} = "prv" (above {floor:.4g} with RDP)'
            + (f", or use {larger_delta}" if larger_delta else ""))


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (a delta above it is enough)."""
    exponent = math.floor(math.log10(value)) - 1
    return float(f"{math.ceil(value / 10**exponent) * 10**exponent:.2g}")


@dataclass
class PrivacyAccount:
    """One party's privacy spend: the mechanism's parameters and every step taken so far.

    Attributes:
        accountant: ``"rdp"`` or ``"prv"`` (opacus).
        delta: the delta epsilon is reported at.
        noise_multiplier: sigma of every step.
        sample_rate: q, the probability that a record (a sample, or a client) is in a step's batch.
        history: opacus's format, ``[(sigma, q, steps), ...]``, appended to and never reset.
        target_epsilon: the budget sigma was calibrated for (None with a given sigma: no budget, no
            guard); :meth:`can_take` refuses steps that would spend past it.
        population: n, the records the party protects (None where unknown).
        delta_rule: how delta was chosen (:data:`DEFAULT_DELTA_RULE` or ``"given"``).
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    target_epsilon: float | None = None
    population: int | None = None
    delta_rule: str = "given"

    @classmethod
    def calibrate(cls, *, who: str, population: int, sample_rate: float, max_steps: int, accountant: str = "rdp",
                  target_epsilon: float | None = None, delta: float | None = None,
                  noise_multiplier: float | None = None, accountant_key: str | None = None) -> PrivacyAccount:
        """The account of a party whose records number ``population``; sigma from ``target_epsilon``
        over ``max_steps`` steps, or the given ``noise_multiplier``. ``delta`` defaults to
        :func:`default_delta` and must stay below ``1 / population``. ``accountant_key``: the
        configuration key an error message tells to change (see :func:`noise_for_epsilon`)."""
        check_privacy_arguments(who=who, epsilon=target_epsilon, delta=delta, noise_multiplier=noise_multiplier,
                                accountant=accountant)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(f"{who}: give exactly one of target epsilon ({target_epsilon}) and noise multiplier "
                             f"({noise_multiplier})")
        if population < 1:
            raise ValueError(f"{who}: the party has no records to protect (population {population})")
        rule = DEFAULT_DELTA_RULE if delta is None else "given"
        delta = default_delta(population) if delta is None else delta
        if delta >= 1.0 / population:
            raise ValueError(f"{who}: delta = {delta:g} must be < 1 / n = {1.0 / population:g} (n = {population}); "
                             "a larger delta allows releasing a record outright")
        if target_epsilon is not None:
            noise_multiplier = noise_for_epsilon(target_epsilon, delta, sample_rate, max_steps, accountant, who,
                                                 accountant_key, population)
        account = cls(accountant=accountant, delta=delta, noise_multiplier=float(noise_multiplier),
                      sample_rate=float(sample_rate), target_epsilon=target_epsilon, population=int(population),
                      delta_rule=rule)
        if target_epsilon is not None and not account.can_take(max_steps):  # the search guarantees it
            raise ValueError(f"{who}: calibration gave sigma {account.noise_multiplier:g}, whose epsilon after "
                             f"{max_steps} steps is {account.epsilon_after(max_steps):.6g} > target {target_epsilon:g}")
        return account

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
        """Epsilon spent so far at ``delta`` (0 before the first step, inf when sigma is 0; never
        negative)."""
        return history_epsilon(self.history, self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon after ``steps`` more steps with this account's sigma and q (nothing is recorded)."""
        return history_epsilon([*self.history, (self.noise_multiplier, self.sample_rate, int(steps))], self.delta,
                               self.accountant)

    def can_take(self, steps: int) -> bool:
        """Whether ``steps`` more steps keep epsilon <= the target (always, without a target). The
        comparison is exact: calibration returns a sigma whose epsilon after the most steps is <= the
        target, computed the same way, so a party that takes exactly those steps is never refused."""
        return self.target_epsilon is None or self.epsilon_after(steps) <= self.target_epsilon

    def refusal(self, steps: int, who: str) -> str | None:
        """Why ``who`` may not take ``steps`` more steps (None when it may)."""
        if self.can_take(steps):
            return None
        return (f"{who}: epsilon would reach {self.epsilon_after(steps):.4g} > target {self.target_epsilon:g} "
                f"after {steps} more steps ({self.steps} taken)")

    def report(self) -> dict[str, float | int | str | None]:
        """epsilon, delta (and the rule that chose it), n, sigma, q, steps, the accountant and the target:
        one line of a privacy report."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "delta_rule": self.delta_rule, "n": self.population,
                "sigma": self.noise_multiplier, "q": self.sample_rate, "steps": self.steps,
                "accountant": self.accountant, "target_epsilon": self.target_epsilon}
