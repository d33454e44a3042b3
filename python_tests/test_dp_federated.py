"""DP-SGD on federated clients and DP-FedAvg at the server.

* With the noise off, the client's DP step (hooks -> summed loss -> one dp_clip_noise) equals opacus's
  GradSampleModule + DPOptimizer step on the same peft model; with it on, every trained tensor moves
  at every step (opacus issue 820), and the noise has std sigma C / (q n).
* A run accounts every local step of every round a client took part in; epsilon never decreases; the
  noise key never appears in anything written or printed; offsets are never reused.
* DP-FedAvg clips each update, averages over the expected number of clients and noises every round.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora_ext.dp import ClientPrivacy, NoiseStream, PerSampleGradients, PrivacyAccount, noisy_gradients_, summed_loss
from fedlora_ext.core import adapters
from fedlora_ext.federated import Simulation, simulate
from fedlora_ext.federated.client import LocalTrainer
from fedlora_ext.strategies.ffa_lora import FFALoRA
from fedtools import small_config
from test_dp_per_sample import _batch, _peft


def _privacy(sigma: float, clip: float = 1.0, q: float = 0.5, seed: int = 11) -> ClientPrivacy:
    return ClientPrivacy(account=PrivacyAccount(accountant="rdp", delta=1e-5, noise_multiplier=sigma, sample_rate=q),
                         noise=NoiseStream(seed), max_grad_norm=clip)


@pytest.mark.parametrize("clip", [0.01, 1.0, 1e3])
def test_noise_off_step_equals_opacus_dp_optimizer(clip):
    """Flat clipping, mean reduction over the expected batch: parameters agree to float rounding."""
    model = _peft("tiny-bert", "classification")
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    batch = _batch("classification", size=6)
    params = list(adapters.trainable_parameters(ours).values())
    privacy = _privacy(0.0, clip)
    opt = torch.optim.SGD(params, lr=0.5)
    with PerSampleGradients(ours, params) as collector:
        summed_loss(ours, batch).backward()
        noisy_gradients_(params, collector.grad_samples, 6, privacy, 6.0, privacy.noise.next_offset())
    opt.step()

    for module in theirs.modules():  # opacus hooks only record in training mode: train without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    wrapped = GradSampleModule(theirs.train())
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    dp_opt = DPOptimizer(torch.optim.SGD(trainable, lr=0.5), noise_multiplier=0.0, max_grad_norm=clip,
                         expected_batch_size=6)
    wrapped(**batch).loss.backward()  # Hugging Face's mean over the batch, as opacus expects
    dp_opt.step()
    moved = 0
    for (name, a), b, start in zip(adapters.trainable_parameters(ours).items(),
                                   adapters.trainable_parameters(theirs).values(),
                                   adapters.trainable_parameters(model).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        moved += int(not torch.equal(a, start))
    assert moved == len(params)


def test_every_trained_tensor_moves_every_step():
    """opacus issue 820: peft LoRA under DP can silently stop training; ours moves every tensor, every step
    (lora_B starts at zero, so a broken chain rule would leave A frozen)."""
    config = small_config("fedit")
    sim = Simulation(config)
    model = sim.bench.checkout(4, sim.state, 5)
    privacy = _privacy(1.0, q=0.2)
    trainer = LocalTrainer(config, sim.client_data[0][0], seed=5, privacy=privacy)
    params = adapters.trainable_parameters(model)
    for step in range(4):
        before = {n: p.detach().clone() for n, p in params.items()}
        trainer.train(model, steps=1)
        still = [n for n, p in params.items() if torch.equal(before[n], p)]
        assert not still, f"step {step}: {still} did not change"
    assert privacy.noise.offset == 4 and privacy.account.steps == 4


@pytest.mark.parametrize("sigma,clip,denominator", [(1.0, 1.0, 16.0), (0.7, 3.0, 4.5)])
def test_noise_std_is_sigma_clip_over_denominator(sigma, clip, denominator):
    params = [torch.nn.Parameter(torch.zeros(300, 200)), torch.nn.Parameter(torch.zeros(50_000))]
    privacy = _privacy(sigma, clip)
    noisy_gradients_(params, [None, None], 0, privacy, denominator, 0)  # an empty Poisson sample: noise only
    noise = torch.cat([p.grad.flatten() for p in params]).double()
    expected = sigma * clip / denominator
    n = noise.numel()  # 110,000: the sample std is within 4 standard errors (sqrt(1 / 2n)) of the truth
    assert abs(noise.std().item() / expected - 1) < 4 * (0.5 / n) ** 0.5
    assert abs(noise.mean().item()) < 4 * expected / n**0.5
    first = params[0].grad.clone()
    noisy_gradients_(params, [None, None], 0, privacy, denominator, 1)  # the next offset: fresh noise
    assert abs(torch.corrcoef(torch.stack([first.flatten(), params[0].grad.flatten()]))[0, 1]) < 0.02


def test_masks_zero_unselected_coordinates_after_the_noise():
    params = [torch.nn.Parameter(torch.zeros(4, 6))]
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None]
    noisy_gradients_(params, [torch.randn(3, 4, 6)], 3, _privacy(1.0), 3.0, 0, [mask])
    assert torch.all(params[0].grad[1] == 0) and torch.all(params[0].grad[3] == 0)
    assert torch.all(params[0].grad[0] != 0)


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedsa_lora", "fedsa_vera", "hetlora", "lora_a2",
                                    "flora", "fedex_lora", "fedprox", "flexlora", "fedsvd"])
def test_every_method_trains_privately_and_accounts_every_step(method, tmp_path):
    extras = {"client_ranks": (4, 2, 1)} if method in ("hetlora", "flora", "flexlora") else {}
    config = small_config(method, rounds=3, participation=0.67, dp_epsilon=8.0, out_dir=str(tmp_path), **extras)
    result = simulate(config, progress=False)
    taken = {c.cid: 0 for c in result.clients}
    for row in result.history:
        for cid in row["clients"]:
            taken[cid] += 1
        assert set(row["epsilon"]) == {str(c) for c in row["clients"]}
    strategy = result.strategy
    eps_max = [row["epsilon_max"] for row in result.history]
    assert all(b >= a for a, b in zip(eps_max, eps_max[1:])) and eps_max[-1] > 0
    for client in result.clients:
        account = client.privacy.account
        assert account.steps == taken[client.cid] * strategy.local_steps_per_round(client.num_examples)
        assert client.privacy.noise.offset == account.steps  # one fresh offset per step, across rounds
        assert account.epsilon() <= 8.0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["epsilon_max"] == pytest.approx(max(c.privacy.account.epsilon() for c in result.clients))
    assert set(report["clients"]["0"]) == {"epsilon", "delta", "delta_rule", "n", "sigma", "q", "steps", "accountant",
                                           "target_epsilon"}


def test_noise_key_is_secret_and_unique(tmp_path, capsys):
    from fedlora_ext.app.cli import main

    toml = tmp_path / "run.toml"
    toml.write_text('preset = "ffa_lora"\nrounds = 1\nlocal_steps = 2\nnum_examples = 64\ndp_epsilon = 4.0\n')
    sim = Simulation(small_config("ffa_lora", dp_epsilon=4.0))
    seeds = [c.privacy.noise.seed for c in sim.clients]
    assert len(set(seeds)) == len(seeds)
    assert all(str(s) not in repr(c) for s, c in zip(seeds, sim.clients))
    assert main(["simulate", "--config", str(toml), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "accountant" in printed and "sample-level epsilon" in printed
    # a fresh key per client per run, and none of them in what the run wrote or printed
    result = simulate(small_config("ffa_lora", rounds=1, dp_epsilon=4.0, out_dir=str(tmp_path / "again")), progress=False)
    written = "".join(p.read_text() for p in (tmp_path / "again").glob("*.json*")) + printed
    assert all(str(c.privacy.noise.seed) not in written for c in result.clients)
    assert not set(seeds) & {c.privacy.noise.seed for c in result.clients}


def test_fixed_noise_seed_reproduces_a_run_and_noise_changes_it():
    runs = [simulate(small_config("ffa_lora", rounds=2, dp_epsilon=2.0, dp_noise_seed=s), progress=False)
            for s in (1, 1, 2)]
    tensors = [adapters_of(r) for r in runs]
    assert all(torch.equal(tensors[0][n], tensors[1][n]) for n in tensors[0])
    assert any(not torch.equal(tensors[0][n], tensors[2][n]) for n in tensors[0])


def adapters_of(result):
    return result.strategy.global_tensors(result.state)


def test_a_model_with_nothing_to_train_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(FFALoRA, "trainable", lambda self, r: {"A": False, "B": False, "head": False})
    with pytest.raises(ValueError, match="no trainable adapter parameter"):
        Simulation(small_config("ffa_lora", dp_epsilon=1.0))


def test_empty_poisson_samples_still_step_and_account():
    config = small_config("fedit", batch_size=1)
    sim = Simulation(config)
    model = sim.bench.checkout(4, sim.state, 0)
    privacy = _privacy(1.0, q=1e-9)  # practically always empty
    loss = LocalTrainer(config, sim.client_data[0][0], 0, privacy).train(model, steps=3)
    assert np.isnan(loss) and privacy.account.steps == 3


# ---- DP-FedAvg ---------------------------------------------------------------------------------------
def test_dp_fedavg_noise_off_is_clipped_uniform_mean():
    config = small_config("fedit", rounds=1, server_dp_noise_multiplier=0.0, server_dp_clip=0.05, participation=1.0)
    sim = Simulation(config)
    before = {n: t.clone() for n, t in sim.state.tensors.items()}
    replies = []
    original = sim.server.aggregate

    def spy(rs, *args):
        replies.extend(rs)
        return original(rs, *args)

    sim.server.aggregate = spy
    sim.step(0)
    assert len(replies) == 3
    names = sorted(replies[0].tensors)
    updates = [torch.cat([(r.tensors[n] - before[n]).flatten() for n in names]) for r in replies]
    clipped = [u * min(1.0, 0.05 / (u.norm().item() + 1e-6)) for u in updates]
    expected = torch.stack(clipped).sum(0) / 3.0  # q N = 1 * 3
    got = torch.cat([(sim.state.tensors[n] - before[n]).flatten() for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert all(u.norm() > 0.05 for u in updates)  # clipping was active


def test_dp_fedavg_accounts_rounds_and_noises_empty_rounds():
    config = small_config("ffa_lora", rounds=4, participation=0.34, server_dp_epsilon=10.0, dp_noise_seed=3)
    sim = Simulation(config)
    sampled = [sim.participants(r) for r in range(4)]
    sim.server.privacy.sample = lambda r, clients: []  # nobody answers: the round is noise only
    before = {n: t.clone() for n, t in sim.state.tensors.items()}
    sim.step(0)
    changed = [n for n in before if not torch.equal(before[n], sim.state.tensors[n])]
    assert changed and all(not n.endswith("lora_A") for n in changed)  # B and head, what FFA uploads
    assert sim.server.privacy.account.steps == 1
    assert sum(len(s) for s in sampled) > 0
    eps = sim.history[-1]["server_epsilon"]
    assert 0 < eps <= 10.0


def test_dp_fedavg_with_sample_dp_reports_both():
    result = simulate(small_config("fedsa_lora", rounds=2, dp_epsilon=8.0, server_dp_noise_multiplier=1.0,
                                   participation=1.0), progress=False)
    assert "server" in result.privacy and "clients" in result.privacy
    assert result.privacy["server"]["steps"] == 2
