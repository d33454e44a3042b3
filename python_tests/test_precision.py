"""Devices and precision of the federated layer: a 16-bit base trains like a float32 one, gradient
checkpointing changes no gradient, every rank shares one set of base weights, and bad settings fail in
one line.

Error budget of a 16-bit base (model_dtype bfloat16 / float16), one round, with and without DP-SGD, with
SGD and with the default optimizer AdamW: every tensor the run produces (global tensors, merged base, each
client's kept tensors), taken together, stays within ``BUDGET`` unit roundoffs ``u`` of the float32 run in
relative L2 norm (bfloat16 u = 2^-8, float16 u = 2^-11). Each budget is 1.8-2.4 times the worst error
measured over every method x tiny-bert, tiny-gpt2, tiny-llama x seeds 0-7 without DP (``python
python_tests/test_precision.py`` measures it again): SGD 4.0 u (bf16), 8.9 u (fp16); AdamW 10.8 u (bf16),
212 u (fp16). AdamW's is looser because its step is normalised per coordinate (its first step is +-lr
whatever the gradient's size), so a small-gradient coordinate, whose gradient rounds with a large relative
error or even changes sign, moves by a wrong step of full size; SGD moves it by lr times the small rounding
error. With DP-SGD the noise is the same draw (same key and offsets) and dominates the small coordinates:
worst measured 0.3 u (SGD), 6.6 u (AdamW); a different draw would miss the budget by orders of magnitude.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import cuda_kernels_available
from fedtools import fedlora, method_extras

from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import GlobalState
from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.data.tiny_models import build_model
from fedlora_ext.dp.per_sample import PerSampleGradients
from fedlora_ext.dp.sgd import summed_loss
from fedlora_ext.federated import Simulation
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.strategies import strategy_names

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
#: one round, 16-bit base against float32, in unit roundoffs of the base's dtype (the module's docstring)
BUDGET = {("sgd", "bfloat16"): 8, ("sgd", "float16"): 16, ("adamw", "bfloat16"): 24, ("adamw", "float16"): 512}
#: SGD at a step large enough to move every tensor; AdamW, the default, at its default learning rate
OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.5}, "adamw": {"optimizer": "adamw", "lr": FedConfig().lr}}


def config(method: str, dtype: str, dp: bool, optimizer: str = "sgd", **changes) -> FedConfig:
    values = dict(method=method, rounds=1, local_steps=2, num_clients=2, num_examples=48, seq_len=8, rank=4,
                  batch_size=8, **OPTIMIZERS[optimizer], eval_examples=8, device="cpu", model_dtype=dtype,
                  dp_noise_multiplier=1.0 if dp else None, dp_noise_seed=3 if dp else None)
    return FedConfig(**{**values, **method_extras(method, two_clients=True), **changes})


def run_tensors(cfg: FedConfig) -> dict[str, torch.Tensor]:
    """Everything one round produces: global tensors, merged base, every client's kept tensors."""
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg)
    sim.run(progress=False)
    out = {f"global/{n}": t for n, t in sim.state.tensors.items()}
    out.update({f"base/{n}": t for n, t in sim.state.base.items()})
    for client in sim.clients:
        out.update({f"client{client.cid}/{n}": t for n, t in client.tensors.items()})
    return {n: t.detach().float().cpu() for n, t in out.items()}


def relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    diff = sum(float(((got[n] - want[n]) ** 2).sum()) for n in want) ** 0.5
    return diff / sum(float((want[n] ** 2).sum()) for n in want) ** 0.5


_FLOAT32: dict = {}


def float32_run(method: str, dp: bool, optimizer: str, **changes) -> dict:
    key = (method, dp, optimizer, tuple(sorted(changes.items())))
    if key not in _FLOAT32:
        _FLOAT32[key] = run_tensors(config(method, "float32", dp, optimizer, **changes))
    return _FLOAT32[key]


def error_in_roundoffs(method: str, dtype: str, dp: bool, optimizer: str, **changes) -> float:
    got = run_tensors(config(method, dtype, dp, optimizer, **changes))
    return relative_error(got, float32_run(method, dp, optimizer, **changes)) / UNIT_ROUNDOFF[dtype]


#: FedSVD is measured before its re-factorisation: A = V_r^T of a one-round update (singular values ~1e-6,
#: gaps ~1e-7 on tiny-bert's query) is as ill-conditioned as that update is small, so the orthonormal A
#: inherits the product's relative error (fp16 SGD: 3-4% in A from 9% in B A, measured) and, with its
#: O(1) norm, dominates the all-tensor error; the float64 re-factorisation adds no roundoff of its own
#: (python_tests/test_fed_fedsvd.py checks it against a dense SVD)
BEFORE_REFACTORISATION = {"fedsvd": {"svd_period": 2}}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("dp", [False, True], ids=["no_dp", "dp"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", strategy_names())
def test_16_bit_base_matches_float32_within_budget(method, dtype, dp, optimizer):
    error = error_in_roundoffs(method, dtype, dp, optimizer, **BEFORE_REFACTORISATION.get(method, {}))
    assert error <= BUDGET[optimizer, dtype], f"{method} {dtype} {optimizer} dp={dp}: {error:.1f} u"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_16_bit_base_other_families(model, optimizer):
    for method, dp in (("fedit", False), ("fedit", True), ("flora", False)):
        error = error_in_roundoffs(method, "bfloat16", dp, optimizer, model=model)
        assert error <= BUDGET[optimizer, "bfloat16"], f"{model} {method} {optimizer} dp={dp}: {error:.1f} u"


def bench(method="fedit", **changes) -> ModelBench:
    cfg = config(method, changes.pop("model_dtype", "float32"), False, model="tiny-llama", **changes)
    return ModelBench(cfg, build_model("tiny-llama", "classification", 4, 0))


def test_16_bit_base_keeps_what_trains_in_float32():
    model = bench(model_dtype="bfloat16").checkout(4, GlobalState(tensors={}), seed=1)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for w in adapters.base_weights(model).values())
    shared = adapters.shared_parameters(model)
    assert any(n.startswith("head.") for n in shared)
    assert {p.dtype for p in shared.values()} == {torch.float32}


def test_every_rank_shares_one_set_of_base_weights():
    flora = bench("flora", client_ranks=(8, 4, 2, 1), num_clients=4)
    models = {r: flora.model(r) for r in (8, 4, 2, 1)}
    storages = {r: {n: w.untyped_storage().data_ptr() for n, w in m.get_base_model().state_dict().items()
                    if "lora_" not in n and "modules_to_save" not in n}
                for r, m in models.items()}
    assert len(storages[8]) > 10 and all(s == storages[8] for s in storages.values())
    q_proj = "model.layers.0.self_attn.q_proj.lora_A"
    assert {adapters.adapter_parameters(m)[q_proj].shape[0] for m in models.values()} == {8, 4, 2, 1}
    live = adapters.base_weights(models[8])
    kept = flora.pristine_base()
    assert kept.keys() == live.keys() and all(kept[n].data_ptr() != live[n].data_ptr() for n in kept), \
        "a merging method keeps a copy of the adapted weights as loaded"
    fedit = bench("fedit")
    live = adapters.base_weights(fedit.model(4))
    assert all(w.data_ptr() == live[n].data_ptr() for n, w in fedit.pristine_base().items()), \
        "a method that never merges keeps no copy: its base weights are the pristine ones"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(model):
    grads = []
    for checkpointing in (False, True):
        cfg = FedConfig(model=model, gradient_checkpointing=checkpointing, seq_len=16, device="cpu")
        rank_model = ModelBench(cfg, build_model(model, "classification", 4, 0)).checkout(4, GlobalState({}), 1)
        inner = rank_model.get_base_model()
        flag = "is_activation_checkpointing" if hasattr(inner, "is_activation_checkpointing") else "is_gradient_checkpointing"
        assert bool(getattr(inner, flag)) == checkpointing
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # B = 0 at initialisation would leave A without gradient
            for name, p in adapters.adapter_parameters(rank_model).items():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1, generator=generator)
        batch = synthetic_dataset("classification", 8, 16, 4, 0)[list(range(8))]
        params = adapters.trainable_parameters(rank_model)
        torch.manual_seed(5)  # the same dropout masks (checkpointing replays the RNG state)
        with PerSampleGradients(rank_model, params.values()) as collector:
            summed_loss(rank_model, batch).backward()
        grads.append((torch.cat([p.grad.flatten() for p in params.values()]),
                      torch.cat([g.flatten() for g in collector.grad_samples])))
    (plain, plain_samples), (recomputed, recomputed_samples) = grads
    assert float((plain - recomputed).norm()) <= 1e-6 * float(plain.norm())
    assert float((plain_samples - recomputed_samples).norm()) <= 1e-6 * float(plain_samples.norm())


def test_explicit_cpu_equals_auto_on_a_machine_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("auto means the GPU here")
    assert relative_error(run_tensors(config("fedit", "float32", True, device="auto")),
                          run_tensors(config("fedit", "float32", True))) == 0.0


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("device", "cuda:x", "device must be"),
    ("model_dtype", "fp16", "model_dtype must be one of auto, float32, bfloat16, float16, got 'fp16'"),
    ("model_dtype", "int8", "model_dtype must be one of"),
    ("gradient_checkpointing", "yes", "gradient_checkpointing must be bool, got 'yes'"),
])
def test_bad_settings_are_one_line_errors(key, value, expected):
    with pytest.raises(ValueError, match="FedConfig: " + expected.replace("(", r"\(").replace(")", r"\)")):
        FedConfig(**{key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_line_from_the_cli(tmp_path):
    done = fedlora("run", "--preset", "fedit", "--device", "cuda", "--out", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fedlora: error: device 'cuda': torch "), lines
    assert "Traceback" not in done.stderr
    assert "--device cpu" in lines[-1]


def test_bad_dtype_from_the_cli(tmp_path):
    done = fedlora("run", "--preset", "fedit", "--dtype", "half", "--out", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 2
    assert "model_dtype must be one of auto, float32, bfloat16, float16, got 'half'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_folder_loads_in_its_own_or_the_chosen_dtype(tmp_path):
    build_model("tiny-llama", "classification", 3, 0).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    assert build_model(str(tmp_path / "m"), "classification", 3).score.weight.dtype == torch.bfloat16  # auto
    assert build_model(str(tmp_path / "m"), "classification", 3, dtype=torch.float32).score.weight.dtype \
        == torch.float32


# ----------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not cuda_kernels_available(), reason="no GPU or no fedlora CUDA kernels")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedsa_lora", "flora", "fedex_lora", "lora_a2", "hetlora"])
def test_cuda_run_equals_cpu_run_and_draws_the_same_noise(method, dtype):
    """DP-SGD on the GPU (the CUDA dp_clip_noise kernel) against the CPU run: the same noise stream, so
    the two differ only by rounding (float32 matmuls in another order; TF32 is off by default)."""
    budget = 4 * UNIT_ROUNDOFF[dtype] if dtype != "float32" else 1e-4
    for dp in (False, True):  # tiny-llama has no dropout, whose masks differ between CPU and CUDA generators
        cpu = run_tensors(config(method, dtype, dp, model="tiny-llama"))
        gpu = run_tensors(config(method, dtype, dp, model="tiny-llama", device="cuda"))
        assert relative_error(gpu, cpu) <= budget, (method, dtype, dp)


@pytest.mark.cuda
@cuda
def test_cuda_run_keeps_everything_on_the_gpu():
    cfg = config("flora", "bfloat16", True, device="cuda")
    sim = Simulation(cfg)
    sim.run(progress=False)
    assert {t.device.type for t in sim.state.tensors.values()} == {"cuda"}
    assert {t.device.type for t in sim.state.base.values()} == {"cuda"}
    assert sim.bench.device.type == "cuda"


if __name__ == "__main__":  # the measurements behind BUDGET: python python_tests/test_precision.py [SEEDS] (~40 min)
    import itertools

    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 8  # without DP; with DP the first 3
    for optimizer, dtype, dp in itertools.product(OPTIMIZERS, ("bfloat16", "float16"), (False, True)):
        models = ("tiny-bert", "tiny-gpt2", "tiny-llama")
        cases = itertools.product(strategy_names(), models, range(min(seeds, 3) if dp else seeds))
        error, method, model, seed = max((error_in_roundoffs(method, dtype, dp, optimizer, model=model, seed=seed),
                                          method, model, seed) for method, model, seed in cases)
        print(f"{optimizer} {dtype} {'dp' if dp else 'no dp'}: worst {error:.1f} u = {error * UNIT_ROUNDOFF[dtype]:.1e} "
              f"({method} on {model}, seed {seed}); budget {BUDGET[optimizer, dtype]} u", flush=True)
