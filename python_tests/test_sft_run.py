"""Instruction tuning end to end: response-only loss, per-sample DP losses, evaluation by perplexity and
generation, every method and path with ``task = "sft"``, and the refusals before training.

The data are small JSONL files written here, tokenised with the packaged MiniLM tokenizer for the tiny
decoder models (tiny-gpt2, tiny-llama); nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from fedtools import fedlora, method_extras

from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.data.task import build_task
from fedlora_ext.dp.per_sample import PerSampleGradients
from fedlora_ext.dp.sgd import summed_loss
from fedlora_ext.federated import Simulation, simulate
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.federated.evaluate import evaluate
from fedlora_ext.core.state import GlobalState
from fedlora_ext.strategies import strategy_names

WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Prompt/response pairs with a category: 'Repeat the word: w' -> 'w'."""
    path = tmp_path_factory.mktemp("sft") / "toy.jsonl"
    rows = [{"prompt": f"Repeat the word: {WORDS[i % 6]}. " + "Some context. " * (i % 4), "response": WORDS[i % 6],
             "category": "colour" if i % 6 < 3 else "thing"} for i in range(72)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def yes_file(tmp_path_factory):
    """A task a tiny model learns in a few steps: every answer is 'yes'."""
    path = tmp_path_factory.mktemp("sft") / "yes.jsonl"
    rows = [{"instruction": f"Is {thing} real?", "output": "yes"} for thing in ["the sky", "grass", "snow", "fire"] * 16]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def sft_config(dataset: str, **changes) -> FedConfig:
    values = dict(method="fedit", model="tiny-gpt2", task="sft", dataset=dataset, num_clients=2, rounds=1,
                  local_steps=2, batch_size=8, seq_len=24, rank=4, lr=0.05, dirichlet_alpha=None, device="cpu",
                  eval_examples=8)
    return FedConfig(**{**values, **changes})


def sft_model(config: FedConfig):
    task = build_task(config)
    bench = ModelBench(config, task.model)
    model = bench.checkout(config.rank, GlobalState(tensors={}), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at initialisation would leave A without a gradient
        for name, p in adapters.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1, generator=generator)
    return task, model


def test_prompt_tokens_never_reach_the_loss(data_file):
    """The loss's gradient with respect to the logits is exactly 0 at every position that predicts a
    prompt token (or padding), and non-zero at the positions that predict the response."""
    task, model = sft_model(sft_config(data_file))
    batch = task.train[:6]
    captured = {}

    def keep_logits(module, inputs, output):
        output.logits.retain_grad()
        captured["logits"] = output.logits

    handle = model.register_forward_hook(keep_logits)
    summed_loss(model, batch).backward()
    handle.remove()
    grad = captured["logits"].grad  # [B, T, V]
    predicts_response = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    predicts_response[:, :-1] = batch["labels"][:, 1:] != -100
    assert grad[~predicts_response].abs().max() == 0
    assert (grad[predicts_response].abs().amax(-1) > 0).all()
    for row, n, r in zip(batch["labels"], batch["prompt_len"], batch["response_len"]):
        assert (row[:n] == -100).all() and (row[n : n + r] != -100).all() and (row[n + r :] == -100).all()


def test_per_sample_losses_with_response_masks_equal_one_autograd_call_per_sample(data_file):
    task, model = sft_model(sft_config(data_file))
    model.eval()  # no dropout: the two computations must see the same network
    batch = task.train[:5]
    params = adapters.trainable_parameters(model)
    with PerSampleGradients(model, params.values()) as collector:
        summed_loss(model, batch).backward()
        per_sample = [g.clone() for g in collector.grad_samples]
    for i in range(5):
        for p in params.values():
            p.grad = None
        one = {k: v[i : i + 1] for k, v in batch.items()}
        summed_loss(model, one).backward()  # this sample's own mean over its response tokens
        for j, p in enumerate(params.values()):
            torch.testing.assert_close(per_sample[j][i], p.grad, rtol=1e-5, atol=1e-7)


def test_evaluation_reports_perplexity_and_exact_match(data_file):
    task, model = sft_model(sft_config(data_file))
    scores = evaluate(model, task.test)
    assert scores["perplexity"] == pytest.approx(torch.tensor(scores["loss"]).exp().item())
    assert 0.0 <= scores["exact_match"] <= 1.0  # short references: generation is scored
    labels = task.test[:]["labels"]
    assert scores["response_tokens"] == int((labels[:, 1:] != -100).sum())


def test_generation_exact_match_rises_on_a_task_a_tiny_model_learns(yes_file):
    """A random tiny Llama cannot say 'yes' then stop; 45 steps of LoRA (on the LM head too: a random
    head's logits are too flat to move otherwise) teach it, and greedy generation then matches."""
    config = sft_config(yes_file, method="centralized", model="tiny-llama", rounds=3, local_steps=15, seq_len=16,
                        lr=0.03, target_modules=("q_proj", "v_proj", "lm_head"))
    torch.manual_seed(0)
    before = evaluate(sft_model(config)[1], build_task(config).test)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    history = sim.run(progress=False).history
    assert before["exact_match"] == 0.0
    assert history[-1]["test_exact_match"] == 1.0, history
    assert history[-1]["test_perplexity"] < 1.5 < before["perplexity"]
    assert "test_accuracy" not in history[-1]

    # exact match is plain greedy decoding: edit the trained model so that its first choice after the
    # prompt is the end token; its greedy answer is then empty, and nothing may credit its second choice
    model, test = sim.global_model(), sim.test_data
    end = int(test[0]["input_ids"][test[0]["prompt_len"] + test[0]["response_len"] - 1])

    def end_first(module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] > 1:  # the prompt's pass (later steps feed one token to the cache)
            out.logits[:, -1, end] = out.logits.max() + 100.0  # its last position picks the first new token
        return out

    handle = model.get_base_model().register_forward_hook(end_first, with_kwargs=True)
    try:
        assert evaluate(model, test)["exact_match"] == 0.0
    finally:
        handle.remove()
    assert evaluate(model, test)["exact_match"] == 1.0




@pytest.mark.parametrize("method", strategy_names())
def test_every_method_runs_sft_with_dp_sgd(method, data_file):
    config = sft_config(data_file, method=method, dp_epsilon=8.0, dp_noise_seed=1,
                        **method_extras(method, two_clients=True))
    last = simulate(config, progress=False).history[-1]
    key = "test" if "test_perplexity" in last else "personal"
    assert last[f"{key}_perplexity"] > 1 and 0 <= last[f"{key}_exact_match"] <= 1
    assert last["epsilon_max"] <= 8.0 + 1e-9


def test_dp_fedavg_and_category_partition(data_file):
    config = sft_config(data_file, method="ffa_lora", server_dp_noise_multiplier=0.5, participation=1.0,
                        dp_noise_seed=2, dirichlet_alpha=0.5, category_column="category", num_clients=3)
    torch.manual_seed(0)
    sim = Simulation(config)
    labels = [sorted({int(x) for x in data["label"]}) for data, _ in sim.client_data]
    assert {c for client in labels for c in client} == {0, 1}  # the two categories are dealt out
    history = sim.run(progress=False).history
    assert history[-1]["server_epsilon"] > 0


def test_resume_of_an_sft_run_is_the_uninterrupted_run(data_file, tmp_path):
    config = sft_config(data_file, rounds=2, dp_epsilon=8.0, dp_noise_seed=3)
    whole = tmp_path / "whole"
    simulate(config.replace(out_dir=str(whole)), progress=False)
    cut = tmp_path / "cut"
    torch.manual_seed(config.seed)
    first = Simulation(config.replace(out_dir=str(cut)))  # makes the folder (its token cache)
    first.step(0)
    first.save_checkpoint(1, cut)
    resumed = Simulation.resume(cut)
    resumed.run(progress=False)
    drop = ("seconds", "seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval")
    lines = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (cut / "metrics.jsonl").read_text().splitlines()]
    reference = [{k: v for k, v in json.loads(x).items() if k not in drop}
                 for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert lines == reference


def test_flower_sft_matches_the_simulator(data_file):
    pytest.importorskip("flwr")
    from flowertools import InMemoryGrid

    from fedlora_ext.flower import FedLoRAStrategy
    from fedlora_ext.flower.client_app import app as client_app

    config = sft_config(data_file, method="fedsa_lora", rounds=2, dp_epsilon=8.0, dp_noise_seed=5)
    sim = simulate(config, progress=False)
    grid = InMemoryGrid(client_app, {1000 + c: {"partition-id": c, "num-partitions": 2} for c in range(2)})
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    for s, f in zip(sim.history, strategy.history, strict=True):
        for key in ("train_loss", "personal_perplexity", "personal_exact_match", "epsilon_max"):
            assert s.get(key) == f.get(key), key


@pytest.mark.parametrize(("changes", "expected"), [
    ({"model": "tiny-bert"}, "task 'sft' needs a decoder (causal) language model, but model 'tiny-bert' is an encoder"),
    ({"model": "minilm"}, "model 'minilm' is an encoder"),
    ({"model": "tiny-bert", "task": "causal_lm"}, "task 'causal_lm' needs a decoder"),
    ({"seq_len": 2}, "no train example fits seq_len 2"),
])
def test_refusals_before_training(changes, expected, data_file):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_task(sft_config(data_file, **changes))


def test_synthetic_data_has_no_instructions():
    with pytest.raises(ValueError, match="dataset 'synthetic' has no instructions"):
        build_task(sft_config("synthetic"))


def test_cli_sft_run_prints_perplexity_and_exact_match(data_file, tmp_path):
    done = fedlora("run", "--preset", "fedit", "--task", "sft", "--model", "tiny-gpt2", "--dataset", data_file,
                   "--rounds", "1", "--clients", "2", "--local-steps", "1", "--set", "seq_len=24",
                   "--set", "category_column=category", "--out", tmp_path / "r", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(Dirichlet 0.5 over categories)" in done.stdout
    assert "note: prompt_response format; categories: colour, thing" in done.stdout
    assert "ppl " in done.stdout and "exact match " in done.stdout and "chance" not in done.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # perplexity is what moves; exact match rides along
    assert summary["metric"] == "perplexity" and summary["chance"] is None and 0 <= summary["exact match"] <= 1
    assert summary["final"] > 1 and "final test perplexity" in done.stdout
    metrics = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"test_loss", "test_perplexity", "test_exact_match"} <= set(metrics) and "generations" not in metrics
    samples = [json.loads(line) for line in (tmp_path / "r" / "generations.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["round"] for s in samples} == {1}
    assert all(set(s) == {"round", "prompt", "reference", "output"} and s["prompt"] and s["reference"] for s in samples)
    status = fedlora("status", tmp_path / "r", cwd=tmp_path, timeout=120)
    assert "final test perplexity" in status.stdout, status.stdout
