"""RDP of the sampled Gaussian mechanism, vectorised: the numbers of opacus's RDP accountant, faster.

opacus evaluates the series of Mironov, Talwar and Zhang (arXiv 1908.10530, section 3.3) one Python
term at a time; at the sample rates of small federated clients (q = 0.1 to 0.6) one epsilon costs
0.3 s and a calibration several seconds per client. Here each order's series is a few NumPy vectors,
cut where opacus stops it (the first term below e^-30), and the RDP of one step is cached per
(q, sigma), so an epsilon after any number of rounds is a sum and a lookup. The conversion to
(epsilon, delta) is opacus's own ``get_privacy_spent``.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from scipy import special

_TERMS = 256


def default_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    i = np.arange(alpha + 1, dtype=np.float64)
    terms = (np.log(special.binom(alpha, i)) + i * math.log(q) + (alpha - i) * math.log1p(-q)
             + (i * i - i) / (2 * sigma**2))
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alphas: np.ndarray, terms: int = _TERMS) -> np.ndarray:
    """log A_alpha for fractional orders, all at once: ``terms`` series terms per order, each series cut
    after its first term below e^-30 as opacus does; orders whose series is longer get more terms."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = np.arange(terms, dtype=np.float64)[None, :]
    a = alphas[:, None]
    j = a - i
    coef = special.binom(a, i)
    log_coef = np.log(np.abs(coef))
    # 0.5 erfc(x / sqrt 2 sigma) = Phi(-x / sigma), in logs
    s0 = log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2) + special.log_ndtr(-(i - z0) / sigma)
    s1 = log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2) + special.log_ndtr(-(z0 - j) / sigma)
    small = np.maximum(s0, s1) < -30
    done = small.any(axis=1)
    out = np.empty_like(alphas)
    if not done.all():  # longer series: only those orders again, with more terms
        out[~done] = _log_a_frac(q, sigma, alphas[~done], 4 * terms)
    keep = np.arange(terms)[None, :] <= small.argmax(axis=1)[:, None]  # up to and with the first small term
    sign = np.where(coef > 0, 1.0, -1.0)[done]
    log_a0 = special.logsumexp(np.where(keep, s0, -np.inf)[done], b=sign, axis=1)
    log_a1 = special.logsumexp(np.where(keep, s1, -np.inf)[done], b=sign, axis=1)
    out[done] = np.logaddexp(log_a0, log_a1)
    return out


@functools.lru_cache(maxsize=4096)
def rdp_per_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """The RDP of one step of the sampled Gaussian mechanism at every order (opacus's ``compute_rdp``
    with ``steps = 1``). Read-only: it is cached."""
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0:
        out = np.zeros_like(alphas)
    elif sigma == 0:
        out = np.full_like(alphas, np.inf)
    elif q == 1.0:
        out = alphas / (2 * sigma**2)
    else:
        integer = np.array([float(a).is_integer() for a in orders])
        log_a = np.empty_like(alphas)
        log_a[integer] = [_log_a_int(q, sigma, int(a)) for a in alphas[integer]]
        log_a[~integer] = _log_a_frac(q, sigma, alphas[~integer])
        out = log_a / (alphas - 1)
    out.flags.writeable = False
    return out


def rdp_epsilon(history, delta: float, orders: tuple[float, ...] | None = None) -> float:
    """Epsilon at ``delta`` after an opacus-style history ``[(sigma, q, steps), ...]``; never negative
    (the RDP -> (epsilon, delta) conversion goes below 0 at a large delta and much noise: a
    mechanism that is (epsilon < 0, delta)-DP is (0, delta)-DP)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    orders = orders or default_orders()
    total = sum(steps * rdp_per_step(float(q), float(sigma), orders) for sigma, q, steps in history)
    with warnings.catch_warnings():  # opacus's hint that the best order is the largest one
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return max(0.0, float(eps))


def conversion_floor(delta: float, orders: tuple[float, ...] | None = None) -> float:
    """The smallest epsilon the RDP -> (epsilon, delta) conversion can give at ``delta`` with these
    orders, whatever the mechanism: opacus's ``get_privacy_spent`` of zero RDP (sigma -> infinity),
    never negative. With opacus's orders (largest 63) it is about 0.1029 at delta 1e-5: no noise
    multiplier and no number of steps brings an RDP epsilon below it."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = orders or default_orders()
    with warnings.catch_warnings():  # opacus's hint that the best order is the largest one
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=[0.0] * len(orders), delta=delta)
    return max(0.0, float(eps))


def delta_for_floor(target_epsilon: float, orders: tuple[float, ...] | None = None) -> float:
    """The delta above which :func:`conversion_floor` is below ``target_epsilon`` (the inverse of the
    conversion of zero RDP, at the best order)."""
    alphas = np.asarray(orders or default_orders(), dtype=np.float64)
    log_delta = -((target_epsilon - np.log((alphas - 1) / alphas)) * (alphas - 1) + np.log(alphas))
    return float(np.exp(log_delta.min()))


#: The largest noise multiplier a calibration tries (opacus's ``MAX_SIGMA``).
MAX_SIGMA = 1e6


class BudgetTooLow(ValueError):
    """No noise multiplier up to :data:`MAX_SIGMA` meets the target; ``epsilon_at_max`` is the epsilon
    at the largest sigma tried (the accountant's floor at this delta)."""

    def __init__(self, target_epsilon: float, epsilon_at_max: float, sigma_max: float) -> None:
        self.target_epsilon, self.epsilon_at_max, self.sigma_max = target_epsilon, epsilon_at_max, sigma_max
        super().__init__(f"epsilon {target_epsilon:g} needs sigma more than {MAX_SIGMA:.0e} (epsilon is still "
                         f"{epsilon_at_max:.4g} at sigma {sigma_max:g})")


def search_noise_multiplier(epsilon_at, target_epsilon: float, tolerance: float = 0.01,
                            max_sigma: float = MAX_SIGMA) -> float:
    """opacus's ``get_noise_multiplier`` search over ``epsilon_at(sigma)``: double sigma from 20 until
    epsilon <= target (:class:`BudgetTooLow` past ``max_sigma``), then bisect until epsilon is within
    ``tolerance`` below the target. The sigma returned always has epsilon <= target."""
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > max_sigma:
            raise BudgetTooLow(target_epsilon, eps_high, sigma_high / 2)
        eps_high = epsilon_at(sigma_high)
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
