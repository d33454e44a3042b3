"""Reliability of a simulated run: checkpoints and resume (bitwise), failing clients, update checks,
robust aggregation, and loading only what cannot run code."""

from __future__ import annotations

import json
import logging
import random
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

from fedlora_ext.federated.checkpoint import FOLDER, client_entries, read_index
from fedlora_ext.core.config import FedConfig
from fedlora_ext.federated.robust import coordinate_median, trimmed_mean, update_norm
from fedlora_ext.federated.simulation import Simulation, simulate
from fedlora_ext.strategies.base import fedavg_weights
from fedtools import cli_env, fedlora, start_fedlora
from pausing import paused, wait_for_pause


def small(method: str = "fedit", **changes) -> FedConfig:
    values = {"method": method, "model": "tiny-bert", "num_clients": 4, "rounds": 4, "local_steps": 2,
              "num_examples": 128, "rank": 4, **changes}
    return FedConfig(**values)


def assert_same_adapter(a, b) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for name in x:
        assert torch.equal(x[name], y[name]), name


# ---- checkpoint and resume ----------------------------------------------------------------------
RESUMABLE = {  # each keeps a different kind of state between rounds
    "flora": {"client_ranks": (8, 4, 4, 2), "rank": 8, "participation": 0.5},  # stacks, merged base
    "fedsa_lora": {"dp_epsilon": 8.0, "dp_noise_seed": 3},  # client B, accounts, noise offsets
    "hetlora": {"client_ranks": (8, 4, 4, 2), "rank": 8, "hetlora_gamma": 0.5},  # ranks shrink
    "lora_a2": {"client_ranks": (2, 1, 1, 2)},  # frozen factors, last rounds
    "ffa_lora": {"server_dp_noise_multiplier": 0.5, "participation": 0.75, "dp_noise_seed": 4},  # server account, key
    "fedit": {"client_failure_rate": 0.3, "dp_epsilon": 8.0, "dp_noise_seed": 1},  # failures after training
    "flexlora": {"client_ranks": (8, 4, 4, 2), "rank": 18, "participation": 0.5},  # global SVD factors
    # aggregation count, the round A was re-factorised after, each client's kept A
    "fedsvd": {"svd_period": 2, "participation": 0.5, "dp_epsilon": 8.0, "dp_noise_seed": 5},
}


@pytest.mark.parametrize("method", list(RESUMABLE))
def test_resume_is_bitwise_the_uninterrupted_run(method, tmp_path):
    config = small(method, **RESUMABLE[method])
    whole = tmp_path / "whole"
    simulate(config.replace(out_dir=str(whole)), progress=False)
    stop = random.Random(method).randint(1, config.rounds - 1)
    cut = tmp_path / "cut"
    torch.manual_seed(config.seed)
    first = Simulation(config.replace(out_dir=str(cut)))
    cut.mkdir()
    for round_index in range(stop):  # the rounds before the "crash", checkpointed as run() does
        first.step(round_index)
        first.save_checkpoint(round_index + 1, cut)
    (cut / "adapter.safetensors").unlink(missing_ok=True)
    resumed = Simulation.resume(cut)
    assert resumed.rounds_done == stop
    resumed.run(progress=False)
    assert_same_adapter(whole / "adapter.safetensors", cut / "adapter.safetensors")
    lines = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    drop = {"seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in lines] == \
           [{k: v for k, v in m.items() if k not in drop} for m in reference]


def test_killed_run_resumes_from_the_command_line(tmp_path):
    """`fedlora run` killed with SIGKILL after a random round (paused there), then `fedlora run --resume`:
    the same adapter, bit for bit, as the uninterrupted run."""
    flags = ["--model", "tiny-bert", "--dataset", "synthetic", "--clients", "4", "--rounds", "6", "--local-steps", "2",
             "--set", "num_examples=128", "--set", "rank=4", "--set", "dp_noise_seed=7", "--set", "seq_len=16",
             "--set", "batch_size=16", "--quiet"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = fedlora("run", *flags, "--out", whole, cwd=tmp_path, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    stop = random.Random(0).randint(1, 4)
    pause = tmp_path / "paused"
    process = start_fedlora("run", *flags, "--out", cut, cwd=tmp_path, env=paused(cli_env(), stop, pause))
    try:
        wait_for_pause(pause, process)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
    done = read_index(cut)["rounds_done"]
    assert done == stop, done
    resumed = fedlora("run", "--resume", cut, "--quiet", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after round {done} of 6" in resumed.stdout
    assert_same_adapter(whole / "adapter.safetensors", cut / "adapter.safetensors")
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 6


def test_noise_keys_are_0600_and_nowhere_else(tmp_path):
    config = small("fedit", dp_epsilon=8.0, server_dp_noise_multiplier=0.5, out_dir=str(tmp_path), rounds=2)
    result = simulate(config, progress=False)
    keys = tmp_path / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    files = sorted(keys.iterdir())
    assert [f.name for f in files] == [f"client-{c}.key" for c in range(4)] + ["server.key"]
    secrets = [f.read_text() for f in files]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert secrets[:4] == [str(c.privacy.noise.seed) for c in result.clients]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.parent != keys:
            data = path.read_bytes()
            assert all(s.encode() not in data for s in secrets), path


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    simulate(small("fedsa_lora", rounds=2, out_dir=str(tmp_path)), progress=False)
    index = read_index(tmp_path)
    client_file = next(f"client-{e['cid']}-{e['round']:05d}.safetensors" for e in client_entries(index)
                       if e["round"] is not None)
    for name in (index["global"]["file"], client_file):  # the global tensors, then one client's
        tensor_file = tmp_path / FOLDER / name
        whole = tensor_file.read_bytes()
        data = bytearray(whole)
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the file
        tensor_file.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"resume: .*{name} is missing or does not match the SHA-256"):
            Simulation.resume(tmp_path)
        tensor_file.write_bytes(whole)
    with pytest.raises(ValueError, match="has no checkpoint.json"):
        Simulation.resume(tmp_path / "nowhere")


def test_resume_of_a_private_run_needs_its_keys(tmp_path):
    simulate(small(rounds=2, dp_epsilon=8.0, out_dir=str(tmp_path)), progress=False)
    (tmp_path / "keys" / "client-2.key").unlink()
    with pytest.raises(ValueError, match="client-2.key is missing"):
        Simulation.resume(tmp_path)


def test_resume_flag_refuses_other_flags(tmp_path):
    from fedlora_ext.app.cli import main

    assert main(["run", "--resume", str(tmp_path), "--rounds", "3"]) == 2


# ---- failing clients ----------------------------------------------------------------------------
def recording(sim: Simulation) -> list:
    """Wraps the server's aggregate to record (state before, replies) per round."""
    seen = []
    original = sim.server.aggregate

    def aggregate(replies, round_index, clients):
        seen.append(({n: t.clone() for n, t in sim.state.tensors.items()}, list(replies)))
        return original(replies, round_index, clients)

    sim.server.aggregate = aggregate
    return seen


def test_failures_leave_the_rest_and_renormalise_the_weights(caplog):
    config = small("fedit", num_clients=6, rounds=5, client_failure_rate=0.3, dp_epsilon=8.0, dp_noise_seed=2)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    seen = recording(sim)
    steps_before = {c.cid: 0 for c in sim.clients}
    modes = set()
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        for round_index in range(config.rounds):
            metrics = sim.step(round_index)
            for cid, reason in metrics.get("failed", {}).items():
                modes.add("crash" if "injected crash" in reason else "lost" if "dropped out" in reason else
                          "late" if "too late" in reason else reason)
                assert f"client {cid}" in caplog.text
            failed = {int(c) for c in metrics.get("failed", {})}
            assert set(metrics["clients"]).isdisjoint(failed)
            # every client that trained spent privacy, its update delivered or not
            for client in sim.clients:
                took_part = client.cid in failed or client.cid in metrics["clients"]
                assert (client.privacy.account.steps > steps_before[client.cid]) == took_part
                steps_before[client.cid] = client.privacy.account.steps
            assert set(metrics["epsilon"]) == {str(c) for c in failed | set(metrics["clients"])}
    assert modes == {"crash", "lost", "late"}
    for (before, replies), after in zip(seen, [m for m in sim.history if "skipped" not in m], strict=False):
        p = fedavg_weights(replies)
        assert abs(float(p.sum()) - 1) < 1e-6 and len(replies) == len(after["clients"])


def test_too_few_replies_skip_or_retry_the_round(caplog):
    config = small("fedit", num_clients=4, rounds=2, client_failure_rate=0.9, client_failure_mode="dropout",
                   min_clients=3)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    start = {n: t.clone() for n, t in sim.state.tensors.items()}
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        metrics = sim.step(0)
    assert "fewer than min_clients = 3" in metrics["skipped"] and "skipping the round" in caplog.text
    assert all(torch.equal(start[n], t) for n, t in sim.state.tensors.items())
    caplog.clear()
    retrying = Simulation(config.replace(round_retries=6, client_failure_rate=0.75, min_clients=2))
    with caplog.at_level(logging.WARNING, logger="fedlora_ext"):
        metrics = retrying.step(0)
    assert "retrying with a new sample" in caplog.text
    if "skipped" not in metrics:  # a retry found enough clients: the round aggregated them
        assert len(metrics["clients"]) >= 2


def test_a_real_exception_in_client_code_fails_only_that_client(monkeypatch):
    config = small("ffa_lora", rounds=1)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    original = sim.strategy.local_update

    def flaky(trainer, model, client, round_index):
        if client.cid == 1:
            raise MemoryError("out of memory on client 1")
        return original(trainer, model, client, round_index)

    monkeypatch.setattr(sim.strategy, "local_update", flaky)
    metrics = sim.step(0)
    assert metrics["clients"] == [0, 2, 3] and "MemoryError: out of memory" in metrics["failed"]["1"]


def test_client_timeout_discards_late_replies():
    config = small("fedit", rounds=1, client_timeout=1e-6)
    metrics = Simulation(config).step(0)
    assert "skipped" in metrics and all("no reply within client_timeout" in r for r in metrics["failed"].values())


# ---- update checks and robust aggregation ---------------------------------------------------------
def test_norm_bound_rejects_large_updates():
    config = small("fedit", rounds=1, max_update_norm=1e-6)
    metrics = Simulation(config).step(0)
    assert all("exceeds max_update_norm" in r for r in metrics["failed"].values()) and metrics["clients"] == []


def test_a_poisoned_update_is_rejected_by_the_checks():
    config = small("ffa_lora", rounds=1, min_clients=2)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    original = sim.strategy.upload

    def poisoned(model, client, start, round_index):
        upload = original(model, client, start, round_index)
        if client.cid == 2:
            name = next(n for n in upload if n.endswith("lora_B"))
            upload[name] = torch.full_like(upload[name], float("nan"))
        return upload

    sim.strategy.upload = poisoned
    metrics = sim.step(0)
    assert metrics["clients"] == [0, 1, 3] and "non-finite" in metrics["failed"]["2"]


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_coordinate_statistics_match_numpy(k):
    import numpy as np

    x = torch.randn(k, 3, 7)
    np.testing.assert_allclose(coordinate_median(x).numpy(), np.median(x.numpy(), axis=0), rtol=1e-6, atol=1e-7)
    cut = int(0.2 * k)
    expected = np.sort(x.numpy(), axis=0)[cut:k - cut].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(x, 0.2).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_median_resists_a_poisoned_client():
    """One client of five uploads a huge update: the mean follows it, the median does not."""
    results = {}
    for how in ("mean", "median", "trimmed_mean"):
        config = small("fedit", num_clients=5, rounds=1, aggregation=how, trim_fraction=0.2)
        torch.manual_seed(config.seed)
        sim = Simulation(config)
        original = sim.strategy.upload

        def poisoned(model, client, start, round_index, original=original):
            upload = original(model, client, start, round_index)
            return {n: t + 1e3 if client.cid == 0 else t for n, t in upload.items()}

        sim.strategy.upload = poisoned
        start = {n: t.clone() for n, t in sim.state.tensors.items()}
        sim.step(0)
        results[how] = max(float((sim.state.tensors[n] - start[n]).abs().max()) for n in start)
    assert results["mean"] > 100 and results["median"] < 1 and results["trimmed_mean"] < 1


def test_update_norm_counts_fresh_factors_whole():
    sent = {"a.lora_B": torch.ones(2, 2)}
    upload = {"a.lora_B": torch.ones(2, 2) * 2, "b.lora_A": torch.full((1, 4), 0.5), "r_ranks": torch.tensor([1], dtype=torch.int32)}
    assert update_norm(upload, sent) == pytest.approx((4 * 1 + 4 * 0.25) ** 0.5)


def test_robust_aggregation_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="aggregation 'median' replaces an average"):
        Simulation(small("flora", aggregation="median"))
    with pytest.raises(ValueError, match="aggregation must be"):
        small(aggregation="mode")


def test_models_load_only_from_safetensors(tmp_path):
    """A model folder with a pickled checkpoint (pytorch_model.bin) and no safetensors is refused."""
    import transformers as tf

    from fedlora_ext.data.tiny_models import build_model

    model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=8))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what a pickled checkpoint looks like
    with pytest.raises((ValueError, OSError), match="safetensors|could not be loaded"):
        build_model(str(tmp_path), "classification", 2, 0)
