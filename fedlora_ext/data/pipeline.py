"""The data pipeline: every kind of data (classification, plain documents, SFT), from the run's, the
evaluation's or a test's settings, goes read -> clean -> split -> fingerprint -> tokenise, each stage once
and in that order, here and nowhere else:

1. :func:`fedlora_ext.data.read.read`: the raw columns of the source (packaged corpus, file, folder, Hub);
2. :func:`fedlora_ext.data.clean.clean`: checked rows with stable ids (invalid rows refused or dropped);
3. :func:`fedlora_ext.data.split.split`: the seeded train/test split (or the source's own test split);
4. :func:`fedlora_ext.data.fingerprint.fingerprint`: the content digests and the token cache key;
5. :func:`fedlora_ext.data.tokenise.tokenise`: the ``datasets`` tables, tokenised when a tokenizer is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora_ext.data.clean import clean
from fedlora_ext.data.fingerprint import Fingerprint, fingerprint
from fedlora_ext.data.read import read
from fedlora_ext.data.split import split
from fedlora_ext.data.tokenise import Tokens, tokenise

__all__ = ["DataSpec", "Prepared", "Tokens", "prepare"]


@dataclass(frozen=True)
class DataSpec:
    """What data a run (or an evaluation) reads, and how it splits it; the fields are ``FedConfig``'s."""

    dataset: str
    kind: str  # "classification", "documents" or "sft"
    seed: int = 0
    eval_fraction: float = 0.2
    max_examples: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    category_column: str | None = None
    encoding: str = "utf-8"
    drop_invalid_rows: bool = False

    @classmethod
    def of(cls, config) -> DataSpec:
        """The data settings of a ``FedConfig`` (its task decides the kind)."""
        kind = {"causal_lm": "documents", "sft": "sft"}.get(config.task, "classification")
        return cls(config.dataset, kind, config.seed, config.eval_fraction, config.max_examples, config.text_column,
                   config.label_column, config.category_column, config.encoding, config.drop_invalid_rows)


@dataclass
class Prepared:
    """The data of one run: ``train`` / ``test`` tables (tokenised with ``Tokens``; a split not asked for is
    None) and the rows dropped from each by tokenising, the id names (the model's order), the SFT format,
    what the test set is, notes for the run's header, the fingerprints, the row counts before tokenising
    and the tokenizer used (None: untokenised)."""

    train: object
    test: object
    dropped: dict[str, int]
    names: list[str]
    format: str | None
    eval_split: str
    notes: tuple[str, ...]
    fingerprint: Fingerprint
    counts: dict[str, int]
    tokenizer: object | None = None


def prepare(spec: DataSpec, tokens=None, *, labels=None) -> Prepared:
    """``spec``'s data through the five stages. ``tokens``: :class:`Tokens`, or a function that returns them
    (called once the rows are split, so that data problems are reported before tokenizer ones); None stops
    at the untokenised tables. ``labels`` (classification; None: the data's own order) maps the data's
    label names to (the names the model uses, notes).

    Raises:
        FileNotFoundError, ValueError: in one line naming the dataset (see each stage).
    """
    raw = read(spec.dataset, spec.kind, text_column=spec.text_column, label_column=spec.label_column,
               category_column=spec.category_column, encoding=spec.encoding)
    rows = clean(raw, drop=spec.drop_invalid_rows, labels=labels)
    parts = split(rows.parts, rows.own, rows.unused, seed=spec.seed, test_fraction=spec.eval_fraction,
                  max_examples=spec.max_examples, what=rows.what)
    if callable(tokens):
        tokens = tokens()
    prints = fingerprint(rows, parts.train, parts.test, tokens)
    tables = tokenise(rows, parts.train, parts.test, tokens, prints.cache_key)
    train, test = (tables.get(s, (None, 0)) for s in ("train", "test"))
    return Prepared(train[0], test[0], {"train": train[1], "test": test[1]}, rows.names, rows.format,
                    parts.eval_split, tuple(rows.notes + parts.notes + rows.label_notes), prints,
                    {"train": len(parts.train), "test": len(parts.test)}, tokens and tokens.tokenizer)


def unlabelled_documents(dataset: str, *, text_column: str | None, encoding: str):
    """(the raw table, its cleaned rows) of ``dataset`` read as plain documents, for a model to label
    (``fedlora predict``): the read and clean stages only, nothing dropped (a bad text is refused with its
    row number), no split, no labels."""
    raw = read(dataset, "documents", text_column=text_column, encoding=encoding)
    return raw, clean(raw, drop=False)

