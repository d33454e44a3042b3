"""Server optimizers (Reddi et al., ICLR'21, arXiv 2003.00295; FedAvgM, arXiv 1909.06335) over methods
whose server update is an average: the step recomputed here in float64 from the recorded uploads (or,
under DP-FedAvg, from the recorded noised aggregate), round after round with the moments carried by this
file's own code; only the tensors the method updated move; resume is bitwise; refusals are one line.

The rule as Algorithm 2 prints it: d = aggregate - x; FedAvgM v = beta v + d, x += lr v; the adaptive
ones m = b1 m + (1 - b1) d and v from v_{-1} = tau^2 (Adagrad v + d^2, Adam b2 v + (1 - b2) d^2, Yogi
v - (1 - b2) d^2 sign(v - d^2)), x += lr m / (sqrt(v) + tau), no bias correction.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from fedlora_ext.federated import Simulation
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import fedavg_p, run_recorded, small_config

OPTIMIZERS = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
#: server learning rates that move the model visibly: FedAvgM and FedAdagrad near the paper's best
#: (10^0, 10^-1), FedAdam and FedYogi 10^-2 as on Stack Overflow NWP, tau 10^-3 (its recommended default)
SERVER_LR = {"fedavgm": 1.0, "fedadagrad": 0.1, "fedadam": 0.01, "fedyogi": 0.01}
SETTINGS = {"plain": {}, "dp_sgd": {"dp_noise_multiplier": 1.0, "dp_noise_seed": 5},
            "dp_fedavg": {"server_dp_noise_multiplier": 0.5, "server_dp_clip": 1.0, "dp_noise_seed": 5}}
ROUNDS = 3
#: float32 server step against the float64 oracle, relative to the largest |x|: measured <= 2.3e-7
#: (a couple of float32 roundings) in every case here; 2e-6 leaves room, while a wrong rule is off by
#: far more (measured: v_{-1} = 0 instead of tau^2 5.6e-3 to 6.8e-3, Adam with bias correction 3.4e-2)
TOLERANCE = 2e-6


def config(method: str, optimizer: str, setting: str = "plain", **changes):
    return small_config(method, rounds=ROUNDS, server_optimizer=optimizer, server_lr=SERVER_LR[optimizer],
                        **{**SETTINGS[setting], **changes})


def record_steps(sim: Simulation) -> list[dict]:
    """Wraps the server optimizer's step: per round the start x, the aggregate, the names and the result."""
    steps = []
    optimizer = sim.server.optimizer
    real = optimizer.step

    def step(start, aggregate, names):
        names = list(names)
        before = {"start": copy.deepcopy(start.tensors), "aggregate": copy.deepcopy(aggregate.tensors), "names": names}
        result = real(start, aggregate, names)
        steps.append({**before, "result": copy.deepcopy(result.tensors)})
        return result

    optimizer.step = step
    return steps


@functools.lru_cache(maxsize=None)
def recorded(method: str, optimizer: str, setting: str = "plain"):
    cfg = config(method, optimizer, setting)
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    steps = record_steps(sim)
    from fedtools import Recorder

    rec = Recorder(sim)
    sim.run(progress=False)
    return cfg, sim, rec, steps


class Oracle:
    """Reddi et al.'s server step in float64, with its own moments (this file's code, not the library's)."""

    def __init__(self, cfg) -> None:
        self.cfg, self.m, self.v = cfg, {}, {}

    def step(self, name: str, x: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
        c, d = self.cfg, aggregate.double() - x.double()
        if c.server_optimizer == "fedavgm":
            self.m[name] = c.server_momentum * self.m.get(name, torch.zeros_like(d)) + d
            return x.double() + c.server_lr * self.m[name]
        self.m[name] = c.server_beta1 * self.m.get(name, torch.zeros_like(d)) + (1 - c.server_beta1) * d
        v = self.v.get(name, torch.full_like(d, c.server_tau ** 2))
        if c.server_optimizer == "fedadagrad":
            v = v + d ** 2
        elif c.server_optimizer == "fedadam":
            v = c.server_beta2 * v + (1 - c.server_beta2) * d ** 2
        else:
            v = v - (1 - c.server_beta2) * d ** 2 * torch.sign(v - d ** 2)
        self.v[name] = v
        return x.double() + c.server_lr * self.m[name] / (v.sqrt() + c.server_tau)


def fedavg_of_uploads(replies, name: str) -> torch.Tensor:
    p = fedavg_p(replies)
    return sum(p[k] * r.tensors[name].double() for k, r in enumerate(replies))


def assert_close(got: torch.Tensor, want: torch.Tensor, scale: float) -> None:
    error = float((got.double() - want).abs().max())
    assert error <= TOLERANCE * scale, f"error {error:.3g} > {TOLERANCE * scale:.3g}"


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_server_step_is_reddis_rule(optimizer, setting):
    """Every round: x_{t+1} = x_t + step(aggregate_t - x_t) with the moments carried over rounds; the
    aggregate is the FedAvg of the uploads (recomputed here from the replies) unless DP-FedAvg noised it
    (then the recorded aggregate is the input); the next round starts from exactly what the step gave."""
    cfg, sim, rec, steps = recorded("fedit", optimizer, setting)
    assert len(steps) == ROUNDS
    oracle = Oracle(cfg)
    for t, step in enumerate(steps):
        assert step["names"] == sorted(step["start"])  # FedIT updates every global tensor (A, B, head)
        scale = max(float(x.abs().max()) for x in step["start"].values())
        moved = 0.0
        for name in step["names"]:
            x = step["start"][name]
            if setting == "dp_fedavg":
                aggregate = step["aggregate"][name].double()
            else:  # the method's own aggregate, from the recorded uploads
                aggregate = fedavg_of_uploads(rec.rounds[t].replies, name)
                assert_close(step["aggregate"][name], aggregate, scale)
            want = oracle.step(name, x, aggregate)
            assert_close(step["result"][name], want, scale)
            moved = max(moved, float((step["result"][name].double() - aggregate).abs().max()))
        if optimizer != "fedavgm" or t > 0:  # FedAvgM's first step at lr 1 is the aggregate itself
            assert moved > 1e-4, moved  # the step is really applied: the model is not the plain aggregate
        nxt = steps[t + 1]["start"] if t + 1 < ROUNDS else sim.state.tensors
        assert all(torch.equal(nxt[n], step["result"][n]) for n in step["names"])
    moments = sim.state.info["server_optimizer"]
    for slot, mine in (("m", oracle.m), ("v", oracle.v)):  # the moments the state keeps are the oracle's
        assert set(moments.get(slot, {})) == set(mine)
        for name, want in mine.items():
            error = float((moments[slot][name].double() - want).abs().max())
            assert error <= 1e-5 * float(want.abs().max()), (slot, name, error)


@pytest.mark.parametrize("method, kinds", [("ffa_lora", {"lora_B", "head"}), ("fedsa_lora", {"lora_A"})])
def test_only_what_the_method_updated_moves(method, kinds):
    """FFA-LoRA: B and the head step, the shared A never; FedSA-LoRA: A only (B and heads are the
    clients'); tensors outside the round's upload are bit-for-bit untouched and have no moments."""
    cfg = config(method, "fedadam")
    sim, rec = run_recorded(cfg)
    initial = Simulation(cfg).state.tensors
    moments = sim.state.info["server_optimizer"]
    kind = lambda n: "head" if n.startswith("head.") else n.rsplit(".", 1)[1]  # noqa: E731
    for name, tensor in sim.state.tensors.items():
        if kind(name) in kinds:
            assert name in moments["m"] and not torch.equal(tensor, initial[name]), name
        else:
            assert name not in moments["m"] and torch.equal(tensor, initial[name]), name


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_it_steps_from_a_robust_aggregate(aggregation):
    """With a coordinate-wise median / trimmed mean as the aggregate, the step takes d from it."""
    cfg = config("fedit", "fedyogi", aggregation=aggregation, trim_fraction=0.34)
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    steps = record_steps(sim)
    sim.run(progress=False)
    oracle = Oracle(cfg)
    for step in steps:
        scale = max(float(x.abs().max()) for x in step["start"].values())
        for name in step["names"]:
            assert_close(step["result"][name], oracle.step(name, step["start"][name], step["aggregate"][name]), scale)


def uninterrupted_and_resumed(config, tmp_path, cut_after: int = 2) -> tuple[Simulation, Simulation]:
    """``config`` run straight through (in tmp_path/whole), and the same run stepped and checkpointed for
    ``cut_after`` rounds (in tmp_path/cut), then resumed from that folder alone and run to its end."""
    torch.manual_seed(config.seed)
    whole = Simulation(config.replace(out_dir=str(tmp_path / "whole")))
    whole.run(progress=False)
    torch.manual_seed(config.seed)
    cut = Simulation(config.replace(out_dir=str(tmp_path / "cut")))
    (tmp_path / "cut").mkdir()
    for round_index in range(cut_after):
        cut.step(round_index)
        cut.save_checkpoint(round_index + 1, tmp_path / "cut")
    resumed = Simulation.resume(tmp_path / "cut")
    resumed.run(progress=False)
    return whole, resumed


def test_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """The moments are checkpointed with the global state: a run resumed after round 2 ends bit for bit
    where the uninterrupted run ends (tensors and moments)."""
    cfg = small_config("fedit", rounds=4, server_optimizer="fedadam", server_lr=0.01, dp_noise_multiplier=1.0,
                       dp_noise_seed=3)
    uninterrupted, resumed = uninterrupted_and_resumed(cfg, tmp_path)
    for name, tensor in uninterrupted.state.tensors.items():
        assert torch.equal(resumed.state.tensors[name], tensor), name
    a, b = uninterrupted.state.info["server_optimizer"], resumed.state.info["server_optimizer"]
    assert b.keys() == {"m", "v"}
    for slot in ("m", "v"):
        assert a[slot].keys() == b[slot].keys()
        assert all(torch.equal(a[slot][n], b[slot][n]) for n in a[slot])


@pytest.mark.parametrize("changes, expected", [
    ({"method": "flora"}, "server_optimizer 'fedadam' steps from an average of same-shaped uploads at one rank"),
    ({"method": "hetlora", "client_ranks": (4, 2, 1)}, "got method 'hetlora' with ranks [4, 2, 1]"),
    ({"method": "fedit", "client_ranks": (4, 2, 1)}, "got method 'fedit' with ranks [4, 2, 1]"),
    ({"method": "lora_a2"}, "got method 'lora_a2'"),
    ({"method": "fedex_lora"}, "got method 'fedex_lora'"),
    ({"method": "standalone"}, "got method 'standalone'"),
    ({"method": "centralized"}, "got method 'centralized'"),
    ({"method": "fedit", "server_optimizer": "adam"}, "server_optimizer must be one of none, fedavgm, fedadam"),
    ({"method": "fedit", "server_tau": 0.0}, "server_tau must be > 0, got 0.0"),
])
def test_refusals_are_one_line(changes, expected):
    values = {"server_optimizer": "fedadam", **changes}
    with pytest.raises(ValueError) as error:
        Simulation(small_config(**values))
    message = str(error.value)
    assert expected in message and "\n" not in message
    if "steps from" in expected or "got method" in expected:
        assert "set server_optimizer = \"none\"" in message


def test_flower_takes_the_same_step():
    """A Flower run (the same Server, so the same step) ends bit for bit where the simulator does, with
    DP-FedAvg noising the aggregate the step starts from."""
    pytest.importorskip("flwr")
    from test_flower import assert_same_run, run_flower, small

    from fedlora_ext.federated import simulate

    cfg = small("fedit", server_optimizer="fedyogi", server_lr=0.01, server_dp_noise_multiplier=0.5,
                participation=0.67, rounds=3, dp_noise_seed=9)
    sim = simulate(cfg, progress=False)
    flower, _ = run_flower(cfg)
    assert_same_run(sim, flower)
    a, b = sim.state.info["server_optimizer"], flower.state.info["server_optimizer"]
    assert all(torch.equal(a[s][n], b[s][n]) for s in ("m", "v") for n in a[s])


def test_export_equals_the_global_model(tmp_path):
    """`fedlora export` of a FedAdam run (the moments in the checkpoint's info) gives the server's model."""
    from transformers import AutoModelForSequenceClassification
    from test_export import EXACT, logits, max_diff, run

    from fedlora_ext.app.export import export_run

    sim = run(tmp_path / "run", server_optimizer="fedadam", server_lr=0.01)
    export_run(tmp_path / "run", "merged", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), logits(sim.global_model(), sim.test_data)) <= EXACT
