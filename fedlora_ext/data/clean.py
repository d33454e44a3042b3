"""Stage 2 of the data pipeline, cleaning: raw columns become checked rows with stable ids. Nothing is
dropped or re-labelled silently: invalid rows are refused with their row numbers, or dropped and counted
under ``drop_invalid_rows`` (:mod:`fedlora_ext.data.labels`, :mod:`fedlora_ext.data.clean_sft`).

* classification: (text, label id) rows; ids follow :func:`fedlora_ext.data.labels.order_labels`, then the
  model's label order when the caller passes one (a saved head's, or an evaluated model's);
* plain documents: texts (a ``.txt`` file's empty lines are skipped and counted);
* SFT: (prompt, response, category id) rows.

The packaged corpora are read complete: their rows are not checked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora_ext.data.clean_sft import sft_rows
from fedlora_ext.data.labels import clean_rows, order_labels
from fedlora_ext.data.read import Raw


@dataclass
class Rows:
    """Checked rows: ``parts`` (split -> rows: ``(text, label id)``, a text, or ``(prompt, response,
    category id)``), the own test split and the unused ones (as read), ``names`` (id i is ``names[i]``;
    empty for documents and SFT without categories), ``data_names`` (the data's own order of them, before a
    model's), the SFT format, ``notes`` (read and cleaning) and ``label_notes`` (labels that follow a model)."""

    kind: str
    what: str
    parts: dict[str, list]
    own: str | None
    unused: list[str]
    names: list[str] = field(default_factory=list)
    data_names: list[str] = field(default_factory=list)
    format: str | None = None
    notes: list[str] = field(default_factory=list)
    label_notes: list[str] = field(default_factory=list)


def clean(raw: Raw, *, drop: bool, labels=None) -> Rows:
    """The rows of ``raw``, checked; ``labels`` (classification only; None: the data's order) maps the
    data's label names to (the names the model uses, notes): ids are then the model's.

    Raises:
        ValueError: invalid rows (unless ``drop``), labels that are not classes, fewer than 2 labels, or
            labels ``labels`` refuses; in one line naming the dataset and column.
    """
    rows = Rows(raw.kind, raw.what, {}, raw.own, raw.unused, format=raw.format, notes=list(raw.notes))
    rows.parts, rows.names, more = _CLEANERS[raw.kind](raw, drop)
    rows.notes += more
    rows.data_names = list(rows.names)
    if labels is not None and raw.kind == "classification":
        _follow(rows, labels)
    return rows


def _labelled(raw: Raw, drop: bool):
    parts = {split: (columns["text"], columns["label"]) for split, columns in raw.parts.items()}
    notes: list[str] = []
    if not raw.packaged:
        parts, notes = clean_rows(parts, what=raw.what, text_column=raw.columns["text"],
                                  label_column=raw.columns["label"], class_names=raw.class_names, drop=drop)
    names, ids = order_labels(parts, what=raw.what, label_column=raw.columns.get("label"),
                              class_names=raw.class_names)
    if len(names) < 2:
        raise ValueError(f"{raw.what} has {len(names)} label(s); classification needs at least 2")
    return {split: list(zip(parts[split][0], ids[split])) for split in parts}, names, notes


def _documents(raw: Raw, drop: bool):
    parts = {split: columns["text"] for split, columns in raw.parts.items()}
    if raw.packaged:
        return parts, [], []
    if raw.text_file:  # lines of .txt files: empty ones separate documents
        empty = sum(1 for lines in parts.values() for line in lines if not line.strip())
        parts = {split: [line for line in lines if line.strip()] for split, lines in parts.items()}
        note = f"skipped {empty} empty line(s): in a text file each non-empty line is one document"
        return parts, [], [note] if empty else []
    text_column = raw.columns["text"]
    unlabelled = {split: (texts, [0] * len(texts)) for split, texts in parts.items()}  # labels that are never bad
    kept, _ = clean_rows(unlabelled, what=raw.what, text_column=text_column, label_column=None, class_names=None,
                         drop=drop)  # refuses bad texts with their row numbers unless drop
    documents = {split: texts for split, (texts, _) in kept.items()}
    total, left = (sum(len(texts) for texts in d.values()) for d in (parts, documents))
    notes = []
    if left < total:
        notes.append(f"dropped {total - left} of {total} rows with an empty or non-text value in text_column "
                     f"{text_column!r} (drop_invalid_rows)")
    return documents, [], notes


def _instructions(raw: Raw, drop: bool):
    category = raw.columns.get("category")
    if raw.packaged:
        parts = {split: list(zip(c["prompt"], c["response"], c["category"])) for split, c in raw.parts.items()}
        notes: list[str] = []
    else:
        parts, notes = sft_rows(raw.parts, raw.format, raw.what, category, raw.class_names, drop)
    if category is None:
        names, ids = [], {split: [0] * len(rows) for split, rows in parts.items()}
    else:
        label_parts = {split: ([r[1] for r in rows], [r[2] for r in rows]) for split, rows in parts.items()}
        names, ids = order_labels(label_parts, what=raw.what, label_column=category, class_names=raw.class_names)
    return {split: [(p, r, i) for (p, r, _), i in zip(rows, ids[split])] for split, rows in parts.items()}, names, notes


#: kind -> (raw -> (split -> rows, id names, notes))
_CLEANERS = {"classification": _labelled, "documents": _documents, "sft": _instructions}


def _follow(rows: Rows, labels) -> None:
    """Label ids in the order ``labels`` gives (by name), with its notes."""
    names, notes = labels(rows.names)
    rows.label_notes = list(notes)
    if names == rows.names:
        return
    new_id = [names.index(name) for name in rows.names]
    rows.parts = {split: [(text, new_id[i]) for text, i in part] for split, part in rows.parts.items()}
    rows.names = list(names)
