"""SCAFFOLD (Karimireddy et al., ICML'20, arXiv 1910.06378, option II) over the LoRA parameters.

Recomputed here in float64 from what the clients really trained (``fedtools.Recorder``) and uploaded:
the client rule c_k+ = c_k - c + (x - y) / (K lr) and its upload (y, dc_k = c_k+ - c_k), the server
rule x <- x + lr_g mean_k (y_k - x), c <- c + (1/N) sum_k dc_k, a plain-torch SGD replay of one client's
corrected steps y <- y - lr (g(y) - c_k + c), the correction applied after the DP-SGD noise, the bytes
of the variates, resume and the refusals.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from fedlora_ext.core import adapters
from fedlora_ext.federated import Simulation
from fedlora_ext.federated.client import LocalTrainer, derive_seed
from fedlora_ext.federated.privacy import client_privacy
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import Recorder, small_config

C, C_K, DC = "scaffold.c.", "scaffold.c_k.", "scaffold.dc."
#: float32 training and aggregation against float64 here, relative to the largest value compared:
#: measured <= 1.3e-6 for the variates ((x - y) / (K lr) magnifies y's rounding), <= 1.1e-7 for the server
#: rule and the replay; 1e-5 leaves room, while FedAvg's n_k weights instead of the uniform mean are off
#: by 3.4e-2 and 2.4e-1 in the rounds whose clients' n_k differ, and |S| for N by a factor of 2
TOLERANCE = 1e-5


def scaffold_config(**changes):
    values = dict(optimizer="sgd", lr=0.1, rounds=3, local_steps=4, server_lr=0.8, num_clients=4, participation=0.5,
                  dirichlet_alpha=1.0)  # unequal n_k: the uniform mean differs from FedAvg weights
    return small_config("scaffold", **{**values, **changes})


@functools.lru_cache(maxsize=None)
def recorded(dp: bool = False, schedule: str = "constant"):
    changes = {"dp_noise_multiplier": 1.0, "dp_noise_seed": 4} if dp else {}
    cfg = scaffold_config(lr_schedule=schedule, **changes)
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    variates = []  # per round: every client's c_k before the round (copied), then the run's end
    step = sim.step

    def recording_step(round_index, progress=None):
        variates.append({c.cid: copy.deepcopy(c.tensors) for c in sim.clients})
        return step(round_index, progress)

    sim.step = recording_step
    rec = Recorder(sim)
    sim.run(progress=False)
    variates.append({c.cid: copy.deepcopy(c.tensors) for c in sim.clients})
    return cfg, sim, rec, variates


def trained_factors(rec, round_index: int, cid: int) -> dict[str, torch.Tensor]:
    """A client's A and B by global name as it finished training (read off its peft model)."""
    out = {}
    for module, view in rec.finished[(round_index, cid)].items():
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = view.A, view.B
    return out


def head_name(peft_name: str) -> str:
    """peft's ``base_model.model.<path>.modules_to_save.default.<p>`` as the global state names it."""
    return "head." + peft_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")


def check(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(float(want.abs().max()), 1e-12)
    error = float((got.double() - want).abs().max())
    assert error <= TOLERANCE * scale, f"error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dp, schedule", [(False, "constant"), (False, "cosine"), (True, "constant")],
                         ids=["plain", "cosine", "dp_sgd"])
def test_client_rule_and_upload(dp, schedule):
    """For every client round: c_k+ = c_k - c + (x - y) / (K lr) with K = local_steps and lr the round's
    (cosine: its own), the upload is y and dc_k = c_k+ - c_k and nothing else, and the client keeps c_k+.
    Under DP-SGD the same holds: dc_k is a function of the noised update y - x and public c, K, lr."""
    cfg, sim, rec, variates = recorded(dp, schedule)
    rounds_with_variates, a_moved = 0, False
    for record in rec.rounds:
        t = record.index
        c = record.before.info["scaffold_c"]
        lr = cfg.round_lr(t)
        for reply in record.replies:
            x = record.before.tensors
            y = {n: reply.tensors[n] for n in c}
            own = variates[t][reply.cid]
            c_k = {n: own.get(C_K + n, torch.zeros_like(x[n])).double() for n in c}
            assert set(reply.tensors) == set(c) | {DC + n for n in c}  # y and dc_k of every trained tensor
            assert sorted(c) == sorted(x)  # A, B and the head all train, and each has a variate
            # B and the head move every round; A from zero B moves by less than its float32 spacing in a
            # few SGD steps on some layers (then its variate stays 0), so A is checked over the run below
            assert all(not torch.equal(y[n], x[n]) for n in c if not n.endswith("lora_A"))
            a_moved |= any(not torch.equal(y[n], x[n]) for n in c if n.endswith("lora_A"))
            for name, factor in trained_factors(rec, t, reply.cid).items():
                assert torch.equal(y[name], factor), name  # the upload is what it trained
            for name in c:
                want = c_k[name] - c[name].double() + (x[name].double() - y[name].double()) / (cfg.local_steps * lr)
                check(reply.tensors[DC + name], want - c_k[name])
                check(variates[t + 1][reply.cid][C_K + name], want)  # what it keeps
            rounds_with_variates += any(bool(v.abs().max() > 0) for v in c.values())
    assert rounds_with_variates and a_moved  # later rounds really correct with non-zero variates; A trains


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp_sgd"])
def test_server_rule(dp):
    """x <- x + lr_g (1/|S|) sum_k (y_k - x) (uniform, Algorithm 1) and c <- c + (1/N) sum_k dc_k with
    N = num_clients, |S| = 2 of 4 sampled a round; heads included."""
    cfg, sim, rec, _ = recorded(dp)
    for record in rec.rounds:
        x, c = record.before.tensors, record.before.info["scaffold_c"]
        assert len(record.replies) == 2
        for name in c:
            mean = sum(r.tensors[name].double() for r in record.replies) / len(record.replies)
            check(record.after.tensors[name], x[name].double() + cfg.server_lr * (mean - x[name].double()))
            dc = sum(r.tensors[DC + name].double() for r in record.replies)
            check(record.after.info["scaffold_c"][name], c[name].double() + dc / cfg.num_clients)
    assert sorted(sim.state.info["scaffold_c"]) == sorted(sim.state.tensors)  # a variate per trained tensor


def test_replay_of_one_clients_corrected_sgd_steps():
    """A later round of a client that trained before (so c and c_k are non-zero), replayed in plain torch:
    the same batches and dropout, y <- y - lr (g(y) - c_k + c) per step, ends where the client ended."""
    cfg, sim, rec, variates = recorded()
    record, reply = next((record, r) for record in rec.rounds[1:] for r in record.replies
                         if variates[record.index][r.cid])  # a client with its own c_k already
    t, cid, c = record.index, reply.cid, record.before.info["scaffold_c"]
    c_k = {n: variates[t][cid][C_K + n] for n in c}
    seed = derive_seed(cfg.seed, "client", cid, t)
    model = sim.bench.checkout(cfg.rank, sim.state, seed)
    adapters.write_tensors(model, record.before.tensors)  # x (plumbing: names to peft parameters)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    for p in params.values():
        p.requires_grad_(True)

    def global_name(peft_name: str) -> str:
        if "modules_to_save" in peft_name:
            return head_name(peft_name)
        module, kind = peft_name.removeprefix("base_model.model.").split(".lora_")
        return f"{module}.lora_{kind.split('.')[0]}"

    correction = {n: (c[global_name(n)] - c_k[global_name(n)]).double() for n in params}
    batches = LocalTrainer(cfg, sim.client_data[cid][0], seed, None).batches(cfg.local_steps)  # the data order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout as the client's round draws it
        for batch in batches:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for (name, p), g in zip(params.items(), grads):
                    p.copy_((p.double() - cfg.lr * (g.double() + correction[name])).float())
    for name, p in params.items():
        check(reply.tensors[global_name(name)], p.detach().double())


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp_sgd"])
def test_the_correction_is_added_after_the_dp_step(private):
    """One local step with a correction moves every tensor by exactly -lr * correction more than the same
    step without it (same batch, same noise): the correction is post-processing of the noised gradient."""
    cfg = small_config("fedit", optimizer="sgd", lr=0.1, dp_noise_multiplier=1.0 if private else None,
                       dp_noise_seed=6 if private else None)
    sim = Simulation(cfg)
    ends = []
    for corrected in (False, True):
        model = sim.bench.checkout(cfg.rank, sim.state, 11)
        adapters.set_trainable(model)
        params = adapters.trainable_parameters(model)
        gen = torch.Generator().manual_seed(1)
        correction = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        privacy = client_privacy(cfg, sim.strategy, 0, len(sim.client_data[0][0])) if private else None
        trainer = LocalTrainer(cfg, sim.client_data[0][0], 5, privacy)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            trainer.train(model, steps=1, correction=correction if corrected else None)
        ends.append({n: p.detach().clone() for n, p in params.items()})
    for name, tensor in correction.items():
        torch.testing.assert_close(ends[1][name], ends[0][name] - cfg.lr * tensor, rtol=0, atol=2e-6)


def test_variates_double_the_bytes():
    """Up: y and dc_k, 2 r (m + n) floats per layer plus twice the head; down: x and c, the same."""
    from test_fed_comm import head_bytes, layer_shapes

    cfg, sim, _, _ = recorded()
    fedit = sum(cfg.rank * (m + n) * 4 for m, n in layer_shapes(cfg)) + head_bytes(cfg)
    for t, metrics in enumerate(sim.history):
        for direction in ("up", "down"):
            per_client = sim.ledger.rounds[t][direction]
            assert per_client == {cid: 2 * fedit for cid in metrics["clients"]}


def test_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """c (global state) and every c_k (client files) are checkpointed: resumed after round 2 of 4, the run
    ends bit for bit as the uninterrupted one, DP-SGD included."""
    from test_server_optimizer import uninterrupted_and_resumed

    a, b = uninterrupted_and_resumed(scaffold_config(rounds=4, dp_noise_multiplier=1.0, dp_noise_seed=2), tmp_path)
    for name in a.state.tensors:
        assert torch.equal(a.state.tensors[name], b.state.tensors[name]), name
        assert torch.equal(a.state.info["scaffold_c"][name], b.state.info["scaffold_c"][name]), name
    for x, y in zip(a.clients, b.clients):
        assert sorted(x.tensors) == sorted(y.tensors)
        assert all(torch.equal(x.tensors[n], y.tensors[n]) for n in x.tensors)


@pytest.mark.parametrize("changes, expected", [
    ({"optimizer": "adamw"}, "method 'scaffold' takes SGD local steps"),
    ({"server_dp_noise_multiplier": 1.0}, "method 'scaffold' cannot run under server DP (DP-FedAvg)"),
    ({"server_optimizer": "fedadam"}, "method 'scaffold' takes its own global step (server_lr)"),
    ({"aggregation": "median"}, "method 'scaffold' averages its updates and variates"),
    ({"client_ranks": (4, 2, 1, 1)}, "cannot take heterogeneous client ranks"),
])
def test_refusals_are_one_line(changes, expected):
    with pytest.raises(ValueError) as error:
        Simulation(scaffold_config(**changes))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_export_equals_the_global_model(tmp_path):
    """`fedlora export` of a SCAFFOLD run (c in the global state, c_k in the client files) gives the
    server's model: peft and merged exports compute its logits."""
    from transformers import AutoModelForSequenceClassification
    from test_export import EXACT, load_peft, logits, max_diff, run

    from fedlora_ext.app.export import export_run

    sim = run(tmp_path / "run", method="scaffold", optimizer="sgd", lr=0.5)
    reference = logits(sim.global_model(), sim.test_data)
    export_run(tmp_path / "run", "peft", tmp_path / "peft")
    export_run(tmp_path / "run", "merged", tmp_path / "merged")
    peft = load_peft(tmp_path / "peft", AutoModelForSequenceClassification)
    assert max_diff(logits(peft, sim.test_data), reference) <= EXACT
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), reference) <= EXACT
