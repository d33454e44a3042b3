"""Privacy accounting: our accounts against opacus's accountants, calibration, the delta rule, bad input."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora_ext.dp import PrivacyAccount, default_delta
from fedlora_ext.federated import FedConfig


@pytest.mark.parametrize("kind,opacus_cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 100), (0.25, 0.8, 7), (1.0, 2.0, 3)])
def test_epsilon_equals_opacus(kind, opacus_cls, q, sigma, steps):
    ours = PrivacyAccount(accountant=kind, delta=1e-5, noise_multiplier=sigma, sample_rate=q)
    theirs = opacus_cls()
    for _ in range(steps):
        ours.step()
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.steps == steps
    assert ours.history == theirs.history
    assert ours.epsilon() == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_grows_with_every_step_and_is_never_reset():
    account = PrivacyAccount(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=0.05)
    spent = [account.epsilon()]
    for _round in range(5):
        account.step(10)
        spent.append(account.epsilon())
    assert spent[0] == 0.0
    assert all(b > a for a, b in zip(spent, spent[1:]))
    assert account.steps == 50 and account.history == [(1.0, 0.05, 50)]


def test_calibration_meets_the_target_and_stricter_targets_need_more_noise():
    sigmas = {}
    for eps in (1.0, 8.0):
        account = PrivacyAccount.calibrate(who="t", population=1000, sample_rate=0.016, max_steps=200,
                                           target_epsilon=eps)
        assert account.noise_multiplier == pytest.approx(get_noise_multiplier(
            target_epsilon=eps, target_delta=default_delta(1000), sample_rate=0.016, steps=200), rel=1e-12)
        account.step(200)
        assert eps - 0.1 <= account.epsilon() <= eps  # opacus searches to 0.01 in epsilon
        sigmas[eps] = account.noise_multiplier
    assert sigmas[1.0] > sigmas[8.0]


def test_delta_rule():
    account = PrivacyAccount.calibrate(who="t", population=500, sample_rate=0.1, max_steps=10, noise_multiplier=1.0)
    assert account.delta == 1e-5 and account.delta_rule.startswith("default")  # min(1e-5, 1 / (10 n))
    big = PrivacyAccount.calibrate(who="t", population=50_000, sample_rate=0.1, max_steps=10, noise_multiplier=1.0)
    assert big.delta == pytest.approx(1 / 500_000)
    with pytest.raises(ValueError, match=r"delta = 0.002 must be < 1 / n = 0.002"):
        PrivacyAccount.calibrate(who="t", population=500, sample_rate=0.1, max_steps=10, noise_multiplier=1.0,
                                 delta=0.002)


def test_zero_noise_is_infinite_epsilon():
    account = PrivacyAccount(accountant="rdp", delta=1e-5, noise_multiplier=0.0, sample_rate=0.1)
    account.step()
    assert math.isinf(account.epsilon())


@pytest.mark.parametrize("changes,match", [
    ({"dp_epsilon": 0.0}, "target epsilon must be a finite number > 0, got 0.0"),
    ({"dp_epsilon": -1.0}, "target epsilon must be a finite number > 0"),
    ({"dp_epsilon": float("nan")}, "target epsilon must be a finite number > 0"),
    ({"dp_epsilon": 1.0, "dp_delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
    ({"dp_epsilon": 1.0, "dp_delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
    ({"dp_epsilon": 1.0, "dp_delta": -1e-5}, r"delta must be in \(0, 1\)"),
    ({"dp_epsilon": 1.0, "dp_max_grad_norm": 0.0}, "clipping norm must be a finite number > 0, got 0.0"),
    ({"dp_epsilon": 1.0, "dp_max_grad_norm": -2.0}, "clipping norm must be a finite number > 0"),
    ({"dp_noise_multiplier": -0.5}, "noise multiplier must be a finite number >= 0"),
    ({"dp_epsilon": 1.0, "dp_noise_multiplier": 1.0}, "not both"),
    ({"dp_epsilon": 1.0, "dp_accountant": "gdp"}, "accountant must be one of"),
    ({"dp_epsilon": 1.0, "dp_noise_seed": -1}, "dp_noise_seed must be an int"),
    ({"server_dp_epsilon": 0.0}, "FedConfig.server_dp_.*target epsilon"),
    ({"server_dp_noise_multiplier": 1.0, "server_dp_clip": 0.0}, "server_dp_.*clipping norm"),
    ({"server_dp_noise_multiplier": 1.0, "method": "flora"}, "DP-FedAvg.*got method 'flora'"),
    ({"server_dp_noise_multiplier": 1.0, "client_ranks": (4, 2)}, "DP-FedAvg.*with ranks"),
])
def test_bad_privacy_configuration_fails_before_training(changes, match):
    from fedlora_ext.federated import Simulation

    values = {"num_clients": 2, "rounds": 1, "local_steps": 1, "num_examples": 32, **changes}
    with pytest.raises(ValueError, match=match):
        Simulation(FedConfig(**values))


@pytest.mark.parametrize("q", [1e-4, 0.003, 0.05, 0.2, 0.6154, 0.999])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 2.5, 40.0])
def test_vectorised_rdp_equals_opacus(q, sigma):
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedlora_ext.dp.rdp import default_orders, rdp_per_step

    ours = rdp_per_step(q, sigma, default_orders())
    theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(default_orders()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("q,steps", [(0.09, 30), (0.6, 6), (0.016, 1000)])
def test_rdp_calibration_equals_opacus_search(q, steps):
    from fedlora_ext.dp import noise_for_epsilon

    for eps in (1.0, 8.0):
        assert noise_for_epsilon(eps, 1e-5, q, steps, "rdp") == get_noise_multiplier(
            target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
