"""Two promises the privacy guarantee rests on, each pinned by a test that a one-token change breaks
(issue 22):

* DP-SGD divides every step's clipped sum plus noise by the expected Poisson batch q n_k, never by
  the batch actually drawn (opacus's ``expected_batch_size``; the accountant's analysis of the sampled
  Gaussian mechanism assumes it, and dividing by the drawn size makes the step depend on how many
  records were sampled).
* DP-FedAvg takes at most the rounds its noise was calibrated for, even where the epsilon target would
  allow one more.
"""

from __future__ import annotations

import pytest

from fedlora_ext import ops
from fedlora_ext.dp import ClientPrivacy, NoiseStream, PrivacyAccount
from fedlora_ext.federated import Simulation
from fedlora_ext.federated.client import LocalTrainer
from fedtools import small_config


def test_every_dp_sgd_step_divides_by_the_expected_batch_q_n(monkeypatch):
    """Promise: each DP-SGD step is ``(sum_i clip(g_i) + N(0, (sigma C)^2)) / (q n_k)`` with q n_k fixed
    for the whole run, whatever the size of the Poisson sample drawn at that step (empty ones included)."""
    config = small_config("fedit")
    sim = Simulation(config)
    model = sim.bench.checkout(4, sim.state, 5)
    data = sim.client_data[0][0]
    n, q = len(data), 0.3
    expected = q * n
    assert expected != round(expected)  # no batch can have this size: a drawn size is always distinguishable
    privacy = ClientPrivacy(account=PrivacyAccount(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=q),
                            noise=NoiseStream(11), max_grad_norm=1.0)
    calls = []
    real = ops.dp_clip_noise

    def recording(per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset):
        calls.append({"batch": per_sample_grads[0].shape[0], "denominator": denominator, "offset": offset})
        return real(per_sample_grads, max_norm, noise_multiplier, denominator, seed, offset)

    monkeypatch.setattr(ops, "dp_clip_noise", recording)
    steps = 16
    LocalTrainer(config, data, seed=5, privacy=privacy).train(model, steps=steps)

    assert [c["offset"] for c in calls] == list(range(steps))  # one clip-and-noise per step, fresh offsets
    sizes = [c["batch"] for c in calls]
    assert len(set(sizes)) >= 2, f"the Poisson batch sizes did not vary: {sizes}"
    assert all(c["denominator"] == expected for c in calls), \
        [(c["batch"], c["denominator"]) for c in calls if c["denominator"] != expected]
    assert privacy.account.steps == steps


def test_dp_fedavg_never_takes_more_rounds_than_calibrated():
    """Promise: the server's DP-FedAvg noise holds for the ``rounds`` it was calibrated for and no more:
    after that many noisy aggregations the next is refused by the round cap, even though the epsilon
    target alone would still admit one more round (calibration lands up to 0.01 below the target, and over
    100 rounds one more round adds less than that here, so the cap, not the budget check, is what binds)."""
    rounds = 100
    config = small_config("fedit", rounds=rounds, participation=0.5, server_dp_epsilon=1.0)
    sim = Simulation(config)
    server = sim.server.privacy
    account = server.account
    state = sim.state
    for round_index in range(rounds):
        state = server.aggregate(state, [], round_index)  # nobody answered: noise only, still a round
    assert account.steps == rounds
    assert account.epsilon() <= 1.0
    assert account.can_take(1), ("these parameters no longer leave the target room for a round past the "
                                 f"calibrated ones (epsilon after one more: {account.epsilon_after(1):.6g})")
    with pytest.raises(RuntimeError, match=rf"{rounds} noisy rounds done, the {rounds} calibrated for"):
        server.aggregate(state, [], rounds)
    assert account.steps == rounds  # the refused round spent nothing
