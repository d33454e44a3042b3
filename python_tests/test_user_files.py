"""A user's files are never touched: every file under the folder a command writes into is hashed before
and after (`fedtools.tree_hashes`) for `fedlora run`, `compare` and `simulate` (a new folder, a folder of
the user's, `--overwrite` over a run the user added a file to), `fedlora export` (new folder,
`--overwrite`, refusals, a failed export) and `fedlora evaluate --json`.

`--overwrite` replaces only what an earlier export (or an earlier `evaluate --json`) wrote, and refuses a
folder (a file) holding anything else, in one line that names `--out` (`--json`) and the foreign entries."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from fedtools import one_thread, tree_hashes  # noqa: F401 (one_thread: autouse, one intra-op thread)

from fedlora_ext.app import export
from fedlora_ext.app.cli import main
from fedlora_ext.app.export import EXPORT_INFO, export_run
from fedlora_ext.federated import FedConfig, Simulation


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny BERT run on a text CSV: its exports hold the packaged tokenizer's files too."""
    folder = tmp_path_factory.mktemp("user-files")
    data = folder / "topics.csv"
    with open(data, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([["goal team win", "chip code data"][i % 2] + f" {i}", ["sport", "tech"][i % 2]])
    config = FedConfig(method="fedit", model="tiny-bert", task="classification", dataset=str(data),
                       target_modules=("query", "value"), rank=4, alpha=8.0, num_clients=2, rounds=1, local_steps=1,
                       batch_size=16, seq_len=16, dirichlet_alpha=None, seed=0, device="cpu",
                       out_dir=str(folder / "run"))
    torch.manual_seed(0)
    Simulation(config).run(progress=False)
    return folder / "run"


@pytest.fixture
def workspace(tmp_path):
    """A folder of the user's own: a file and a folder with a file, next to where exports go."""
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.bin").write_bytes(bytes(range(256)))
    return tmp_path


def fedlora(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, *args) -> str:
    code, _, err = fedlora(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedlora: error: "), (code, err)
    return lines[0]


def outside(hashes: dict[str, str], name: str) -> dict[str, str]:
    """The entries that are not ``name`` or under it."""
    return {k: v for k, v in hashes.items() if k != name and not k.startswith(f"{name}/")}


def test_export_and_overwrite_touch_only_the_export(text_run, workspace, capsys):
    out = workspace / "export"
    before = tree_hashes(workspace)
    assert fedlora(capsys, "export", text_run, "--format", "merged", "--out", out)[0] == 0
    after = tree_hashes(workspace)
    assert outside(after, "export") == before  # no temporary folder left beside it either
    info = json.loads((out / EXPORT_INFO).read_text())
    assert sorted(info["written"]) == sorted(k + "/" * (v == "folder") for k, v in tree_hashes(out).items())
    assert {"tokenizer.json", "tokenizer_config.json", "labels.json", "config.json"} <= set(info["written"])

    # the user's own files in the export folder: --overwrite refuses, names them and changes nothing
    (out / "my-notes.md").write_text("what I saw")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG")
    snapshot = tree_hashes(workspace)
    for flags in ([], ["--overwrite"]):
        line = refused(capsys, "export", text_run, "--format", "peft", "--out", out, *flags)
        assert f"--out {out}" in line and "my-notes.md" in line and "plots/" in line and "did not write" in line
        assert tree_hashes(workspace) == snapshot

    # without them, --overwrite replaces the earlier export, and only it
    (out / "my-notes.md").unlink()
    (out / "plots" / "loss.png").unlink()
    (out / "plots").rmdir()
    line = refused(capsys, "export", text_run, "--format", "peft", "--out", out)
    assert "is not empty" in line and "--overwrite" in line
    assert tree_hashes(workspace) == after
    assert fedlora(capsys, "export", text_run, "--format", "peft", "--out", out, "--overwrite")[0] == 0
    assert outside(tree_hashes(workspace), "export") == before
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()


def test_a_folder_that_is_not_an_export_is_never_taken(text_run, workspace, capsys):
    before = tree_hashes(workspace)
    for flags in ([], ["--overwrite"]):
        line = refused(capsys, "export", text_run, "--format", "merged", "--out", workspace, *flags)
        assert f"--out {workspace}" in line and "not a fedlora export" in line and "notes.txt" in line
        assert tree_hashes(workspace) == before


def test_a_failed_export_leaves_the_earlier_one_as_it_was(text_run, workspace, monkeypatch):
    out = workspace / "export"
    export_run(text_run, "merged", out)
    before = tree_hashes(workspace)
    written = export._write

    def fails(run, model, fmt, client, folder, final):
        written(run, model, fmt, client, folder, final)
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write", fails)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(text_run, "peft", out, overwrite=True)
    assert tree_hashes(workspace) == before  # the earlier export whole, no half-written folder beside it


def test_an_export_from_before_the_full_listing(text_run, workspace, capsys):
    """An earlier fedlora_export.json listed only the model files: its tokenizer files still count as
    the export's, a file of the user's does not."""
    out = workspace / "export"
    export_run(text_run, "merged", out)
    info = json.loads((out / EXPORT_INFO).read_text())
    del info["written"]
    (out / EXPORT_INFO).write_text(json.dumps(info))
    (out / "README.md").write_text("mine")
    before = tree_hashes(workspace)
    line = refused(capsys, "export", text_run, "--format", "merged", "--out", out, "--overwrite")
    assert "README.md" in line and "tokenizer" not in line
    assert tree_hashes(workspace) == before
    (out / "README.md").unlink()
    assert fedlora(capsys, "export", text_run, "--format", "merged", "--out", out, "--overwrite")[0] == 0
    assert "written" in json.loads((out / EXPORT_INFO).read_text())


def test_evaluate_json_never_replaces_a_users_file(text_run, workspace, capsys):
    mine = workspace / "scores.json"
    mine.write_text('{"accuracy": 1.0}\n')  # the user's own, not written by evaluate
    before = tree_hashes(workspace)
    code, out, _ = fedlora(capsys, "evaluate", text_run, "--device", "cpu")
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert tree_hashes(workspace) == before  # nothing written without --json
    for flags in ([], ["--overwrite"]):
        line = refused(capsys, "evaluate", text_run, "--json", mine, *flags)
        assert f"--json {mine}" in line and "not a scores file" in line
        assert tree_hashes(workspace) == before
    assert "--json" in refused(capsys, "evaluate", text_run, "--overwrite")
    inside_a_file = workspace / "notes.txt" / "s.json"
    assert "is a file, not a folder" in refused(capsys, "evaluate", text_run, "--json", inside_a_file)
    assert "is a folder" in refused(capsys, "evaluate", text_run, "--json", workspace / "mine")
    assert tree_hashes(workspace) == before


def test_evaluate_json_replaces_its_own_result_only_with_overwrite(text_run, workspace, capsys):
    path = workspace / "results" / "scores.json"  # its folder is made
    before = tree_hashes(workspace)
    assert fedlora(capsys, "evaluate", text_run, "--json", path, "--device", "cpu")[0] == 0
    first = json.loads(path.read_text())
    assert first["written_by"] == "fedlora evaluate" and "accuracy" in first
    assert outside(tree_hashes(workspace), "results") == before
    written = tree_hashes(workspace)
    line = refused(capsys, "evaluate", text_run, "--json", path)
    assert f"--json {path}" in line and "--overwrite" in line
    assert tree_hashes(workspace) == written
    assert fedlora(capsys, "evaluate", text_run, "--json", path, "--overwrite", "--device", "cpu")[0] == 0
    assert json.loads(path.read_text()) == first  # the same scores again, and no temporary file beside it
    assert tree_hashes(workspace) == written


def _job_args(data) -> list[str]:
    return ["--model", "tiny-bert", "--dataset", str(data), "--no-dp", "--clients", "2", "--rounds", "1",
            "--local-steps", "1", "--set", "seq_len=16", "--set", "batch_size=8", "--quiet"]


@pytest.mark.parametrize("command", [["run"], ["simulate"], ["compare", "--methods", "fedit", "--dp", "off"]])
def test_jobs_write_only_their_own_folder(text_run, workspace, capsys, command):
    """A job's data file and the user's files beside its folder are left as they were; a folder holding
    the user's files is refused (with --overwrite too), and so is a run folder the user added a file to."""
    data = workspace / "topics.csv"
    data.write_bytes((text_run.parent / "topics.csv").read_bytes())
    before = tree_hashes(workspace)
    code, _, err = fedlora(capsys, *command, *_job_args(data), "--out", workspace / "job")
    assert code == 0, err
    assert outside(tree_hashes(workspace), "job") == before

    for overwrite in ([], ["--overwrite"]):
        held = tree_hashes(workspace)
        line = refused(capsys, *command, *_job_args(data), "--out", workspace / "mine", *overwrite)
        assert "mine" in line and "data.bin" in line
        assert tree_hashes(workspace) == held

    (workspace / "job" / "my-notes.md").write_text("the user's own file inside a run folder")
    held = tree_hashes(workspace)
    line = refused(capsys, *command, *_job_args(data), "--out", workspace / "job", "--overwrite")
    assert "my-notes.md" in line
    assert tree_hashes(workspace) == held
