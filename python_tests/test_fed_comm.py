"""Communication accounting: the bytes each client uploads and downloads per round are exactly what the
method sends (METHODS.md, upload / download columns), computed here from the layer shapes of a freshly
built model: float32 factors r (m + n) per adapted layer, the classification head, FLoRA / FedEx stacks."""

from __future__ import annotations

import functools

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora_ext.data import build_model
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import run_recorded, small_config

F32 = 4
MODELS = {"tiny-bert": "classification", "tiny-gpt2": "causal_lm"}


def layer_shapes(config) -> list[tuple[int, int]]:
    """(m, n) = (out, in) of every adapted layer, read off the plain transformers model."""
    model = build_model(config.model, config.task, config.num_labels, config.seed)
    shapes = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in config.target_modules:
            if isinstance(module, Conv1D):
                n, m = module.weight.shape  # GPT-2 stores [in, out]
            else:
                assert isinstance(module, nn.Linear)
                m, n = module.weight.shape
            shapes.append((m, n))
    return shapes


def head_bytes(config) -> int:
    """The classification head peft trains and exchanges (``classifier`` / ``score``); none for causal LM."""
    if config.task != "classification":
        return 0
    model = build_model(config.model, config.task, config.num_labels, config.seed)
    return sum(p.numel() * F32 for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score"))


@functools.lru_cache(maxsize=None)
def run(method: str, model: str, **changes):
    config = small_config(method, model=model, task=MODELS[model], rounds=2, local_steps=2, **changes)
    sim, rec = run_recorded(config)
    return config, sim


def _per_client(sim, round_index: int, direction: str) -> dict[int, int]:
    return sim.ledger.rounds[round_index][direction]


@pytest.mark.parametrize("model", list(MODELS))
def test_fedit_bytes(model):
    """FedIT: up and down are r (m + n) floats per layer plus the head."""
    config, sim = run("fedit", model)
    expected = sum(config.rank * (m + n) * F32 for m, n in layer_shapes(config)) + head_bytes(config)
    if model == "tiny-bert":
        assert expected == 4 * 4 * 64 * 4 + (4 * 32 + 4) * 4  # 4 layers of 32x32 at r = 4, head 4x32 + 4
    for round_index in range(2):
        for direction in ("up", "down"):
            per_client = _per_client(sim, round_index, direction)
            assert per_client == {c.cid: expected for c in sim.clients}
    assert sim.ledger.total("up") == sum(h["bytes_up"] for h in sim.history) == 2 * 3 * expected


@pytest.mark.parametrize("model", list(MODELS))
def test_ffa_bytes(model):
    """FFA-LoRA: only B (r m per layer) and the head travel; A comes from the shared seed."""
    config, sim = run("ffa_lora", model)
    expected = sum(config.rank * m * F32 for m, n in layer_shapes(config)) + head_bytes(config)
    for round_index in range(2):
        assert set(_per_client(sim, round_index, "up").values()) == {expected}
        assert set(_per_client(sim, round_index, "down").values()) == {expected}


@pytest.mark.parametrize("model", list(MODELS))
def test_fedsa_bytes(model):
    """FedSA-LoRA: only A (r n per layer) travels; B and the head stay on the client."""
    config, sim = run("fedsa_lora", model)
    expected = sum(config.rank * n * F32 for m, n in layer_shapes(config))
    for round_index in range(2):
        assert set(_per_client(sim, round_index, "up").values()) == {expected}
        assert set(_per_client(sim, round_index, "down").values()) == {expected}


@pytest.mark.parametrize("model", list(MODELS))
def test_fedex_bytes(model):
    """FedEx-LoRA: up r (m + n); down r (m + n) plus, after a merge, the residual in factored form:
    (K + 1) r (m + n) per layer for K clients."""
    config, sim = run("fedex_lora", model)
    shapes = layer_shapes(config)
    factors = sum(config.rank * (m + n) * F32 for m, n in shapes) + head_bytes(config)
    residual = sum((config.num_clients + 1) * config.rank * (m + n) * F32 for m, n in shapes)
    assert set(_per_client(sim, 0, "up").values()) == {factors}
    assert set(_per_client(sim, 0, "down").values()) == {factors}
    assert set(_per_client(sim, 1, "down").values()) == {factors + residual}


def test_hetlora_bytes():
    """HetLoRA: each client sends and receives r_k (m + n) per layer plus the head."""
    ranks = (4, 2, 1)
    config, sim = run("hetlora", "tiny-bert", rank=4, client_ranks=ranks)
    shapes = layer_shapes(config)
    for round_index in range(2):
        for direction in ("up", "down"):
            assert _per_client(sim, round_index, direction) == {
                cid: sum(r * (m + n) * F32 for m, n in shapes) + head_bytes(config) for cid, r in enumerate(ranks)}


def test_partial_participation_counts_only_participants():
    config, sim = run("fedit", "tiny-bert", num_clients=4, participation=0.5)
    for round_index, metrics in enumerate(sim.history):
        assert sorted(_per_client(sim, round_index, "up")) == metrics["clients"]
        assert len(metrics["clients"]) == 2


def test_lora_a2_downloads_only_the_factor_updated_last_round():
    """LoRA-A2: round 1 sends A, B and the head; a client that took part in round 1 then receives only
    B (trained in round 1) and the head, since A did not change and it kept its copy of it."""
    config, sim = run("lora_a2", "tiny-bert")
    shapes = layer_shapes(config)
    both = sum(config.rank * (m + n) * F32 for m, n in shapes) + head_bytes(config)
    only_b = sum(config.rank * m * F32 for m, n in shapes) + head_bytes(config)
    assert _per_client(sim, 0, "down") == {c.cid: both for c in sim.clients}
    assert _per_client(sim, 1, "down") == {c.cid: only_b for c in sim.clients}
    for client in sim.clients:  # round 2 trained A: the client kept the frozen B, still the global one
        kept = {n: t for n, t in client.tensors.items() if n.endswith("lora_B")}
        assert kept and all((t == sim.state.tensors[n]).all() for n, t in kept.items())


@pytest.mark.parametrize("model", list(MODELS))
def test_rolora_sends_the_trained_factor(model):
    """RoLoRA: round 1 uploads B (r m per layer) and the head, round 2 A (r n per layer) and the head; the
    first download is both factors, the second only B, which round 1 updated (the client kept A)."""
    config, sim = run("rolora", model)
    shapes, head = layer_shapes(config), head_bytes(config)
    b = sum(config.rank * m * F32 for m, n in shapes) + head
    a = sum(config.rank * n * F32 for m, n in shapes) + head
    everyone = [c.cid for c in sim.clients]
    assert _per_client(sim, 0, "up") == dict.fromkeys(everyone, b)
    assert _per_client(sim, 1, "up") == dict.fromkeys(everyone, a)
    assert _per_client(sim, 0, "down") == dict.fromkeys(everyone, a + b - head)
    assert _per_client(sim, 1, "down") == dict.fromkeys(everyone, b)


@pytest.mark.parametrize("model", list(MODELS))
def test_fed_sb_sends_r_squared_per_layer_whatever_its_width(model):
    """Fed-SB: up and down are R, r^2 floats per layer whatever (m, n) is (tiny-bert's 32 x 32 layers and
    GPT-2's 96 x 32 c_attn alike), plus the head."""
    config, sim = run("fed_sb", model)
    expected = len(layer_shapes(config)) * config.rank ** 2 * F32 + head_bytes(config)
    for round_index in range(2):
        for direction in ("up", "down"):
            assert _per_client(sim, round_index, direction) == {c.cid: expected for c in sim.clients}


@pytest.mark.parametrize("model", list(MODELS))
def test_flexlora_sends_each_clients_rank(model):
    """FlexLoRA: client k sends and receives r_k (m + n) per layer plus the head, whatever the global
    adapter's rank (here 7 = 4 + 2 + 1): the download is the rank-r_k truncation, never the global."""
    ranks = (4, 2, 1)
    config, sim = run("flexlora", model, rank=7, client_ranks=ranks)
    shapes, head = layer_shapes(config), head_bytes(config)
    for round_index in range(2):
        for direction in ("up", "down"):
            assert _per_client(sim, round_index, direction) == {
                cid: sum(r * (m + n) * F32 for m, n in shapes) + head for cid, r in enumerate(ranks)}


@pytest.mark.parametrize("model", list(MODELS))
def test_fedsvd_downloads_a_after_a_refactorisation(model):
    """FedSVD (svd_period 1): B (r m per layer) and the head up every round and down in round 1 (A comes
    from the shared seed); round 2's download adds the re-factorised A, r n per layer."""
    config, sim = run("fedsvd", model, svd_period=1)
    shapes, head = layer_shapes(config), head_bytes(config)
    b = sum(config.rank * m * F32 for m, n in shapes) + head
    a = sum(config.rank * n * F32 for m, n in shapes)
    everyone = [c.cid for c in sim.clients]
    assert _per_client(sim, 0, "up") == _per_client(sim, 1, "up") == dict.fromkeys(everyone, b)
    assert _per_client(sim, 0, "down") == dict.fromkeys(everyone, b)
    assert _per_client(sim, 1, "down") == dict.fromkeys(everyone, a + b)
