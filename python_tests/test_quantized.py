"""Quantised bases (QLoRA, ``--quantize nf4 | fp4 | int8``): what loads in 4 or 8 bits and what stays float,
per-sample gradients over a bitsandbytes base against one autograd call per sample, runs with and without
DP-SGD, the refusals (no bitsandbytes, a tiny in-code model, a method that merges into the base), the
merged export (dequantised, computing what the run computed), and bitsandbytes kept out of float runs.

bitsandbytes quantises blocks of 64 weights, so the models here are small folders written by the tests
(hidden size 128) rather than the in-code tiny models (hidden size 32).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from fedtools import fedlora, one_error_line

from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.device import cpu_flags
from fedlora_ext.data import quantized
from fedlora_ext.data.tiny_models import build_model
from fedlora_ext.dp import PerSampleGradients, summed_loss
from fedlora_ext.strategies.base import make_strategy

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason='bitsandbytes is not installed (pip install "fedlora_ext[quantization]")')
KINDS = ("nf4", "fp4", "int8")


def _save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    import transformers as tf

    config = tf.BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=256, max_position_embeddings=64, num_labels=4)
    torch.manual_seed(0)
    return _save(tf.BertForSequenceClassification(config), tmp_path_factory.mktemp("bert128"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return _save(tf.LlamaForCausalLM(config), tmp_path_factory.mktemp("llama128"))


def _config(folder, **changes) -> FedConfig:
    values = dict(method="fedit", model=folder, quantization="nf4", rounds=2, local_steps=2, num_clients=2,
                  num_examples=32, seq_len=8, rank=4, batch_size=8, lr=0.05, eval_examples=8, device="cpu")
    return FedConfig(**{**values, **changes})


# --- refusals, in one line -------------------------------------------------------------------------------

def test_missing_bitsandbytes_names_the_extra(monkeypatch, bert_folder):
    monkeypatch.setattr(quantized, "bitsandbytes_installed", lambda: False)
    with pytest.raises(ValueError, match=r'quantization .nf4. needs bitsandbytes.*pip install "fedlora_ext\[quantization\]"'):
        quantized.require_bitsandbytes("nf4")
    quantized.require_bitsandbytes("none")  # a float base never asks for it


def test_tiny_model_and_unknown_kind_are_refused(tmp_path):
    done = fedlora("simulate", "--quantize", "nf4", "--set", "rounds=1", cwd=tmp_path)
    line = one_error_line(done, "tiny model 'tiny-bert'", "--model PATH")
    assert "64-wide blocks" in line
    done = fedlora("simulate", "--quantize", "nf3", cwd=tmp_path)
    one_error_line(done, "quantization must be one of none, nf4, fp4, int8, got 'nf3'")


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_that_is_not_there_is_one_line(tmp_path):
    done = fedlora("simulate", "--model", "minilm", "--quantize", "nf4", "--device", "cuda", "--set", "rounds=1",
                   cwd=tmp_path)
    one_error_line(done, "device 'cuda'", "no usable GPU to load the nf4 base onto", "--device cpu")


@pytest.mark.parametrize("method", ["flora", "fedex_lora"])
def test_methods_that_merge_into_the_base_are_refused(method):
    with pytest.raises(ValueError, match=f"method '{method}' merges each round's update into the base weights, "
                                         "which a nf4 base cannot hold exactly"):
        make_strategy(FedConfig(method=method, quantization="nf4"))
    make_strategy(FedConfig(method=method))  # a float base is fine


# --- what is quantised ----------------------------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_linear_layers_load_quantised_and_the_rest_stays_float(bert_folder, kind):
    model = build_model(bert_folder, "classification", 4, quantization=kind, device="cpu")
    names = quantized.quantized_modules(model)
    assert "bert.encoder.layer.0.attention.self.query" in names and len(names) == 2 * 6 + 1  # + the pooler
    assert type(model.classifier) is torch.nn.Linear  # the head trains in float32: never quantised
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # QLoRA's compute dtype
    spec = adapters.AdapterSpec(rank=4, target_modules=("query", "value"))
    peft_model = adapters.attach_adapter(model, spec, "SEQ_CLS")
    adapters.trainables_to_float32(peft_model)
    trainables = adapters.trainable_parameters(peft_model)
    assert trainables and all(p.dtype == torch.float32 for p in trainables.values())
    assert any(n.endswith("query.lora_A") for n in adapters.shared_parameters(peft_model))


# --- per-sample gradients over a quantised base ------------------------------------------------------------

def _reference(model, params, batch):
    rows = []
    for i in range(len(batch["labels"])):
        one = {k: v[i: i + 1] for k, v in batch.items()}
        rows.append(torch.autograd.grad(summed_loss(model, one), params))
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_per_sample_gradients_over_a_quantised_base_equal_autograd(bert_folder, llama_folder, kind, task):
    folder = bert_folder if task == "classification" else llama_folder
    # float32 compute: the hooks and the reference then see the same float32 arithmetic
    model = build_model(folder, task, 4, quantization=kind, dtype=torch.float32, device="cpu")
    targets = ("query", "value") if task == "classification" else ("q_proj", "v_proj")
    peft_model = adapters.attach_adapter(model, adapters.AdapterSpec(rank=4, alpha=8.0, target_modules=targets),
                                         "SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    adapters.trainables_to_float32(peft_model)
    adapters.reset_adapters(peft_model, 1)
    with torch.no_grad():  # B = 0 at init would hide half of the chain rule
        for p in adapters.adapter_parameters(peft_model).values():
            p.add_(0.1 * torch.randn_like(p))
    peft_model.eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 60, (5, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(0, 4, (5,), generator=gen) if task == "classification" else ids.clone()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    params = list(adapters.trainable_parameters(peft_model).values())
    with PerSampleGradients(peft_model, params) as collector:
        summed_loss(peft_model, batch).backward()
    expected = _reference(peft_model, params, batch)
    # int8 matmuls round their inputs to float16 per call, so a batch and a single sample differ slightly
    tolerance = dict(rtol=2e-2, atol=2e-4) if kind == "int8" else dict(rtol=1e-4, atol=1e-6)
    for name, got, want in zip(adapters.trainable_parameters(peft_model), collector.grad_samples, expected):
        assert got is not None and got.shape[0] == 5, name
        torch.testing.assert_close(got, want, **tolerance, msg=name)


# --- runs --------------------------------------------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("kind,method,dp", [("nf4", "fedit", False), ("nf4", "ffa_lora", True),
                                            ("int8", "fedsa_lora", True), ("fp4", "fedit", False)])
def test_a_quantised_run_trains_with_and_without_dp(bert_folder, kind, method, dp):
    from fedlora_ext.federated import Simulation

    extra = dict(dp_noise_multiplier=1.0, dp_noise_seed=3) if dp else {}
    sim = Simulation(_config(bert_folder, method=method, quantization=kind, **extra))
    start = {n: t.clone() for n, t in sim.state.tensors.items()}
    sim.run(progress=False)
    assert quantized.quantized_modules(sim.bench.base_model)  # still the quantised base after training
    moved = [n for n, t in sim.state.tensors.items() if not torch.equal(t, start[n])]
    assert moved, "no global tensor changed"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sim.state.tensors.values())
    if dp:
        accounts = [client.privacy.account for client in sim.clients]
        assert any(a.steps > 0 for a in accounts) and all(a.epsilon() > 0 for a in accounts if a.steps)


@needs_bnb
def test_a_quantised_run_on_flower_equals_the_simulator(bert_folder):
    """NF4 with DP-SGD through the Flower strategy and ClientApp (in-memory grid): every node loads the
    quantised base from the same folder and the run ends where the simulator's does, bit for bit."""
    pytest.importorskip("flwr")
    from test_flower import assert_same_run, run_flower

    from fedlora_ext.federated.simulation import simulate

    config = _config(bert_folder, method="ffa_lora", num_clients=3, dp_noise_multiplier=1.0, dp_noise_seed=5)
    sim = simulate(config, progress=False)
    flower, _ = run_flower(config)
    assert quantized.quantized_modules(flower.bench.base_model)
    assert_same_run(sim, flower)


@needs_bnb
def test_exports_are_over_the_dequantised_base_and_compute_what_the_run_computed(bert_folder, tmp_path):
    run = tmp_path / "run"
    args = ("--model", bert_folder, "--quantize", "nf4", "--method", "fedit", "--no-dp", "--set", "rounds=2",
            "--set", "num_clients=2", "--set", "num_examples=32", "--set", "seq_len=8", "--set", "local_steps=2",
            "--set", "batch_size=8", "--set", "dataset=synthetic", "--set", "num_labels=4", "--set", "rank=4",
            "--quiet", "--out", str(run), "--log-file", str(run / "run.log"))
    done = fedlora("run", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes" not in done.stderr and "gemm_4bit" not in done.stderr  # a quiet console ...
    if "avx512_bf16" in cpu_flags() and importlib.util.find_spec("kernels") is not None:
        assert "gemm_4bit_forward" in (run / "run.log").read_text()  # ... and bitsandbytes' warning in the log
    assert json.loads((run / "config.json").read_text())["quantization"] == "nf4"
    merged = tmp_path / "merged"
    done = fedlora("export", str(run), "--format", "merged", "--out", str(merged), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    adapter = tmp_path / "peft"  # adapters over the base folder; evaluate loads that base as the run did
    done = fedlora("export", str(run), "--format", "peft", "--out", str(adapter), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scores = []
    for target in (run, merged, adapter):
        out = tmp_path / f"{target.name}.json"
        done = fedlora("evaluate", str(target), "--dataset", "synthetic", "--json", str(out), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        scores.append(json.loads(out.read_text()))
    assert scores[0]["accuracy"] == scores[1]["accuracy"] == scores[2]["accuracy"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-2)  # bfloat16 merges round
    assert scores[0]["loss"] == pytest.approx(scores[2]["loss"], rel=1e-6)  # the same dequantised base


def test_a_float_run_never_imports_bitsandbytes(tmp_path):
    """peft imports bitsandbytes whenever it is installed; on an AVX-512 BF16 CPU that asks the Hub for a
    kernel and prints a warning: a float run must do neither."""
    code = ("import sys\nfrom fedlora_ext.federated import Simulation\nfrom fedlora_ext.core.config import FedConfig\n"
            "Simulation(FedConfig(rounds=1, local_steps=1, num_clients=2, num_examples=16, device='cpu')).run("
            "progress=False)\nprint('bitsandbytes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert "gemm_4bit" not in done.stderr


@needs_bnb
def test_bitsandbytes_warnings_never_reach_the_console(tmp_path):
    """Once opacus is imported the root logger has a console handler; bitsandbytes' and kernels' records
    (a kernel not fetched, the Hub offline) must still stay off the console."""
    code = ("import logging\nlogging.basicConfig()\nfrom fedlora_ext.data.quantized import import_bitsandbytes\n"
            "import_bitsandbytes()\nlogging.getLogger('bitsandbytes.cextension').warning('from bitsandbytes')\n"
            "logging.getLogger('kernels.x').warning('from kernels')\nlogging.getLogger('other').warning('from other')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from other" in done.stderr  # the console handler works ...
    assert "from bitsandbytes" not in done.stderr and "from kernels" not in done.stderr  # ... and they skip it
    assert "gemm_4bit" not in done.stderr
