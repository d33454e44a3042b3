"""`fedlora evaluate`: which rows it scores (a dataset's own test split; the rows the run held out when it
is the run's own dataset, the default; else all rows, and the line says so), and the models it refuses
(a folder without a classification head is never scored with a random one).

Tiny runs in-process; the command line through `fedlora_ext.app.cli.main` (one error line on stderr, exit 2)."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from fedtools import one_thread  # noqa: F401 (autouse: one intra-op thread on the shared cores)

from fedlora_ext.app.cli import main
from fedlora_ext.data.models import packaged_model_folder
from fedlora_ext.data.tiny_models import build_model
from fedlora_ext.app.evaluation import evaluate_path
from fedlora_ext.app.export import export_run
from fedlora_ext.federated import FedConfig, Simulation

ROWS = 60


def write_csv(path, rows: int = ROWS) -> str:
    """A classification CSV with no test split of its own (three topics, words that tell them apart)."""
    words = {"sport": "match goal team win", "tech": "chip code data model", "food": "bread soup salt cake"}
    topics = sorted(words)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for i in range(rows):
            topic = topics[i % 3]
            vocabulary = words[topic].split()
            writer.writerow([" ".join(vocabulary[(i + k) % 4] for k in range(5)), topic])
    return str(path)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    data = write_csv(folder / "topics.csv")
    config = FedConfig(method="fedit", model="tiny-bert", task="classification", dataset=data,
                       target_modules=("query", "value"), rank=4, alpha=8.0, num_clients=2, rounds=2, local_steps=2,
                       batch_size=16, lr=3e-2, seq_len=16, dirichlet_alpha=None, seed=0, device="cpu",
                       out_dir=str(folder / "run"))
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    sim.run(progress=False)
    return sim, folder / "run", folder


def final(sim, key: str):
    """The run's score on its whole held-out split (``final_test_*`` when rounds score a subset)."""
    last = sim.history[-1]
    return last.get(f"final_test_{key}", last[f"test_{key}"])


def test_a_run_is_scored_on_the_rows_it_held_out(csv_run, tmp_path):
    sim, run_dir, folder = csv_run
    held_out = final(sim, "examples")
    assert held_out == ROWS // 5  # eval_fraction 0.2 of a file without a test split
    export_run(run_dir, "merged", tmp_path / "merged")
    # no --dataset: the run's own; the run's own by name; an export of the run: the same rows, the same scores
    for target, dataset in ((run_dir, None), (run_dir, sim.config.dataset), (tmp_path / "merged", None),
                            (tmp_path / "merged", sim.config.dataset)):
        scores = evaluate_path(target, dataset, device="cpu")
        assert scores["examples"] == held_out and scores["dataset"] == sim.config.dataset
        assert f"the {held_out} rows the run held out" in scores["split"] and "no test split" in scores["split"]
        assert scores["accuracy"] == pytest.approx(final(sim, "accuracy"), abs=1e-12)
        assert scores["loss"] == pytest.approx(final(sim, "loss"), abs=1e-5)
    other = evaluate_path(run_dir, changes={"seed": 3}, device="cpu")  # another split: the line says whose
    assert f"the {held_out} rows a run with --set seed held out" in other["split"] and "seed 3" in other["split"]


def test_another_file_without_a_test_split_is_scored_whole_and_says_so(csv_run, tmp_path):
    sim, run_dir, _ = csv_run
    other = write_csv(tmp_path / "more-topics.csv", rows=45)
    scores = evaluate_path(run_dir, other, device="cpu")
    assert scores["examples"] == 45
    assert f"all 45 rows of {other!r} (it has no test split)" in scores["line"]
    copy = tmp_path / "same-rows.csv"  # the run's rows under another name: not the run's dataset
    shutil.copy(sim.config.dataset, copy)
    assert evaluate_path(run_dir, str(copy), device="cpu")["examples"] == ROWS


def test_evaluate_on_the_command_line_defaults_to_the_runs_dataset(csv_run, capsys):
    sim, run_dir, _ = csv_run
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and f"accuracy {final(sim, 'accuracy'):.4f}" in line
    assert f"the {final(sim, 'examples')} rows the run held out of {sim.config.dataset!r}" in line


def one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("changes", [[], ["--set", "task=classification"]])
def test_an_encoder_without_a_head_is_refused(csv_run, capsys, changes):
    """The packaged MiniLM base (BertModel) has no classification head: scored, it would get a random
    one (a different loss each call). Refused in one line, never called a causal LM."""
    _, _, folder = csv_run
    args = ["evaluate", packaged_model_folder(), "--dataset", str(folder / "topics.csv"), *changes]
    assert main(args) == 2
    line = one_error_line(capsys, "has no classification head", "evaluate an export", "or a run folder")
    assert "causal LM" not in line


def decoder_folder(folder, capsys):
    """A tiny GPT-2 saved as a plain causal LM folder (no run, no export)."""
    build_model("tiny-gpt2", "causal_lm", 2).save_pretrained(folder)
    capsys.readouterr()  # transformers' progress bar is not the command's output
    return folder


def test_a_decoder_without_a_head_is_refused_for_classification(tmp_path, capsys):
    folder = decoder_folder(tmp_path / "gpt2", capsys)
    assert main(["evaluate", str(folder), "--dataset", "synthetic", "--set", "task=classification"]) == 2
    one_error_line(capsys, "has no classification head", "a causal LM", "evaluate an export")


def test_a_model_folder_without_a_run_needs_a_dataset(tmp_path, capsys):
    folder = decoder_folder(tmp_path / "gpt2", capsys)
    assert main(["evaluate", str(folder)]) == 2
    one_error_line(capsys, "--dataset is needed", str(folder))


def test_a_runs_relative_dataset_path_is_read_from_where_it_points(csv_run, tmp_path, monkeypatch, capsys):
    """A run started with a relative --dataset keeps it as given: evaluate finds it from the run's own
    starting folder, and elsewhere says so in one line instead of 'no such file'."""
    import json

    sim, run_dir, folder = csv_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["dataset"] = "topics.csv"
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(folder)
    assert evaluate_path(copy, device="cpu")["examples"] == final(sim, "examples")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(copy), "--device", "cpu"]) == 2
    one_error_line(capsys, "the run's dataset 'topics.csv'", "--dataset")
