"""Part of stage 2 (cleaning): rows a user gave, checked and labelled; nothing is dropped or re-labelled
silently.

* An empty or missing label (None, NaN, ``""``, whitespace; ``-1`` of a ``ClassLabel``) or an empty or
  non-string text is refused with the count and the first row numbers, or dropped (and counted) under
  ``drop_invalid_rows``.
* Label ids: a ``ClassLabel``'s own names and order; numbers (ints, whole floats such as ``3.0``, strings
  of digits) in numeric order and named ``"3"``; other strings sorted. A fractional number is refused.
"""

from __future__ import annotations

import math
import numbers
import re

_INTEGER = re.compile(r"[+-]?\d+")
_SHOWN = 5


def _natural(name: str) -> tuple:
    """Integers (``"9"``, ``" 10"``) first in numeric order, then the other names sorted."""
    return (0, int(name.strip()), name) if _INTEGER.fullmatch(name.strip()) else (1, 0, name)


def label_missing(value, class_names) -> bool:
    """None, NaN, a blank string, or a ClassLabel's -1 (no label)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    return class_names is not None and isinstance(value, numbers.Integral) and value < 0  # ClassLabel's -1


def _text_bad(value) -> bool:
    return not isinstance(value, str) or not value.strip()


def rows_where(rows: list[tuple[str, int]], several: bool) -> str:
    """Where ``rows`` (split, index) are, for an error line: 1-based row numbers (with the split when the
    data has ``several``)."""
    shown = ", ".join(f"{split}:{i + 1}" if several else str(i + 1) for split, i in rows[:_SHOWN])
    more = ", ..." if len(rows) > _SHOWN else ""
    where = f"rows {shown}{more} as split:row" if several else f"data rows {shown}{more}"
    return f"{where}; 1-based, not counting a header"


def refuse_unless(drop: bool, what: str, found: list[tuple[list, str]], several: bool) -> None:
    """Refuses invalid rows in one line, unless ``drop``: ``found`` holds (rows, what is wrong with them),
    each said with its count and first row numbers."""
    problems = [f"{len(rows)} row(s) have {wrong} ({rows_where(rows, several)})" for rows, wrong in found if rows]
    if problems and not drop:
        raise ValueError(f"{what}: {' and '.join(problems)}; fix them, or drop such rows with "
                         "--set drop_invalid_rows=true")


def valid(split: str, values: list, bad: set[tuple[str, int]]) -> list:
    """The values of ``split`` whose (split, index) is not in ``bad``."""
    return [v for i, v in enumerate(values) if (split, i) not in bad]


def clean_rows(parts: dict[str, tuple[list, list]], *, what: str, text_column: str, label_column: str,
               class_names, drop: bool) -> tuple[dict[str, tuple[list, list]], list[str]]:
    """``parts`` (split -> (texts, labels)) without invalid rows, and the notes that say what was dropped.

    Raises:
        ValueError: some rows are invalid and ``drop`` is false (count and first row numbers).
    """
    several = len(parts) > 1
    bad_labels, bad_texts = [], []
    for split, (texts, labels) in parts.items():
        bad_labels += [(split, i) for i, v in enumerate(labels) if label_missing(v, class_names)]
        bad_texts += [(split, i) for i, v in enumerate(texts) if _text_bad(v)]
    if not bad_labels and not bad_texts:
        return parts, []
    refuse_unless(drop, what, [(bad_labels, f"an empty or missing label in label_column {label_column!r}"),
                               (bad_texts, f"an empty or non-text value in text_column {text_column!r}")], several)
    bad = set(bad_labels) | set(bad_texts)
    total = sum(len(texts) for texts, _ in parts.values())
    kept = {split: (valid(split, texts, bad), valid(split, labels, bad)) for split, (texts, labels) in parts.items()}
    note = (f"dropped {len(bad)} of {total} rows with an empty or missing label or text (drop_invalid_rows): "
            f"{len(bad_labels)} without a label, {len(bad_texts)} without text")
    return kept, [note]


def order_labels(parts: dict[str, tuple[list, list]], *, what: str, label_column: str | None, class_names):
    """The label names (ids follow their order) and every split's labels as ids."""
    values = [v for _, labels in parts.values() for v in labels]
    nested = next((v for v in values if isinstance(v, (list, tuple, dict))), None)
    if nested is not None:
        raise ValueError(f"{what}: label_column {label_column!r} holds {type(nested).__name__} values such as "
                         f"{str(nested)[:60]}; classification takes one label per row")
    if class_names is not None:
        names = [str(n) for n in class_names]
        wrong = next((v for v in values if not (isinstance(v, numbers.Integral) and 0 <= v < len(names))), None)
        if wrong is not None:
            raise ValueError(f"{what}: label_column {label_column!r} holds {wrong!r}, not an id of its ClassLabel "
                             f"names {names[:8]}")
        return names, {split: [int(v) for v in labels] for split, (_, labels) in parts.items()}
    several = len(parts) > 1
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        for split, (_, labels) in parts.items():
            for i, v in enumerate(labels):
                if not float(v).is_integer():
                    raise ValueError(f"{what}: label_column {label_column!r} holds {v!r} (data row "
                                     f"{f'{split}:' if several else ''}{i + 1}), not a whole number; class labels "
                                     "must be integers (3 or 3.0) or strings")
        keys = sorted({int(v) for v in values})
        index = {k: i for i, k in enumerate(keys)}
        return [str(k) for k in keys], {split: [index[int(v)] for v in labels] for split, (_, labels) in parts.items()}
    names = sorted({str(v) for v in values}, key=_natural)
    index = {name: i for i, name in enumerate(names)}
    return names, {split: [index[str(v)] for v in labels] for split, (_, labels) in parts.items()}
