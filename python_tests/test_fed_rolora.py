"""RoLoRA (arXiv 2502.01755): rounds 1, 3, ... train and average B (A frozen), rounds 2, 4, ... A (B
frozen); the upload is the trained factor and the head; the server's rule is recomputed here in float64
from the recorded uploads, with and without DP-SGD."""

from __future__ import annotations

import functools

import pytest
import torch

from fedlora_ext.federated.comm import payload_bytes
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import assert_alternating_freeze, fedavg_p, lora_scale, pristine_weights, run_recorded, small_config

TRAINED = {0: "B", 1: "A"}  # round index % 2 -> the factor trained (rounds 1, 3, ... train B)


@functools.lru_cache(maxsize=None)
def recorded(dp: bool):
    """Four rounds, two of three clients per round (so clients skip rounds), IID, rank 4."""
    changes = dict(dp_noise_multiplier=1.0, dp_noise_seed=3, dp_max_grad_norm=1.0) if dp else {}
    config = small_config("rolora", rank=4, num_clients=3, participation=0.67, rounds=4, local_steps=3, **changes)
    return config, *run_recorded(config)


DP = pytest.mark.parametrize("dp", [False, True], ids=["no_dp", "dp_sgd"])


@DP
def test_one_factor_trains_per_round_and_the_other_is_bitwise_frozen(dp):
    config, sim, rec = recorded(dp)
    assert len(rec.rounds) == 4
    assert_alternating_freeze(rec)  # rounds 1, 3 train B; 2, 4 train A; the other bitwise frozen


@DP
def test_server_sets_the_trained_factor_to_the_fedavg_of_the_uploads(dp):
    """X = sum_k p_k X_k (float64 oracle from the uploads) for the trained factor and the head, and the
    effective update is exact: s (sum_k p_k B_k) A = sum_k p_k s B_k A."""
    config, sim, rec = recorded(dp)
    s = lora_scale(config, config.rank)
    for record in rec.rounds:
        trained = f"lora_{TRAINED[record.index % 2]}"
        p = fedavg_p(record.replies)
        names = sorted(record.replies[0].tensors)
        assert any(n.endswith(trained) for n in names) and any(n.startswith("head.") for n in names)
        for name in names:
            expected = sum(p[k] * reply.tensors[name].double() for k, reply in enumerate(record.replies))
            torch.testing.assert_close(record.after.tensors[name].double(), expected, rtol=1e-6, atol=1e-7)
        modules = {n.rsplit(".", 1)[0] for n in names if n.endswith(trained)}
        for module in modules:
            A_of = lambda t: t.get(f"{module}.lora_A", record.before.tensors[f"{module}.lora_A"])  # noqa: E731
            B_of = lambda t: t.get(f"{module}.lora_B", record.before.tensors[f"{module}.lora_B"])  # noqa: E731
            each = sum(p[k] * s * (B_of(r.tensors).double() @ A_of(r.tensors).double())
                       for k, r in enumerate(record.replies))
            after = s * (record.after.tensors[f"{module}.lora_B"].double() @ record.after.tensors[f"{module}.lora_A"].double())
            torch.testing.assert_close(after, each, rtol=1e-6, atol=1e-8)


@DP
def test_upload_is_the_trained_factor_and_the_head_and_its_bytes(dp):
    config, sim, rec = recorded(dp)
    pristine = pristine_weights(config)
    for record in rec.rounds:
        factor = TRAINED[record.index % 2]
        for reply in record.replies:
            finished = rec.finished[(record.index, reply.cid)]
            heads = rec.heads[(record.index, reply.cid)]
            assert {n for n in reply.tensors if not n.startswith("head.")} == {f"{m}.lora_{factor}" for m in finished}
            expected = sum(t.numel() * 4 for t in heads.values())
            for module, view in finished.items():
                assert torch.equal(reply.tensors[f"{module}.lora_{factor}"], getattr(view, factor))
                out_features, in_features = pristine[module].shape  # nn.Linear: [out, in]
                expected += config.rank * (out_features if factor == "B" else in_features) * 4
            assert payload_bytes(reply.tensors) == expected
            assert sim.ledger.rounds[record.index]["up"][reply.cid] == expected


@DP
def test_every_client_starts_from_the_global_state_and_downloads_only_what_it_lacks(dp):
    """A client that took part in the previous round downloads only the factor updated then (and the
    head); one that skipped it downloads both; either way it trains from exactly the global factors."""
    config, sim, rec = recorded(dp)
    pristine = pristine_weights(config)
    r = config.rank
    both = sum(r * (o + i) * 4 for o, i in (pristine[m].shape for m in rec.finished[(0, rec.rounds[0].replies[0].cid)]))
    skipped = False
    for record in rec.rounds:
        previous = {reply.cid for reply in rec.rounds[record.index - 1].replies} if record.index else set()
        for reply in record.replies:
            started = rec.started[(record.index, reply.cid)]
            for module, view in started.items():
                assert torch.equal(view.A, record.before.tensors[f"{module}.lora_A"])
                assert torch.equal(view.B, record.before.tensors[f"{module}.lora_B"])
            heads = sum(t.numel() * 4 for n, t in record.before.tensors.items() if n.startswith("head."))
            down = sim.ledger.rounds[record.index]["down"][reply.cid]
            if reply.cid in previous:
                updated = TRAINED[(record.index - 1) % 2]
                factor = sum(r * (pristine[m].shape[0] if updated == "B" else pristine[m].shape[1]) * 4
                             for m in started)
                assert down == factor + heads
            else:
                skipped |= record.index > 0
                assert down == both + heads
    assert skipped, "no client skipped a round: the test does not cover that download"


def test_heterogeneous_ranks_are_refused_in_one_line():
    with pytest.raises(ValueError, match="'rolora' cannot take heterogeneous client ranks"):
        from fedlora_ext.federated import Simulation
        Simulation(small_config("rolora", client_ranks=(4, 2, 2)))


def test_dp_fedavg_noises_only_the_trained_factor():
    """Under DP-FedAvg (client-level DP at the server) round 1 moves only B (and the head), round 2 only A."""
    from fedlora_ext.federated import Simulation

    torch.manual_seed(0)
    sim = Simulation(small_config("rolora", rounds=2, local_steps=2, server_dp_noise_multiplier=0.5))
    for round_index, frozen in enumerate(("lora_A", "lora_B")):
        before = {n: t.clone() for n, t in sim.state.tensors.items()}
        sim.step(round_index)
        after = sim.state.tensors
        for name, t in before.items():
            moved = not torch.equal(after[name], t)
            assert moved == (not name.endswith(frozen)), (round_index, name)


def test_server_momentum_steps_only_the_trained_factor_and_the_head():
    """FedAvgM (v = beta v + d, x += lr v, d = average - x) over RoLoRA's aggregate, recomputed in float64:
    round 1 steps B and the head, round 2 A and the head (whose momentum carries round 1's d)."""
    lr, beta = 1.5, 0.9
    config = small_config("rolora", rounds=2, local_steps=2, server_optimizer="fedavgm", server_lr=lr,
                          server_momentum=beta)
    sim, rec = run_recorded(config)
    first, second = rec.rounds
    d1 = {n: first.after.tensors[n].double() - first.before.tensors[n].double() for n in first.replies[0].tensors}
    d2 = {n: second.after.tensors[n].double() - second.before.tensors[n].double() for n in second.replies[0].tensors}
    assert all(n.endswith("lora_B") or n.startswith("head.") for n in d1)
    assert all(n.endswith("lora_A") or n.startswith("head.") for n in d2)
    for name, t in first.before.tensors.items():
        x1 = second.before.tensors[name].double()
        want1 = t.double() + lr * d1[name] if name in d1 else t.double()
        torch.testing.assert_close(x1, want1, rtol=1e-6, atol=1e-7)
        v2 = beta * d1[name] + d2[name] if name in d1 and name in d2 else d2.get(name)
        want2 = x1 + lr * v2 if v2 is not None else x1
        torch.testing.assert_close(sim.state.tensors[name].double(), want2, rtol=1e-6, atol=1e-7)
