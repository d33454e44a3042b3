"""Stage 3 of the data pipeline, splitting: the seeded train/test split with ``max_examples``.

One rule for every kind of data (classification rows, SFT rows, plain documents), over rows of any shape:
the own test split (chosen by :mod:`fedlora_ext.data.read`) as it is (a seeded subset under
``max_examples``), else a seeded ``test_fraction`` of all rows pooled. The random draws depend only on the
seed and the row counts, so the same seed picks the same rows whatever the rows hold.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """The rows of the train and test sets (in their order), what the test set is in a short phrase, and
    lines for the run's header (splits pooled or unused, ``max_examples`` subsets)."""

    train: list
    test: list
    eval_split: str
    notes: list[str]


def _percent(fraction: float) -> str:
    """``0.2`` -> ``"20%"``."""
    return f"{fraction * 100:.4g}%"


def split(parts: dict[str, list], own: str | None, unused: list[str], *, seed: int, test_fraction: float,
               max_examples: int | None, what: str) -> Split:
    """The train and test rows of ``parts`` (split name -> rows, each row of any shape).

    ``own`` None: the rows of all splits pooled in order, permuted with ``default_rng(seed)``, cut to the
    first ``max_examples``, and the first ``round(n * test_fraction)`` of them are the test set. Else
    ``own`` is the test split (its rows in order) and the other splits' rows, permuted with the same
    generator, are the train set; ``max_examples`` below the total keeps the same share of each (test rows:
    a sorted seeded subset drawn with ``default_rng(seed + 1)``).

    Raises:
        ValueError: the train or test set is empty (``what`` names the data).
    """
    notes = []
    rng = np.random.default_rng(seed)
    if own is None:
        rows = [r for split in parts for r in parts[split]]
        order = rng.permutation(len(rows))
        if max_examples is not None:
            order = order[:max_examples]
        n_test = round(len(order) * test_fraction)
        train, test = [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]
        eval_split = f"a seeded {_percent(test_fraction)} split of the data"
        if len(parts) > 1:
            notes.append(f"splits {list(parts)} were pooled and split again (none is named 'test' or 'validation')")
    else:
        train_all = [r for split in parts if split != own for r in parts[split]]
        train_rows, test_rows = rng.permutation(len(train_all)), np.arange(len(parts[own]))
        total = len(train_rows) + len(test_rows)
        if max_examples is not None and max_examples < total:  # the same share of each split
            k_test = max(1, round(max_examples * len(test_rows) / total))
            test_rows = np.sort(np.random.default_rng(seed + 1).permutation(len(test_rows))[:k_test])
            train_rows = train_rows[:max_examples - k_test]
            notes.append(f"max_examples {max_examples}: a seeded {len(train_rows)} of {len(train_all)} train and "
                         f"{len(test_rows)} of {len(parts[own])} {own!r} examples")
        train, test = [train_all[i] for i in train_rows], [parts[own][i] for i in test_rows]
        eval_split = f"the dataset's own {own!r} split"
        if unused:
            notes.append(f"split(s) {unused} not used: trained on {[s for s in parts if s != own]}, evaluated on "
                         f"{own!r}")
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise ValueError(f"{what}: the {split} split is empty ({len(train)} train / {len(test)} test rows; "
                             f"eval_fraction {test_fraction}, max_examples {max_examples}); give more rows")
    return Split(train, test, eval_split, notes)
