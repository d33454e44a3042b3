"""Messages that help a user set up privacy (issue 22):

* a target epsilon below what the RDP accountant can give at that delta says so (the floor of RDP's
  conversion, about 0.1029 at delta 1e-5, whatever sigma or steps) and says what reaches it: the PRV
  accountant (checked, not assumed), or a larger delta, on the client's and on the server's path;
* ``--no-dp`` with ``--epsilon`` (or ``--set dp_epsilon=...`` / ``dp_noise_multiplier=...``) is a one-line
  conflict, not a silent drop of DP;
* an epsilon above 100 is accepted with one warning per configuration that it promises nothing.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from fedlora_ext.app.cli import _config, build_parser
from fedlora_ext.core.config import MeaninglessEpsilonWarning
from fedlora_ext.dp import PrivacyAccount
from fedlora_ext.dp.rdp import conversion_floor, default_orders, delta_for_floor, rdp_epsilon
from fedlora_ext.federated import FedConfig, Simulation
from fedtools import fedlora, one_error_line, small_config

CLIENT = dict(who="client 0 (n = 20)", population=20, sample_rate=0.2, max_steps=10)


def _refusal(**kwargs) -> str:
    with pytest.raises(ValueError) as error:
        PrivacyAccount.calibrate(**{"accountant_key": "dp_accountant", **kwargs})
    message = str(error.value)
    assert "\n" not in message
    return message


# ---- RDP's floor -----------------------------------------------------------------------------------
def test_the_rdp_floor_is_the_conversion_of_zero_rdp_at_the_orders_in_use():
    """The floor is opacus's RDP -> (epsilon, delta) conversion at sigma -> infinity with the orders the
    accountant uses: no sigma and no number of steps gets below it, and huge sigmas approach it."""
    orders = np.asarray(default_orders())
    by_hand = np.min(np.log(1e5) / (orders - 1) - np.log(orders) / (orders - 1) + np.log((orders - 1) / orders))
    floor = conversion_floor(1e-5)
    assert floor == pytest.approx(by_hand, rel=1e-12) and f"{floor:.4g}" == "0.1029"
    for sigma, q, steps in [(1e6, 0.2, 10), (1e4, 1.0, 1), (50.0, 0.01, 10_000)]:
        assert rdp_epsilon([(sigma, q, steps)], 1e-5) > floor
    assert rdp_epsilon([(1e6, 0.2, 10)], 1e-5) == pytest.approx(floor, abs=1e-8)
    assert conversion_floor(1e-6) > floor > conversion_floor(1e-3) > 0 == conversion_floor(0.05)
    needed = delta_for_floor(0.05)  # the delta from which RDP's floor is below the target
    assert conversion_floor(needed * 0.99) > 0.05 > conversion_floor(needed * 1.01)


def test_a_target_below_the_rdp_floor_names_the_floor_and_prv_and_prv_reaches_it():
    """Promise: the message names the floor at this delta, says no sigma or step count helps, and points to
    ``dp_accountant = "prv"`` and to a larger delta; both suggestions then calibrate and meet the target."""
    message = _refusal(**CLIENT, target_epsilon=0.05)
    for part in ("client 0 (n = 20)", "target epsilon 0.05", "cannot go below epsilon 0.1029 at delta 1e-05",
                 "whatever sigma or steps", 'set dp_accountant = "prv"', "a delta above 0.00027"):
        assert part in message, (part, message)
    assert "server_dp_accountant" not in message
    prv = PrivacyAccount.calibrate(**CLIENT, accountant="prv", target_epsilon=0.05)
    prv.step(10)
    assert 0 < prv.epsilon() <= 0.05
    delta = float(re.search(r"a delta above ([0-9.e-]+)", message).group(1))
    rdp = PrivacyAccount.calibrate(**CLIENT, delta=delta, target_epsilon=0.05)
    rdp.step(10)
    assert 0 < rdp.epsilon() <= 0.05


def test_when_prv_cannot_either_the_message_says_what_can():
    """Promise: below PRV's own floor too (about 0.01, its error bound) the message does not send the user
    to PRV for this target: it gives the target PRV can reach and the delta RDP needs; both work."""
    message = _refusal(**CLIENT, target_epsilon=0.001)
    for part in ("cannot go below epsilon 0.1029", "the PRV accountant does not reach it either",
                 'raise the target epsilon above 0.00999 with dp_accountant = "prv"', "a delta above 0.0056",
                 "sigma more than 1e6"):
        assert part in message, (part, message)
    assert 'set dp_accountant = "prv"' not in message
    PrivacyAccount.calibrate(**CLIENT, accountant="prv", target_epsilon=0.011)
    PrivacyAccount.calibrate(**CLIENT, delta=0.0056, target_epsilon=0.001)


def test_a_delta_the_party_may_not_use_is_not_suggested():
    """Promise: with n = 5000, the delta RDP would need (2.7e-4) is not below 1 / n: only PRV is offered."""
    message = _refusal(who="client 3 (n = 5000)", population=5000, sample_rate=0.01, max_steps=100,
                       target_epsilon=0.05)
    assert 'set dp_accountant = "prv"' in message and "0.1029" in message and "delta above" not in message


def test_other_unreachable_targets_keep_their_message():
    """Promise: a target above the floor that sigma up to 1e6 still cannot meet (a billion steps) keeps
    the general advice, without a floor or PRV it does not need."""
    message = _refusal(who="t", population=20, sample_rate=1.0, max_steps=10**9, target_epsilon=0.11)
    assert "sigma more than 1e6" in message and "raise the target epsilon or delta, or train fewer steps" in message
    assert "prv" not in message.lower() and "floor" not in message and "whatever sigma" not in message


@pytest.mark.parametrize("changes, key", [
    ({"dp_epsilon": 0.05, "batch_size": 5}, "dp_accountant"),
    ({"server_dp_epsilon": 0.05, "participation": 0.3}, "server_dp_accountant"),
])
def test_both_paths_name_their_own_accountant_key(changes, key):
    """Promise: sample-level (dp_epsilon) and client-level (server_dp_epsilon) targets under the floor
    both get the floor and the key to change, before anything trains."""
    with pytest.raises(ValueError) as error:
        Simulation(small_config("fedit", **changes))
    message = str(error.value)
    assert "\n" not in message and "cannot go below epsilon 0.1029 at delta 1e-05" in message
    assert re.search(rf'(^|[^_]){key} = "prv"', message), message


# ---- --no-dp against a DP setting --------------------------------------------------------------------
@pytest.mark.parametrize("args, names", [
    (["run", "--epsilon", "3", "--no-dp"], ["--epsilon 3", "--no-dp"]),
    (["simulate", "--no-dp", "--epsilon", "3"], ["--epsilon 3", "--no-dp"]),
    (["compare", "--methods", "fedit", "--epsilon", "3", "--no-dp"], ["--epsilon 3", "--no-dp"]),
    (["simulate", "--no-dp", "--set", "dp_epsilon=2"], ["--set dp_epsilon=2", "--no-dp"]),
    (["run", "--set", "dp_noise_multiplier=0.5", "--no-dp"], ["--set dp_noise_multiplier=0.5", "--no-dp"]),
])
def test_no_dp_with_a_dp_setting_is_a_one_line_conflict(args, names, tmp_path):
    """Promise: asking for DP and for no DP at once stops with one line naming both flags (exit 2, no
    traceback) instead of silently training without DP."""
    line = one_error_line(fedlora(*args, cwd=tmp_path))
    assert "conflict" in line and all(name in line for name in names), line


def test_no_dp_with_dp_turned_off_is_no_conflict():
    config = _config(build_parser().parse_args(["simulate", "--no-dp", "--set", "dp_epsilon=none"]))
    assert not config.sample_dp


# ---- epsilon above 100 -----------------------------------------------------------------------------
def _warnings_of(build):
    """``build()`` and the messages of the meaningless-epsilon warnings it emitted (all of them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught if issubclass(w.category, MeaninglessEpsilonWarning)]


@pytest.mark.parametrize("key", ["dp_epsilon", "server_dp_epsilon"])
def test_an_epsilon_above_100_warns_once_and_100_does_not(key):
    """Promise: a target above 100 is accepted with exactly one one-line warning that it promises nothing
    meaningful; 100 itself is accepted silently."""
    config, messages = _warnings_of(lambda: FedConfig(**{key: 150.0}))
    assert getattr(config, key) == 150.0
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert f"{key} = 150" in messages[0] and "promises nothing meaningful" in messages[0]
    assert _warnings_of(lambda: FedConfig(**{key: 100.0}))[1] == []
    assert issubclass(MeaninglessEpsilonWarning, UserWarning)


def test_one_warning_per_configuration_not_per_client_or_copy():
    """Promise: one warning when the configuration is built (both epsilons in one line), none for the
    clients that calibrate from it, the rounds it runs, or copies that keep its epsilons."""
    config, messages = _warnings_of(lambda: small_config("fedit", rounds=1, dp_epsilon=150.0, server_dp_epsilon=120.0))
    assert len(messages) == 1 and "dp_epsilon = 150 and server_dp_epsilon = 120 promise" in messages[0], messages

    def run():
        sim = Simulation(config.replace(out_dir=None))
        sim.step(0)
        return sim

    sim, messages = _warnings_of(run)
    assert messages == [] and len(sim.clients) == 3
    assert len(_warnings_of(lambda: config.replace(dp_epsilon=200.0))[1]) == 1


def test_the_cli_prints_the_warning_as_one_line(capsys):
    config = _config(build_parser().parse_args(["simulate", "--epsilon", "150"]))
    assert config.dp_epsilon == 150.0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: warning: FedConfig: dp_epsilon = 150 promises"), lines
    _config(build_parser().parse_args(["simulate", "--epsilon", "100"]))
    assert capsys.readouterr().err == ""
