"""Fed-SB (arXiv 2502.15436, over LoRA-SB): dW = s B R A with B and A fixed from the run's shared seed,
clients train and upload only R [r, r] (and the head), the server averages R. The server's rule is
recomputed here in float64 from the recorded uploads, with and without DP-SGD; R's per-sample gradients
are checked against one autograd call per sample; the export carries s B R A as B' = B R."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fedlora_ext.core import adapters
from fedlora_ext.data import build_model
from fedlora_ext.dp import PerSampleGradients, summed_loss
from fedlora_ext.federated import FedConfig, Simulation
from fedlora_ext.federated.comm import payload_bytes
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import TARGETS, fedavg_p, lora_scale, relative_error, run_recorded, small_config

DP = pytest.mark.parametrize("dp", [False, True], ids=["no_dp", "dp_sgd"])


@functools.lru_cache(maxsize=None)
def recorded(dp: bool):
    """Three rounds, two of three clients per round, IID, rank 4."""
    changes = dict(dp_noise_multiplier=1.0, dp_noise_seed=3, dp_max_grad_norm=1.0) if dp else {}
    config = small_config("fed_sb", rank=4, num_clients=3, participation=0.67, rounds=3, local_steps=3, **changes)
    return config, *run_recorded(config)


def _modules(rec) -> list[str]:
    return sorted(next(iter(rec.finished.values())))


@DP
def test_only_R_trains_and_B_A_are_one_fixed_orthonormal_frame(dp):
    """On every client A and B stay bit for bit what the server holds, which never changes; R moves.
    B has orthonormal columns, A orthonormal rows, and R starts at 0 (dW = 0 at the start)."""
    config, sim, rec = recorded(dp)
    first = rec.rounds[0].before.tensors
    eye = torch.eye(config.rank, dtype=torch.float64)
    for module in _modules(rec):
        A, B = first[f"{module}.lora_A"].double(), first[f"{module}.lora_B"].double()
        torch.testing.assert_close(B.T @ B, eye, rtol=0, atol=1e-6)
        torch.testing.assert_close(A @ A.T, eye, rtol=0, atol=1e-6)
        assert not first[f"{module}.lora_R"].any()
    for record in rec.rounds:
        for name, t in first.items():
            if name.endswith(("lora_A", "lora_B")):
                assert torch.equal(record.before.tensors[name], t) and torch.equal(record.after.tensors[name], t)
    for (round_index, cid), views in rec.finished.items():
        moved = False
        for module, view in views.items():
            start = rec.started[(round_index, cid)][module]
            assert torch.equal(view.A, first[f"{module}.lora_A"]) and torch.equal(start.A, view.A)
            assert torch.equal(view.B, first[f"{module}.lora_B"]) and torch.equal(start.B, view.B)
            assert torch.equal(start.R, rec.rounds[round_index].before.tensors[f"{module}.lora_R"])
            moved |= not torch.equal(view.R, start.R)
        assert moved, f"round {round_index}, client {cid}: R never moved"


def test_the_frame_comes_from_the_shared_seed():
    """Every party derives the same B and A from the run's seed (nothing of them is sent); another seed
    gives another frame."""
    def frame(seed):
        state = Simulation(small_config("fed_sb", seed=seed)).state.tensors
        return {n: t for n, t in state.items() if n.endswith(("lora_A", "lora_B"))}
    a, b, other = frame(0), frame(0), frame(1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], other[n]) for n in a)


@DP
def test_server_averages_R_and_the_update_is_exact(dp):
    """R = sum_k p_k R_k and head = sum_k p_k head_k (float64 oracle from the uploads), and the global
    update s B R A equals sum_k p_k s B R_k A."""
    config, sim, rec = recorded(dp)
    s = lora_scale(config, config.rank)
    for record in rec.rounds:
        p = fedavg_p(record.replies)
        for name in record.replies[0].tensors:
            expected = sum(p[k] * reply.tensors[name].double() for k, reply in enumerate(record.replies))
            torch.testing.assert_close(record.after.tensors[name].double(), expected, rtol=1e-6, atol=1e-8)
        for module in _modules(rec):
            A = record.before.tensors[f"{module}.lora_A"].double()
            B = record.before.tensors[f"{module}.lora_B"].double()
            each = sum(p[k] * s * B @ r.tensors[f"{module}.lora_R"].double() @ A for k, r in enumerate(record.replies))
            got = s * B @ record.after.tensors[f"{module}.lora_R"].double() @ A
            assert relative_error(got, each) < 1e-6  # the float32 rounding of R only
            assert got.abs().max() > 0


@DP
def test_upload_and_download_are_r_squared_per_module(dp):
    """A client sends R (exactly what it trained) and the head, and receives the same: r^2 floats per
    module whatever the layer's width."""
    config, sim, rec = recorded(dp)
    modules = _modules(rec)
    for record in rec.rounds:
        heads = sum(t.numel() * 4 for n, t in record.before.tensors.items() if n.startswith("head."))
        expected = len(modules) * config.rank ** 2 * 4 + heads
        for reply in record.replies:
            finished = rec.finished[(record.index, reply.cid)]
            assert {n for n in reply.tensors if not n.startswith("head.")} == {f"{m}.lora_R" for m in modules}
            for module, view in finished.items():
                assert torch.equal(reply.tensors[f"{module}.lora_R"], view.R)
            assert payload_bytes(reply.tensors) == expected
            assert sim.ledger.rounds[record.index]["up"][reply.cid] == expected
            assert sim.ledger.rounds[record.index]["down"][reply.cid] == expected


@pytest.mark.parametrize("family,task", [("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
                                         ("tiny-llama", "causal_lm")])
def test_per_sample_gradients_of_R_equal_one_backward_per_sample(family, task):
    spec = adapters.AdapterSpec(rank=4, alpha=8.0, target_modules=TARGETS[family], latent=True)
    model = adapters.attach_adapter(build_model(family, task, 3, seed=0), spec,
                                    "SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    adapters.set_trainable(model, A=False, B=False, R=True, head=True)
    params = adapters.trainable_parameters(model)
    assert any(n.endswith("lora_R") for n in params) and not any(n.endswith(("lora_A", "lora_B")) for n in params)
    ids = torch.randint(5, 60, (5, 7), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 3, (5,), generator=gen) if task == "classification" else ids.clone()}
    with PerSampleGradients(model, params.values()) as collector:
        summed_loss(model, batch).backward()
    for j, (name, param) in enumerate(params.items()):
        want = torch.stack([torch.autograd.grad(summed_loss(model, {k: v[i:i + 1] for k, v in batch.items()}), param)[0]
                            for i in range(5)])
        torch.testing.assert_close(collector.grad_samples[j], want, rtol=1e-4, atol=1e-6, msg=name)


def _logits(model, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data[:16]["input_ids"], attention_mask=data[:16]["attention_mask"]).logits.float()


def test_export_carries_s_B_R_A_as_an_ordinary_adapter(tmp_path):
    """GPT-2 (Conv1D, fan_in_fan_out): the peft export holds B' = B R with A and no R, s B' A = s B R A of
    the server (float64), and both exports compute what the run's global model computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora_ext.app.export import export_run

    folder = tmp_path / "run"
    config = FedConfig(method="fed_sb", model="tiny-gpt2", task="causal_lm", target_modules=("c_attn",), rank=4,
                       alpha=8.0, num_clients=3, rounds=2, local_steps=3, batch_size=16, lr=3e-2, num_examples=96,
                       seq_len=12, dirichlet_alpha=None, seed=0, device="cpu", out_dir=str(folder))
    torch.manual_seed(0)
    sim = Simulation(config)
    sim.run(progress=False)
    reference = _logits(sim.global_model(), sim.test_data)
    export_run(folder, "peft", tmp_path / "peft")
    export_run(folder, "merged", tmp_path / "merged")
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert not any(".R." in n for n in saved)
    s = lora_scale(config, config.rank)
    state = sim.state.tensors
    modules = sorted(n.rsplit(".", 1)[0] for n in state if n.endswith(".lora_R"))
    for module in modules:
        A = saved[f"base_model.model.{module}.lora_A.weight"].double()
        B_folded = saved[f"base_model.model.{module}.lora_B.weight"].double()
        want = s * state[f"{module}.lora_B"].double() @ state[f"{module}.lora_R"].double() @ state[f"{module}.lora_A"].double()
        assert relative_error(s * B_folded @ A, want) < 1e-6  # B' = B R rounded to float32
        assert want.abs().max() > 0
    base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "peft"))
    assert float((_logits(peft, sim.test_data) - reference).abs().max()) <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert float((_logits(merged, sim.test_data) - reference).abs().max()) <= 1e-5


def test_dp_fedavg_moves_only_R_and_the_head():
    torch.manual_seed(0)
    sim = Simulation(small_config("fed_sb", rounds=1, local_steps=2, server_dp_noise_multiplier=0.5))
    before = {n: t.clone() for n, t in sim.state.tensors.items()}
    sim.step(0)
    for name, t in before.items():
        assert torch.equal(sim.state.tensors[name], t) == name.endswith(("lora_A", "lora_B")), name


@pytest.mark.parametrize("changes, needle", [
    ({"adapter": "vera"}, "method 'fed_sb' supports adapters ('lora',), got 'vera'"),
    ({"client_ranks": (4, 2, 2)}, "method 'fed_sb' cannot take heterogeneous client ranks [4, 2, 2]"),
])
def test_bad_configuration_is_one_line(changes, needle):
    with pytest.raises(ValueError) as error:
        Simulation(small_config("fed_sb", **changes))
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_server_adam_steps_R_and_the_head_from_the_average():
    """FedAdam over Fed-SB's average (Reddi et al., Algorithm 2: m_0 = 0, v_0 = tau^2, no bias
    correction), recomputed in float64: x1 = x0 + lr m / (sqrt(v) + tau), m = (1 - b1) d,
    v = b2 tau^2 + (1 - b2) d^2; B and A untouched."""
    lr, b1, b2, tau = 0.5, 0.9, 0.99, 1e-3
    config = small_config("fed_sb", rounds=1, local_steps=2, server_optimizer="fedadam", server_lr=lr,
                          server_beta1=b1, server_beta2=b2, server_tau=tau)
    sim, rec = run_recorded(config)
    record = rec.rounds[0]
    for name, x0 in record.before.tensors.items():
        got = sim.state.tensors[name].double()
        if name.endswith(("lora_A", "lora_B")):
            assert torch.equal(sim.state.tensors[name], x0)
            continue
        d = record.after.tensors[name].double() - x0.double()
        m, v = (1 - b1) * d, b2 * tau ** 2 + (1 - b2) * d * d
        torch.testing.assert_close(got, x0.double() + lr * m / (v.sqrt() + tau), rtol=1e-5, atol=1e-7)
