"""`fedlora export` and `fedlora evaluate`: what comes out of a run loads with peft / transformers and
computes what the run's own model computes.

Tiny runs in-process (the reference: the live Simulation's global model, or its clients' own models),
exports read back from the run folder alone, loaded with `PeftModel.from_pretrained` and
`AutoModel...from_pretrained`. Command-line errors run `python -m fedlora_ext` from tmp_path (the checkout's
fedlora_ext/ without _C would shadow the installed one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtools import fedlora, finish, one_error_line, start_fedlora
from fedtools import one_thread  # noqa: F401 (autouse: one intra-op thread on the shared cores)

from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.app.evaluation import evaluate_path
from fedlora_ext.app.export import EXPORT_INFO, export_run
from fedlora_ext.app.run_models import load_run
from fedlora_ext.federated import FedConfig, Simulation
from fedlora_ext.federated.evaluate import evaluate

TARGETS = {"tiny-bert": ("query", "value"), "tiny-gpt2": ("c_attn",), "tiny-llama": ("q_proj", "v_proj")}
EXACT = 1e-5


def run(folder: Path, method: str = "fedit", model: str = "tiny-bert", task: str = "classification",
        **changes) -> Simulation:
    values = {"method": method, "model": model, "task": task, "target_modules": TARGETS[model], "rank": 4,
              "alpha": 8.0, "num_clients": 3, "rounds": 2, "local_steps": 3, "batch_size": 16, "lr": 3e-2,
              "num_examples": 96, "seq_len": 12, "dirichlet_alpha": None, "seed": 0, "device": "cpu",
              "out_dir": str(folder)}
    values.update(changes)
    config = FedConfig(**values)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    sim.run(progress=False)
    return sim


def logits(model, data) -> torch.Tensor:
    model.eval()
    batch = data[:16]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def load_peft(folder: Path, auto):
    import warnings

    from peft import PeftModel

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(auto.from_pretrained(base), str(folder))


# ---- runs shared by the tests of this module ------------------------------------------------------------
@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A saved DatasetDict with its own test split and named labels (read with the packaged tokenizer)."""
    import datasets

    rng = np.random.default_rng(0)
    words = {"sport": "match goal team win", "tech": "chip code data model", "food": "bread soup salt cake"}

    def rows(n):
        labels = rng.choice(sorted(words), size=n).tolist()
        texts = [" ".join(rng.choice(words[l].split(), size=6)) for l in labels]
        return {"text": texts, "label": labels}
    folder = tmp_path_factory.mktemp("data") / "topics"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(90)),
                          "test": datasets.Dataset.from_dict(rows(30))}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert_text(tmp_path_factory, text_data):
    folder = tmp_path_factory.mktemp("runs") / "bert-text"
    return run(folder, dataset=str(text_data), seq_len=16), folder


@pytest.fixture(scope="module")
def gpt2_rslora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "gpt2-rslora"
    return run(folder, model="tiny-gpt2", task="causal_lm", rslora=True), folder


@pytest.fixture(scope="module")
def bert_synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "bert-synthetic"
    return run(folder), folder


# ---- exports reproduce the run's models ------------------------------------------------------------------
def test_run_folder_keeps_the_tiny_base(bert_text):
    sim, folder = bert_text
    base = folder / "base_model"
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    saved = json.loads((base / "config.json").read_text())
    assert saved["id2label"] == {"0": "food", "1": "sport", "2": "tech"}
    assert saved["vocab_size"] == sim.bench.base_model.config.vocab_size > 64  # the packaged tokenizer's


def test_classifier_exports_equal_the_global_model(bert_text, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sim, folder = bert_text
    reference = logits(sim.global_model(), sim.test_data)
    export_run(folder, "peft", tmp_path / "peft")
    export_run(folder, "merged", tmp_path / "merged")
    peft = load_peft(tmp_path / "peft", AutoModelForSequenceClassification)
    assert max_diff(logits(peft, sim.test_data), reference) <= EXACT
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), reference) <= EXACT
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "sport", "2": "tech"}
    assert config["label2id"] == {"food": 0, "sport": 1, "tech": 2}
    assert json.loads((tmp_path / "peft" / "labels.json").read_text())["id2label"]["2"] == "tech"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")  # the run's (packaged MiniLM) tokenizer
    assert tokenizer("goal")["input_ids"] == AutoTokenizer.from_pretrained(tmp_path / "peft")("goal")["input_ids"]
    info = json.loads((tmp_path / "merged" / EXPORT_INFO).read_text())
    assert info["format"] == "merged" and info["method"] == "fedit" and info["tokenizer"] is True


def test_causal_lm_rslora_exports_equal_the_global_model(gpt2_rslora, tmp_path):
    from transformers import AutoModelForCausalLM

    sim, folder = gpt2_rslora
    reference = logits(sim.global_model(), sim.test_data)
    export_run(folder, "peft", tmp_path / "peft")
    export_run(folder, "merged", tmp_path / "merged")
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["fan_in_fan_out"] is True and adapter["task_type"] == "CAUSAL_LM"
    assert max_diff(logits(load_peft(tmp_path / "peft", AutoModelForCausalLM), sim.test_data), reference) <= EXACT
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), reference) <= EXACT
    assert not (tmp_path / "merged" / "tokenizer_config.json").exists()  # synthetic tokens: no tokenizer
    assert any("no tokenizer" in n for n in json.loads((tmp_path / "merged" / EXPORT_INFO).read_text())["notes"])


def test_flora_merged_equals_the_global_model_and_peft_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "flora"
    sim = run(folder, method="flora", model="tiny-llama", task="causal_lm", client_ranks=(4, 2, 1))
    reference = logits(sim.global_model(), sim.test_data)
    export_run(folder, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), reference) <= EXACT
    pristine = AutoModelForCausalLM.from_pretrained(folder / "base_model")  # the merge moved the base
    assert max_diff(logits(pristine, sim.test_data), reference) > 1e-3
    with pytest.raises(ValueError, match="--format merged"):
        export_run(folder, "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("method,changes", [("fedsa_lora", {}), ("fedsa_vera", {"adapter": "vera"})])
def test_personal_exports_reproduce_each_clients_accuracy(method, changes, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / method
    sim = run(folder, method=method, **changes)
    last = sim.history[-1]
    assert last["personal_scope"] == "all"
    with pytest.raises(ValueError, match="pass --client K"):
        export_run(folder, "merged", tmp_path / "global")
    accuracies = []
    for k, client in enumerate(sim.clients):
        test = sim.client_data[k][1]
        own = sim.client_model(client, sim.config.rounds - 1)
        reference = logits(own, test)
        expected = evaluate(own, test)
        export_run(folder, "merged", tmp_path / f"merged{k}", client=k)
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"merged{k}")
        assert max_diff(logits(merged, test), reference) <= EXACT
        scores = evaluate(merged, test)
        assert scores["accuracy"] == expected["accuracy"]
        assert scores["loss"] == pytest.approx(expected["loss"], abs=EXACT)
        accuracies.append(scores["accuracy"])
        if k == 1:
            export_run(folder, "peft", tmp_path / "peft1", client=1)
            peft = load_peft(tmp_path / "peft1", AutoModelForSequenceClassification)
            assert max_diff(logits(peft, test), reference) <= EXACT
            adapter = json.loads((tmp_path / "peft1" / "adapter_config.json").read_text())
            assert adapter["peft_type"] == ("VERA" if method == "fedsa_vera" else "LORA")
    assert float(np.mean(accuracies)) == pytest.approx(last["personal_accuracy"], abs=1e-12)


def test_evaluate_reproduces_the_final_test_scores(bert_synthetic, bert_text, tmp_path):
    sim, folder = bert_synthetic
    last = sim.history[-1]
    export_run(folder, "merged", tmp_path / "merged")
    for target in (folder, tmp_path / "merged"):
        scores = evaluate_path(target, "synthetic", device="cpu")
        assert scores["examples"] == last["test_examples"]
        assert scores["accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-12)
        assert scores["loss"] == pytest.approx(last["test_loss"], abs=EXACT)
    # another synthetic test set through --set: other examples, other scores, still one line
    other = evaluate_path(folder, "synthetic", changes={"seed": 5}, device="cpu")
    assert "seed 6" in other["split"]

    sim, folder = bert_text  # a dataset with its own test split: the run evaluated on it, so does evaluate
    last = sim.history[-1]
    export_run(folder, "peft", tmp_path / "peft")
    for target in (folder, tmp_path / "peft"):
        scores = evaluate_path(target, sim.config.dataset, device="cpu")
        assert "own 'test' split" in scores["split"] and scores["examples"] == 30
        assert scores["accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-12)
        assert scores["loss"] == pytest.approx(last["test_loss"], abs=EXACT)


def test_flower_style_run_exports_from_its_adapter(bert_synthetic, tmp_path):
    """A run folder without checkpoint.json (what a Flower run leaves): the global model from adapter.safetensors."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    sim, folder = bert_synthetic
    copy = tmp_path / "flower-run"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint*"))
    export_run(copy, "merged", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert max_diff(logits(merged, sim.test_data), logits(sim.global_model(), sim.test_data)) <= EXACT
    with pytest.raises(ValueError, match="--client needs"):
        export_run(copy, "merged", tmp_path / "client", client=0)


def test_flower_run_saves_its_base_and_exports(tmp_path):
    pytest.importorskip("flwr")
    from flowertools import InMemoryGrid
    from transformers import AutoModelForCausalLM

    from fedlora_ext.flower.client_app import app as client_app
    from fedlora_ext.flower.server_app import run_server

    out = tmp_path / "flower"
    nodes = {1000 + 7 * cid: {"partition-id": cid, "num-partitions": 3} for cid in range(3)}
    run_config = {"preset": "fedit", "model": "tiny-gpt2", "task": "causal_lm", "dataset": "synthetic",
                  "num-clients": 3, "rounds": 2, "local-steps": 1, "num-examples": 48, "seq-len": 16,
                  "batch-size": 16, "out-dir": str(out), "round-timeout": 60.0}
    run_server(InMemoryGrid(client_app, nodes), run_config)
    assert (out / "base_model" / "model.safetensors").is_file() and (out / "checkpoint.json").exists()
    with pytest.raises(ValueError, match="which a Flower run keeps on its nodes"):
        export_run(out, "merged", tmp_path / "client", client=0)
    export_run(out, "peft", tmp_path / "peft")
    export_run(out, "merged", tmp_path / "merged")
    loaded = load_run(out)
    data = synthetic_dataset("causal_lm", 12, 16, 4, 1)  # the run's test set (num_examples // 4, seed + 1)
    reference = logits(loaded.global_model(), data)
    assert max_diff(logits(load_peft(tmp_path / "peft", AutoModelForCausalLM), data), reference) <= EXACT
    assert max_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), data), reference) <= EXACT
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = evaluate_path(tmp_path / "merged", "synthetic", device="cpu")
    assert scores["loss"] == pytest.approx(history[-1]["test_loss"], abs=EXACT)  # a causal LM: no accuracy


def test_loaded_run_matches_the_simulation(bert_synthetic):
    sim, folder = bert_synthetic
    loaded = load_run(folder)
    assert loaded.rounds_done == sim.config.rounds
    assert max_diff(logits(loaded.global_model(), sim.test_data), logits(sim.global_model(), sim.test_data)) == 0.0


# ---- SFT exports stop where training ended the answers ----------------------------------------------------
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny Llama SFT run on prompt/response rows read with the packaged MiniLM tokenizer, which has no
    eos token: training ends every answer with its separator [SEP], not the tiny config's eos id 1."""
    folder = tmp_path_factory.mktemp("sft")
    data = folder / "words.jsonl"
    rows = [{"prompt": f"Repeat the word: {WORDS[i % 6]}.", "response": WORDS[i % 6]} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    sim = run(folder / "run", model="tiny-llama", task="sft", dataset=str(data), num_clients=2, rounds=1,
              local_steps=1, batch_size=8, seq_len=24)
    return sim, folder / "run"


def training_end_tokens(sim) -> set[int]:
    """The token each held-out answer ends with, as the run tokenised it."""
    rows = sim.test_data[:]
    return {int(ids[n + r - 1]) for ids, n, r in zip(rows["input_ids"], rows["prompt_len"], rows["response_len"])}


def force_end_at(step: int, end: int, prompt_len: int):
    """A logits processor that makes greedy decoding produce ``end`` at generation step ``step``."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEnd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - prompt_len == step:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, end] = 0.0
            return scores

    return LogitsProcessorList([ForceEnd()])


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_sft_export_generates_until_the_end_token_training_used(sft_run, fmt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sim, folder = sft_run
    (end,) = training_end_tokens(sim)
    assert end != 1  # the tiny config's own eos: the export must not keep it
    out = tmp_path / fmt
    export_run(folder, fmt, out)
    generation = GenerationConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert end == tokenizer.sep_token_id
    assert generation.eos_token_id == end and generation.pad_token_id == tokenizer.pad_token_id
    assert json.loads((out / EXPORT_INFO).read_text())["generation"]["eos_token_id"] == end
    if fmt == "merged":  # config.json agrees, and generate() reads generation_config.json by itself
        model, extra = AutoModelForCausalLM.from_pretrained(out), {}
        saved = json.loads((out / "config.json").read_text())
        assert saved["eos_token_id"] == end and saved["pad_token_id"] == tokenizer.pad_token_id
        assert model.generation_config.eos_token_id == end
    else:  # an adapter's base keeps its own config: the export's generation config is passed
        model, extra = load_peft(out, AutoModelForCausalLM), {"generation_config": generation}
    model.eval()
    row = sim.test_data[0]
    prompt = row["input_ids"][: int(row["prompt_len"])].unsqueeze(0)
    with torch.no_grad():
        out_ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, logits_processor=force_end_at(2, end, prompt.shape[1]), **extra)
        new = out_ids[0, prompt.shape[1]:].tolist()
        assert len(new) == 3 and new[-1] == end  # stops at the end token
        control = GenerationConfig.from_dict({**generation.to_dict(), "eos_token_id": 1})  # the old config's eos
        kept = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, logits_processor=force_end_at(2, end, prompt.shape[1]),
                              generation_config=control)
    assert kept.shape[1] - prompt.shape[1] > 3  # without it, generation runs on past the answer


def test_sft_export_keeps_the_prompt_template(sft_run, tmp_path):
    """prompt_template.json rebuilds the prompt ids the run trained on, and says how answers end."""
    from transformers import AutoTokenizer

    from fedlora_ext.data.sft import load_sft

    sim, folder = sft_run
    export_run(folder, "merged", tmp_path / "merged")
    template = json.loads((tmp_path / "merged" / "prompt_template.json").read_text())
    info = json.loads((tmp_path / "merged" / EXPORT_INFO).read_text())
    assert info["prompt_template"] == template and template["format"] == "prompt_response"
    assert "prompt_template.json" in info["written"] and "generation_config.json" in info["written"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    config = sim.config
    rows = load_sft(config.dataset, seed=config.seed, test_fraction=config.eval_fraction).test
    for k in range(3):
        text = template["templates"]["prompt_response"]["prompt"].format(prompt=rows[k]["prompt"])
        prompt = template["prefix_ids"] + tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(rows[k]["response"], add_special_tokens=False)["input_ids"] + [template["end_token_id"]]
        trained = sim.test_data[k]
        n, r = int(trained["prompt_len"]), int(trained["response_len"])
        assert trained["input_ids"][:n].tolist() == prompt
        assert trained["input_ids"][n:n + r].tolist() == answer


# ---- the command line --------------------------------------------------------------------------------------
def test_cli_export_and_evaluate(bert_synthetic, tmp_path):
    sim, folder = bert_synthetic
    done = fedlora("export", folder, "--format", "merged", "--out", "merged", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("exported the global model") and len(done.stdout.strip().splitlines()) == 1
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    done = fedlora("evaluate", "merged", "--dataset", "synthetic", "--json", "scores.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1 and "accuracy" in done.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["accuracy"] == pytest.approx(sim.history[-1]["test_accuracy"], abs=1e-12)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = fedlora("evaluate", folder, "--dataset", "synthetic", "--set", "num_examples=64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 examples" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written without --json


def test_cli_bad_input_is_one_line(bert_synthetic, tmp_path):
    _, folder = bert_synthetic
    fedsa = tmp_path / "fedsa"
    run(fedsa, method="fedsa_lora", rounds=1, local_steps=1)
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert fedlora("export", folder, "--format", "peft", "--out", "again", cwd=tmp_path).returncode == 0
    cases = [  # (arguments, what the one line says), run two at a time
        (("export", tmp_path / "nowhere", "--format", "peft", "--out", "x"), ("not a folder",)),
        (("export", tmp_path / "full", "--format", "peft", "--out", "x"), ("not a run folder",)),
        (("export", empty_run, "--format", "peft", "--out", "x"), ("no trained model",)),
        (("export", folder, "--format", "onnx", "--out", "x"), ("peft, merged",)),
        (("export", fedsa, "--format", "merged", "--out", "x", "--client", "7"), ("out of range", "0..2")),
        (("export", fedsa, "--format", "merged", "--out", "x"), ("--client K",)),
        (("export", folder, "--format", "merged", "--out", "x", "--client", "0"), ("global model", "leave out --client")),
        (("export", folder, "--format", "merged", "--out", "full"), ("not a fedlora export", "notes.txt")),
        (("export", folder, "--format", "merged", "--out", "full", "--overwrite"), ("not a fedlora export",)),
        (("export", folder, "--format", "merged", "--out", "again"), ("not empty", "--overwrite")),
        (("evaluate", tmp_path / "full", "--dataset", "synthetic"), ("not a run folder",)),
        (("evaluate", folder, "--dataset", "synthetic", "--set", "nope=1"), ("unknown key 'nope'",)),
    ]
    for pair in range(0, len(cases), 2):
        started = [(start_fedlora(*args, cwd=tmp_path), needles) for args, needles in cases[pair:pair + 2]]
        for process, needles in started:
            one_error_line(finish(process), *needles)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    # an earlier export is replaced with --overwrite
    done = fedlora("export", folder, "--format", "merged", "--out", "again", "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "again" / "model.safetensors").is_file()
    assert not (tmp_path / "again" / "adapter_config.json").exists()
