"""LoRA-A2 (arXiv 2410.22815): alternating freeze, adaptive rank selection across all modules, masked
upload of the selected rank slices with int32 indices, server update B <- B + sum_k p_k (dB_k * M_k)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fedlora_ext.core import adapters
from fedlora_ext.federated import Simulation
from fedlora_ext.federated.comm import payload_bytes
from fedlora_ext.strategies.lora_a2 import LoRAA2
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import assert_alternating_freeze, fedavg_p, pristine_weights, run_recorded, small_config

TRAINED = {0: "B", 1: "A"}  # round index -> the factor trained (rounds 1, 3, ... train B)


@functools.lru_cache(maxsize=None)
def recorded(budget: float = 1.0, client_budgets: tuple[int, ...] = (), rounds: int = 2):
    config = small_config("lora_a2", rank=4, num_clients=3, rounds=rounds, local_steps=4, lora_a2_budget=budget,
                          client_ranks=client_budgets, dirichlet_alpha=1.0)
    return config, *run_recorded(config)


def _selected(reply, module: str, factor: str) -> list[int]:
    ranks = reply.tensors.get(f"{module}.lora_{factor}_ranks")
    return [] if ranks is None else ranks.tolist()


def _rank_slices(t: torch.Tensor, factor: str, ranks: list[int]) -> torch.Tensor:
    return t[:, ranks] if factor == "B" else t[ranks, :]


def test_alternating_freeze():
    """Round 1 trains B only (every client's A unchanged), round 2 trains A only (B unchanged)."""
    config, sim, rec = recorded()
    assert_alternating_freeze(rec)  # ... and the server changes only the trained factor


def test_client_update_is_masked_to_its_selected_ranks():
    """A client's trained factor moves only in the rank slices it selected (and uploads)."""
    config, sim, rec = recorded()
    for record in rec.rounds:
        factor = TRAINED[record.index]
        for reply in record.replies:
            for module, view in rec.finished[(record.index, reply.cid)].items():
                delta = getattr(view, factor) - getattr(rec.started[(record.index, reply.cid)][module], factor)
                keep = _selected(reply, module, factor)
                others = [i for i in range(config.rank) if i not in keep]
                assert not _rank_slices(delta, factor, others).any(), f"{module}: unselected ranks moved"
                if keep:  # the uploaded slices are exactly the update there
                    torch.testing.assert_close(reply.tensors[f"{module}.lora_{factor}_delta"],
                                               _rank_slices(delta, factor, keep), rtol=0, atol=0)


def test_server_changes_only_selected_rank_slices():
    """Server: X <- X + sum_k p_k dX_k on the union of the selected ranks (no renormalisation), and the
    other rank slices of X are bit-for-bit unchanged."""
    config, sim, rec = recorded()
    for record in rec.rounds:
        factor = TRAINED[record.index]
        p = fedavg_p(record.replies)
        modules = rec.finished[(record.index, record.replies[0].cid)].keys()
        changed_somewhere = False
        for module in modules:
            name = f"{module}.lora_{factor}"
            before, after = record.before.tensors[name], record.after.tensors[name]
            union = sorted({i for r in record.replies for i in _selected(r, module, factor)})
            rest = [i for i in range(config.rank) if i not in union]
            assert torch.equal(_rank_slices(after, factor, rest), _rank_slices(before, factor, rest))
            expected = before.double().clone()
            for k, reply in enumerate(record.replies):
                start = getattr(rec.started[(record.index, reply.cid)][module], factor)
                final = getattr(rec.finished[(record.index, reply.cid)][module], factor)
                expected += p[k] * (final.double() - start.double())
            torch.testing.assert_close(after.double(), expected, rtol=1e-6, atol=1e-7)
            changed_somewhere |= bool(union) and not torch.equal(after, before)
        assert changed_somewhere


def test_upload_bytes_match_the_mask():
    """Upload = selected rank slices (float32) + their int32 indices + the head, nothing else; the
    ledger records exactly that."""
    config, sim, rec = recorded()
    pristine = pristine_weights(config)
    for record in rec.rounds:
        factor = TRAINED[record.index]
        for reply in record.replies:
            expected = 0
            for module, view in rec.finished[(record.index, reply.cid)].items():
                out_features, in_features = pristine[module].shape  # nn.Linear: [out, in]
                slice_numel = out_features if factor == "B" else in_features  # B column [out], A row [in]
                count = len(_selected(reply, module, factor))
                expected += count * slice_numel * 4 + count * 4  # float32 slices + int32 indices
                if count:
                    assert reply.tensors[f"{module}.lora_{factor}_ranks"].dtype == torch.int32
            heads = rec.heads[(record.index, reply.cid)]
            assert heads
            expected += sum(t.numel() * 4 for t in heads.values())
            assert payload_bytes(reply.tensors) == expected
            assert sim.ledger.rounds[record.index]["up"][reply.cid] == expected
            names = set(reply.tensors)
            assert all(n.startswith("head.") or n.endswith((f"lora_{factor}_delta", f"lora_{factor}_ranks"))
                       for n in names), names


@pytest.mark.parametrize("budget, client_budgets", [(1.0, ()), (0.5, ()), (1.0, (2, 1, 3))],
                         ids=["budget1", "budget0.5", "per-client"])
def test_rank_budget_is_respected(budget, client_budgets):
    """Each client selects round(budget * N) ranks in total over the N adapted modules (N = 4 here)."""
    config, sim, rec = recorded(budget, client_budgets, rounds=1)
    n_modules = len(rec.finished[(0, 0)])
    assert n_modules == 4
    for reply in rec.rounds[0].replies:
        b = client_budgets[reply.cid] if client_budgets else budget
        total = sum(len(_selected(reply, m, "B")) for m in rec.finished[(0, reply.cid)])
        assert total == round(b * n_modules)


def test_select_ranks_uses_the_papers_joint_score():
    """S_B[m, i] = ||dB[:, i]|| ||A[i, :]||, top budget * N jointly across modules: a module may get
    several ranks and another none, and a large dB on a small A row loses to a smaller dB on a big row."""
    config = small_config("lora_a2", rank=4, num_clients=2, rounds=1, lora_a2_budget=1.0)
    sim = Simulation(config)
    model = sim.bench.model(config.rank)
    layers = adapters.adapter_layers(model)
    modules = list(layers)
    start = {}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for j, module in enumerate(modules):
            A = layers[module].lora_A["default"].weight
            B = layers[module].lora_B["default"].weight
            A.copy_(torch.nn.functional.normalize(torch.randn(A.shape, generator=gen), dim=1))  # unit rows
            start[f"{module}.lora_B"] = B.detach().clone()
            dB = torch.nn.functional.normalize(torch.randn(B.shape, generator=gen), dim=0)  # unit columns
            B.add_(dB * 0.01)  # score 0.01 everywhere, except:
        # module 0: three strong ranks (scores ~1, 0.9, 0.8); module 1: rank 0 (~0.5) is the fourth, and
        # rank 2 has the largest dB of all but sits on a row of A near zero
        B0 = layers[modules[0]].lora_B["default"].weight
        for i, size in [(0, 1.0), (1, 0.9), (3, 0.8)]:
            B0[:, i] += size * torch.nn.functional.normalize(torch.randn(B0.shape[0], generator=gen), dim=0)
        B1 = layers[modules[1]].lora_B["default"].weight
        A1 = layers[modules[1]].lora_A["default"].weight
        B1[:, 2] += 5.0 * torch.nn.functional.normalize(torch.randn(B1.shape[0], generator=gen), dim=0)
        A1[2] *= 1e-3  # score ~5e-3: below even the 0.01 background
        B1[:, 0] += 0.5 * torch.nn.functional.normalize(torch.randn(B1.shape[0], generator=gen), dim=0)
    # expected scores, plain torch: ||dB_i|| * ||A_i||
    scores = []
    for module in modules:
        A = layers[module].lora_A["default"].weight.detach()
        dB = layers[module].lora_B["default"].weight.detach() - start[f"{module}.lora_B"]
        scores.append(torch.linalg.norm(dB, dim=0) * torch.linalg.norm(A, dim=1))
    flat = torch.cat(scores)
    keep = math.floor(config.lora_a2_budget * len(modules) + 0.5)
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.argsort(descending=True)[:keep]] = True
    masks = LoRAA2.select_ranks(model, start, "lora_B", config.lora_a2_budget)
    got = torch.cat([masks[m] for m in modules])
    assert torch.equal(got, expected)
    assert masks[modules[0]].tolist() == [True, True, False, True]
    assert masks[modules[1]].tolist() == [True, False, False, False]
    assert not masks[modules[2]].any() and not masks[modules[3]].any()
