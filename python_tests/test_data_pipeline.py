"""Data as one pipeline (issue 24 item 4): the fingerprints, token cache keys and tokens of every kind of
data stay what they were before the data layer became read -> clean -> split -> fingerprint -> tokenise.

The golden digests were computed at commit 7ff5f8f (before the refactor) from the packaged corpora and
from small files written here; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json

import pytest

from fedlora_ext.data.task import build_task
from fedlora_ext.federated import FedConfig


def write_csv(path, rows, header="text,label"):
    path.write_text("\n".join([header, *(",".join(str(v) for v in row) for row in rows)]) + "\n")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def config_for(dataset: str, **changes) -> FedConfig:
    values = dict(model="tiny-bert", dataset=dataset, num_clients=2, rounds=1, local_steps=1, seq_len=16,
                  batch_size=8, dirichlet_alpha=None)
    return FedConfig(**{**values, **changes})


def tokens_digest(task) -> str:
    """SHA-256 of both splits' token ids, masks, targets and labels (what training sees)."""
    digest = hashlib.sha256()
    for split in (task.train, task.test):
        rows = split[:]
        for column in ("input_ids", "attention_mask", "labels", "label"):
            digest.update(rows[column].numpy().tobytes())
    return digest.hexdigest()


def csv_rows():
    rows = [(f"review {i} {'great fine' if i % 2 else 'awful bad'}", "pos" if i % 2 else "neg") for i in range(30)]
    rows[5] = (rows[5][0], "")  # an empty label: dropped under drop_invalid_rows
    return rows


def sft_rows():
    rows = [{"instruction": f"add {i} and {i}", "input": "" if i % 3 else f"{i}", "output": f"{2 * i}",
             "category": "even" if i % 2 == 0 else "odd"} for i in range(24)]
    rows[4]["output"] = ""  # dropped under drop_invalid_rows
    return rows


CASES = {
    "packaged classification": lambda tmp: config_for("bbc_news", max_examples=40),
    "packaged sft": lambda tmp: config_for("bbc_news", task="sft", model="tiny-llama", max_examples=40, seq_len=32),
    "packaged documents": lambda tmp: config_for("bbc_news", task="causal_lm", model="tiny-llama", max_examples=40),
    "user csv": lambda tmp: config_for(write_csv(tmp / "my.csv", csv_rows()), drop_invalid_rows=True),
    "user sft jsonl": lambda tmp: config_for(write_jsonl(tmp / "sft.jsonl", sft_rows()), task="sft",
                                             model="tiny-llama", seq_len=32, drop_invalid_rows=True,
                                             category_column="category"),
    "user folder with a test split": lambda tmp: config_for(_write_folder(tmp / "folder"), max_examples=12),
    "user txt": lambda tmp: config_for(_write_txt(tmp / "docs.txt"), task="causal_lm", model="tiny-llama"),
    "user documents jsonl": lambda tmp: config_for(
        write_jsonl(tmp / "docs.jsonl", [{"text": f"note {i} says {'x' * (i % 5)}", "label": i % 2}
                                         for i in range(20)]), task="causal_lm", model="tiny-llama"),
}


def _write_folder(folder):
    folder.mkdir()
    write_csv(folder / "train.csv", [(f"train text {i}", i % 3) for i in range(15)])
    write_csv(folder / "validation.csv", [(f"spare text {i}", i % 3) for i in range(4)])
    write_csv(folder / "test.csv", [(f"test text {i}", (i + 1) % 3) for i in range(6)])
    return str(folder)


def _write_txt(path):
    path.write_text("".join(f"line {i} of the plain corpus\n" + ("\n" if i % 7 == 0 else "") for i in range(25)),
                    encoding="utf-8")
    return str(path)


#: case -> (Task.fingerprint, tokens_digest, eval_split, notes), at commit 7ff5f8f
GOLDEN = {
    "packaged classification": ("c187c684072c8c280ad0b31deae6f9c2a96a875de50d1dcea4ca59391831c1ea",
                                "83193e5414fdf53099c94f78c6197c14f5dbd3fcff9199d15307d7328c8805be",
                                "a seeded 20% split of the data", []),
    "packaged documents": ("7c42ce08001892e881bf1c41837728d2298811614b0022d7bdd518f07f27d200",
                           "fb7ff9033f1221fedd9c98149f9e7419ddbd16bbcb0c3a4e31aa6aeb0bb91831",
                           "a seeded 20% split of the data", []),
    "packaged sft": ("6ccfb5ad49a28980c12ceac54363ef48e8ef8ffafa534c3be7f389b991169292",
                     "c4255d6852162f3f34529e7d1496d510ae1f8eca3cce206b448855bc1282dd75",
                     "a seeded 20% split of the data",
                     ["prompt_response format; categories: business, entertainment, politics, sports, tech"]),
    "user csv": ("96c893c1b61e8978301a91dbee5b7d38fbfaf65514d986acd84ff9884c59c864",
                 "f1d006d77a6c21b70d26be8ffb158c7a17997b715be39bffa65157b4c404a54e",
                 "a seeded 20% split of the data",
                 ["dropped 1 of 30 rows with an empty or missing label or text (drop_invalid_rows): 1 without a "
                  "label, 0 without text"]),
    "user documents jsonl": ("a701481ae28f962236383d23f143af0f2e56a096d2e23425ae4e2127b0bb2658",
                             "60fa025d0bbfe0403ca94710d4d3322e61616e0a12a2754117ff18dddd48600b",
                             "a seeded 20% split of the data",
                             ["column(s) ['label'] ignored: plain documents have no labels"]),
    "user folder with a test split": ("ed9d05fd54a5b961027ac6b7741887792a5a8f43f7fc7a76f8a29cd0e348f368",
                                      "f50b1fbb9d5bb1f61c4d3848bce135c874693885edebe5f5329c71610fa51528",
                                      "the dataset's own 'test' split",
                                      ["max_examples 12: a seeded 9 of 15 train and 3 of 6 'test' examples",
                                       "split(s) ['validation'] not used: trained on ['train'], evaluated on 'test'"]),
    "user sft jsonl": ("7a7e003b46200c7329cc26aa45b9dbe09dc5b89169c9b4400c6285fbf824e562",
                       "5b2d7b7e55709b2d4afd4ff64a6556797ec7879a7ea948eff94de7e96526c608",
                       "a seeded 20% split of the data",
                       ["alpaca format; categories: even, odd",
                        "dropped 1 of 24 rows with an empty or missing response, prompt or category "
                        "(drop_invalid_rows): 1 without a response, 0 without a prompt, 0 without a category"]),
    "user txt": ("d0672a719cec8d74c71b90041c6366f6e5ab93e77ed8ba4c525e29b6294f096d",
                 "423ba9b9be97bd3ccf4216ee1d4b9694ab46718028d3db14810ec297615ab4e7",
                 "a seeded 20% split of the data",
                 ["skipped 4 empty line(s): in a text file each non-empty line is one document"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fingerprints_and_tokens_are_those_of_before_the_pipeline(case, tmp_path):
    task = build_task(CASES[case](tmp_path))
    got = (task.fingerprint, tokens_digest(task), task.eval_split, list(task.notes))
    assert got == GOLDEN[case]


class _Tokenizer:
    """What the token cache key reads of a tokenizer, with a fixed name (a real one's is its folder path)."""

    name_or_path = "golden-tokenizer"
    pad_token, pad_token_id = "[PAD]", 0
    padding_side, truncation_side = "right", "right"

    def __len__(self):
        return 1234


#: (data digest, seq_len, task) -> the token cache key at commit 7ff5f8f (library versions pinned below)
GOLDEN_KEYS = {(16, "classification"): "963a2a5a98769e5f373367aa", (32, "causal_lm"): "34eaca30c8e3a22178732a17",
               (64, "sft"): "874a3d744ccdc8b5174981b4"}


@pytest.mark.parametrize("seq_len, task", [(16, "classification"), (32, "causal_lm"), (64, "sft")])
def test_the_token_cache_key_is_that_of_before_the_pipeline(seq_len, task, tmp_path, monkeypatch):
    import datasets
    import transformers

    from fedlora_ext.data.fingerprint import token_cache_key

    monkeypatch.setattr(transformers, "__version__", "golden-transformers")
    monkeypatch.setattr(datasets, "__version__", "golden-datasets")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    digest = hashlib.sha256(b"content").hexdigest()
    key = token_cache_key(digest, _Tokenizer(), str(tmp_path), seq_len=seq_len, task=task)
    assert key == GOLDEN_KEYS[(seq_len, task)]


#: case -> tokens_digest of ``evaluation_data`` (the rows the run held out, or its own test split), at 7ff5f8f
_HELD = "the {} rows the run held out of <data> (eval_fraction 0.2, seed 0; it has no test split)"
GOLDEN_EVALUATION = {
    "packaged classification": ("9e053ce267b611a6764df0c7addd051babc51913fab959db826f3c868c9c6562", _HELD.format(8)),
    "packaged documents": ("04a6688d405d22ca8ba033636beed3299abc2283fe53dde33296bff5a215493e", _HELD.format(8)),
    "packaged sft": ("12d8cd64e53f203a0ca4399edc99eac48e9f02332fb2414c675f659959b50f11", _HELD.format(8)),
    "user csv": ("b968df2dc0ef085a1f0cd0b98530d508ddeb6d15193342ba0b74d57082d4c38c", _HELD.format(6)),
    "user documents jsonl": ("604b9b2f12dfd77bcf10fef4a0e0a7467ceed0072fb6878b8cd7288f707d7882", _HELD.format(4)),
    "user folder with a test split": ("65d5363963427ad6a15f62e1d4c026cebe4cd9f2477f7e83b1d9ce52b1ba1cb8",
                                      "the dataset's own 'test' split of <data> (3 examples)"),
    "user sft jsonl": ("3071fd1ff4e119846ccc646f5fb63402d0e46941d3cc4daad6e0342305a3a9b5", _HELD.format(5)),
    "user txt": ("fe166e4bfc0f97def73fec2987e2922a1162c73086f1bdd379f700348bc1b0c6", _HELD.format(5)),
}


@pytest.mark.parametrize("case", list(GOLDEN_EVALUATION))
def test_evaluation_data_is_that_of_before_the_pipeline(case, tmp_path):
    from fedlora_ext.app.evaluation import evaluation_data

    config = CASES[case](tmp_path)
    task = build_task(config)
    data, what = evaluation_data(config, task.tokenizer, task.label_names, len(task.label_names) or None,
                                 held_by="the run")
    rows = data[:]
    digest = hashlib.sha256()
    for column in ("input_ids", "attention_mask", "labels", "label"):
        digest.update(rows[column].numpy().tobytes())
    assert (digest.hexdigest(), what.replace(repr(config.dataset), "<data>")) == GOLDEN_EVALUATION[case]


# ------------------------------------------------------------------------------------------ the one flow

STAGES = ("read", "clean", "split", "fingerprint", "tokenise")


@pytest.fixture
def calls(monkeypatch):
    """The stage entries the pipeline calls, in order (each still does its work)."""
    from fedlora_ext.data import pipeline

    seen = []
    for stage in STAGES:
        def record(*args, _stage=stage, _entry=getattr(pipeline, stage), **kwargs):
            seen.append(_stage)
            return _entry(*args, **kwargs)

        monkeypatch.setattr(pipeline, stage, record)
    return seen


@pytest.mark.parametrize("case", ["packaged classification", "user csv", "user sft jsonl", "packaged sft",
                                  "user txt", "user documents jsonl"])
def test_every_kind_of_data_goes_through_the_stages_once_in_order(case, tmp_path, calls):
    config = CASES[case](tmp_path)
    build_task(config)
    assert calls == list(STAGES)
    calls.clear()
    from fedlora_ext.app.evaluation import evaluation_data

    task = build_task(config)
    calls.clear()
    evaluation_data(config, task.tokenizer, task.label_names, len(task.label_names) or None)
    assert calls == list(STAGES)


def test_the_loaders_are_the_same_pipeline(tmp_path, calls):
    from fedlora_ext.data.sft import load_sft
    from fedlora_ext.data.text import load_documents, load_text

    load_text(write_csv(tmp_path / "my.csv", csv_rows()), seed=0, drop_invalid_rows=True)
    load_documents(_write_txt(tmp_path / "docs.txt"), seed=0)
    load_sft(write_jsonl(tmp_path / "sft.jsonl", sft_rows()), seed=0, drop_invalid_rows=True)
    assert calls == list(STAGES) * 3


def test_only_the_pipeline_calls_a_stage():
    """No module but :mod:`fedlora_ext.data.pipeline` imports a stage's entry."""
    import ast
    from pathlib import Path

    import fedlora_ext

    root = Path(fedlora_ext.__file__).parent
    entries = {f"fedlora_ext.data.{stage}": stage for stage in STAGES}
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in entries:
                if any(alias.name == entries[node.module] for alias in node.names):
                    importers.add(path.relative_to(root).as_posix())
            if isinstance(node, ast.Import) and any(alias.name in entries for alias in node.names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"data/pipeline.py"}
