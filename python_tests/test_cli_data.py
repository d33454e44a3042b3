"""A user's data through `fedlora run`: refused in one line, or used exactly as given (issue 13, data side).

Each case writes real files in ``tmp_path``. Most go through ``fedlora_ext.app.cli.main`` in-process (what
the CLI prints, without paying for the imports again); the Hub cases run in a subprocess with the offline
variables set before anything is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora_ext.app.cli import main
from fedlora_ext.data.text import load_text
from fedlora_ext.federated import FedConfig

TINY_RUN = ["--model", "tiny-bert", "--rounds", "1", "--clients", "2", "--no-dp", "--iid", "--set", "local_steps=1",
            "--set", "seq_len=16", "--set", "batch_size=8", "--quiet"]


def write_csv(path: Path, rows: list[tuple], header: str = "text,label") -> Path:
    path.write_text("\n".join([header, *(",".join(str(v) for v in row) for row in rows)]) + "\n")
    return path


def reviews(n: int = 40, flip: bool = False) -> list[tuple]:
    return [(f"review {i} {'great fine' if i % 2 else 'awful bad'}", "pos" if (i % 2) != flip else "neg")
            for i in range(n)]


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = main(["run", *TINY_RUN, *argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_refused(code: int, lines: list[str], *fragments: str) -> str:
    errors = [line for line in lines if line.startswith("fedlora: error:")]
    assert code == 2 and len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def label_ids(data) -> list[int]:
    return [int(v) for v in data["label"]]


def config_for(dataset: str, **changes) -> FedConfig:
    values = dict(model="tiny-bert", dataset=dataset, num_clients=2, rounds=1, local_steps=1, seq_len=16,
                  batch_size=8, dirichlet_alpha=None)
    return FedConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------------------- the cache

def test_cache_key_changes_with_content_and_settings(tmp_path):
    from transformers import AutoTokenizer

    from fedlora_ext.data.fingerprint import token_cache_key
    from fedlora_ext.data.models import packaged_model_folder

    source = packaged_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = write_csv(tmp_path / "my.csv", reviews())
    before = load_text(str(path), seed=0).fingerprint
    assert load_text(str(path), seed=0).fingerprint == before  # same content, same key
    write_csv(path, reviews(flip=True))  # the same file, only its labels edited
    after = load_text(str(path), seed=0).fingerprint
    assert after != before

    def key(digest, **settings):
        return token_cache_key(digest, tokenizer, source, **{"seq_len": 16, "task": "classification", **settings})

    assert key(before) == key(before) and key(before) != key(after)
    assert key(before) != key(before, seq_len=32) and key(before) != key(before, task="causal_lm")
    copy = tmp_path / "tok"
    tokenizer.save_pretrained(copy)
    local = AutoTokenizer.from_pretrained(copy)
    first = token_cache_key(before, local, str(copy), seq_len=16, task="classification")
    vocab = copy / "tokenizer.json"  # a tokenizer edited in place, same class, name and size
    vocab.write_text(vocab.read_text().replace("[unused0]", "[unused9999]"))
    assert token_cache_key(before, local, str(copy), seq_len=16, task="classification") != first


def test_an_edited_csv_is_tokenised_again_in_the_same_run_folder(tmp_path):
    from fedlora_ext.data.task import build_task

    path = write_csv(tmp_path / "my.csv", reviews())
    config = config_for(str(path), out_dir=str(tmp_path / "run"))
    first = build_task(config)
    write_csv(path, reviews(flip=True))
    second = build_task(config)  # the same configuration and run folder, other content
    assert first.label_names == second.label_names == ["neg", "pos"]
    assert label_ids(first.test) == [1 - v for v in label_ids(second.test)]
    assert len(list((tmp_path / "run" / "cache").glob("test-*.arrow"))) == 2


def test_run_after_editing_labels_recomputes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "my.csv", reviews())
    code, _, _ = run_cli(["--dataset", "my.csv", "--out", "one"], capsys)
    write_csv(tmp_path / "my.csv", reviews(flip=True))
    code2, _, _ = run_cli(["--dataset", "my.csv", "--out", "two"], capsys)
    assert code == code2 == 0
    keys = [{p.name for p in (tmp_path / run / "cache").glob("*.arrow")} for run in ("one", "two")]
    assert keys[0] and keys[0].isdisjoint(keys[1])  # nothing of the first run's tokens is reused


# --------------------------------------------------------------------------------------------- labels

def test_empty_labels_are_refused_with_rows_or_dropped_and_counted(tmp_path, capsys, monkeypatch):
    from fedlora_ext.data.task import build_task

    monkeypatch.chdir(tmp_path)
    rows = [(text, "" if i in (3, 7) else label) for i, (text, label) in enumerate(reviews())]
    rows[10] = (rows[10][0], "   ")
    write_csv(tmp_path / "my.csv", rows)
    code, _, lines = run_cli(["--dataset", "my.csv", "--out", "bad"], capsys)
    assert_refused(code, lines, "my.csv'", "3 row(s)", "label_column 'label'", "data rows 4, 8, 11",
                   "drop_invalid_rows")
    code, out, _ = run_cli(["--dataset", "my.csv", "--set", "drop_invalid_rows=true", "--out", "dropped"], capsys)
    assert code == 0 and "summary:" in out
    task = build_task(config_for("my.csv", drop_invalid_rows=True))
    assert len(task.train) + len(task.test) == 37
    assert any("dropped 3 of 40 rows" in note for note in task.notes), task.notes


def test_empty_text_cells_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = reviews()
    rows[5] = ("", "pos")
    rows[6] = ("  ", "neg")
    write_csv(tmp_path / "my.csv", rows)
    code, _, lines = run_cli(["--dataset", "my.csv"], capsys)
    assert_refused(code, lines, "2 row(s)", "text_column 'text'", "data rows 6, 7")


def test_numeric_labels_are_ordered_as_numbers(tmp_path):
    path = write_csv(tmp_path / "n.csv", [(f"text {i}", i % 12) for i in range(48)])
    data = load_text(str(path), seed=0)
    assert data.label_names == [str(i) for i in range(12)]  # 9 before 10
    texts = list(data.train["text"]) + list(data.test["text"])
    ids = list(data.train["label"]) + list(data.test["label"])
    assert all(int(t.split()[1]) % 12 == i for t, i in zip(texts, ids))
    # a column datasets reads as strings (one cell is odd) still orders its numbers numerically
    strings = write_csv(tmp_path / "s.csv", [(f"text {i}", i % 12) for i in range(48)] + [("odd one", "x")])
    assert load_text(str(strings), seed=0).label_names == [*[str(i) for i in range(12)], "x"]


def test_whole_float_labels_are_integers_and_fractions_are_refused(tmp_path):
    path = write_csv(tmp_path / "f.csv", [(f"text {i}", f"{1.0 + i % 2:.1f}") for i in range(20)])
    data = load_text(str(path), seed=0)
    assert data.label_names == ["1", "2"]
    assert all(int(t.split()[1]) % 2 == i for t, i in zip(data.train["text"], data.train["label"]))
    bad = write_csv(tmp_path / "g.csv", [(f"text {i}", 0.5 + i % 2) for i in range(20)])
    with pytest.raises(ValueError, match=r"label_column 'label' holds 0\.5 .*not a whole number"):
        load_text(str(bad), seed=0)


def test_class_label_names_and_order_are_kept(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["zeta", "alpha", "mid"])})
    datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(30)], "label": [i % 3 for i in range(30)]},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    data = load_text(str(tmp_path / "saved"), seed=0)
    assert data.label_names == ["zeta", "alpha", "mid"]
    assert all(int(t.split()[1]) % 3 == i for t, i in zip(data.train["text"], data.train["label"]))


def test_a_dataset_dict_is_evaluated_on_its_own_test_split(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    split = {name: [(f"{name} {i} {'great' if i % 2 else 'awful'}", "pos" if i % 2 else "neg") for i in range(n)]
             for name, n in (("train", 30), ("test", 7))}
    columns = {name: {"text": [t for t, _ in rows], "label": [label for _, label in rows]}
               for name, rows in split.items()}
    datasets.DatasetDict({name: datasets.Dataset.from_dict(c) for name, c in columns.items()}).save_to_disk(
        str(tmp_path / "dd"))
    data = load_text("dd", seed=0)
    assert (len(data.train), len(data.test)) == (30, 7) and data.eval_split == "the dataset's own 'test' split"
    assert all(t.startswith("test ") for t in data.test["text"])
    code, out, _ = run_cli(["--dataset", "dd", "--out", "run"], capsys)
    assert code == 0 and "30 train / 7 test" in out
    # a folder of data files with several splits: trained on train, evaluated on validation
    (tmp_path / "folder").mkdir()
    for name, n in (("train", 20), ("validation", 6)):
        write_csv(tmp_path / "folder" / f"{name}.csv", [(f"{name} {i}", i % 2) for i in range(n)])
    data = load_text("folder", seed=0)
    assert (len(data.train), len(data.test), data.eval_split) == (20, 6, "the dataset's own 'validation' split")
    assert all(t.startswith("validation ") for t in data.test["text"])


# ------------------------------------------------------------------------------------------- encoding

def test_a_latin1_csv_is_refused_with_the_offset_then_read_with_its_encoding(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = "text,label\n" + "".join(f"{t},{l}\n" for t, l in reviews()[:5]) + "caf\xe9 au lait,pos\n"
    body += "".join(f"{t},{l}\n" for t, l in reviews()[5:])
    raw = body.encode("latin-1")
    (tmp_path / "latin.csv").write_bytes(raw)
    code, _, lines = run_cli(["--dataset", "latin.csv"], capsys)
    offset = raw.index("\xe9".encode("latin-1"))
    assert_refused(code, lines, "latin.csv", "utf-8", f"offset {offset}", "line 7", "encoding=latin-1")
    code, out, _ = run_cli(["--dataset", "latin.csv", "--set", "encoding=latin-1", "--out", "run"], capsys)
    assert code == 0 and "summary:" in out
    data = load_text("latin.csv", seed=0, encoding="latin-1")
    assert "café au lait" in list(data.train["text"]) + list(data.test["text"])


# ------------------------------------------------------------------------------------ paths and the Hub

def test_a_missing_local_path_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, lines = run_cli(["--dataset", "./nope.csv"], capsys)
    assert_refused(code, lines, "dataset './nope.csv'", "no such file")
    code, _, lines = run_cli(["--dataset", "data/reviews.jsonl"], capsys)
    assert_refused(code, lines, "dataset 'data/reviews.jsonl'")
    assert time.perf_counter() - started < 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMED = ("import sys, time; from fedlora_ext.app.cli import main; t = time.perf_counter(); code = main(sys.argv[1:]); "
         "print(f'SECONDS {time.perf_counter() - t:.2f}'); sys.exit(code)")


@pytest.mark.parametrize("env,argv,fragment", [
    ({"HF_HUB_OFFLINE": "1"}, ["--dataset", "someorg/some-dataset"], "dataset 'someorg/some-dataset'"),
    ({"HF_ENDPOINT": "closed"}, ["--dataset", "someorg/some-dataset"], "dataset 'someorg/some-dataset'"),
    ({"HF_HUB_OFFLINE": "1"}, ["--model", "someorg/some-model", "--dataset", "my.csv"], "model 'someorg/some-model'"),
], ids=["dataset-offline", "dataset-closed-endpoint", "model-offline"])
def test_a_hub_name_without_network_fails_within_seconds(env, argv, fragment, tmp_path):
    write_csv(tmp_path / "my.csv", reviews())
    env = {**os.environ, **env}
    if env.get("HF_ENDPOINT") == "closed":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
        env.pop("HF_HUB_OFFLINE", None), env.pop("HF_DATASETS_OFFLINE", None), env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", TIMED, "run", *TINY_RUN, *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("fedlora: error:") and fragment in lines[0], lines[0]
    assert "Hugging Face Hub is not reachable (no network)" in lines[0], lines[0]
    assert float(done.stdout.split("SECONDS")[1]) < 10


# ------------------------------------------------------------------------------------------- the model

def test_a_model_folder_without_config_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "model.safetensors").write_bytes(b"")
    write_csv(tmp_path / "my.csv", reviews())
    code, _, lines = main(["run", *TINY_RUN, "--model", "mymodel", "--dataset", "my.csv"]), *capsys.readouterr()
    assert_refused(code, lines.strip().splitlines(), "mymodel' has no config.json", "no config.json")


def test_a_seq_len_beyond_the_model_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "my.csv", reviews())
    code, _, lines = run_cli(["--dataset", "my.csv", "--set", "seq_len=4096"], capsys)
    assert_refused(code, lines, "seq_len 4096", "'tiny-bert'", "128")


def _saved_classifier(folder: Path, labels: list[str]) -> Path:
    import transformers as tf

    from fedlora_ext.data.models import packaged_model_folder

    tokenizer = tf.AutoTokenizer.from_pretrained(packaged_model_folder())
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=64, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_saved_head_is_checked_against_the_data(tmp_path):
    from fedlora_ext.data.task import build_task

    path = write_csv(tmp_path / "my.csv", reviews())
    three = _saved_classifier(tmp_path / "three", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"model '.*three' has a saved classification head for 3 labels, but the "
                                         r"data has 2 labels"):
        build_task(config_for(str(path), model=str(three)))
    with pytest.raises(ValueError, match=r"seq_len 100 is above the maximum of model '.*three': 64 positions"):
        build_task(config_for(str(path), model=str(three), seq_len=100))
    # the same labels in another order: the head's class i stays class i
    swapped = _saved_classifier(tmp_path / "swapped", ["pos", "neg"])
    task = build_task(config_for(str(path), model=str(swapped)))
    assert task.label_names == ["pos", "neg"] and any("saved head" in note for note in task.notes)
    rows = dict(reviews())
    assert all((rows[t] == "pos") == (i == 0) for t, i in zip(load_text(str(path), seed=0).test["text"],
                                                              label_ids(task.test)))
    assert task.eval_split == "a seeded 20% split of the data"


def test_packaged_corpus_and_synthetic_tasks_describe_their_test_set():
    from fedlora_ext.data.task import build_task

    synthetic = build_task(FedConfig(num_examples=32))
    assert "synthetic" in synthetic.eval_split and synthetic.notes == ()
    bbc = load_text("bbc_news", seed=0, max_examples=40)
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.eval_split == "a seeded 20% split of the data" and bbc.notes == ()
    assert json.dumps(list(bbc.notes)) == "[]"
