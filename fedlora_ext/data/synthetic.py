"""Easy synthetic tasks for tests and smoke runs, as ``datasets.Dataset`` objects.

Classification: random tokens, about half of them replaced by the class's marker token; a model that
notices which marker dominates is right. Causal LM: every sequence counts upward in steps set by its topic; a model that
infers the step predicts every next token. Both carry a ``label`` column (class or topic) for
Dirichlet partitioning.
"""

from __future__ import annotations

import numpy as np

from fedlora_ext.data.tiny_models import VOCAB


def synthetic_dataset(task: str, num_examples: int, seq_len: int, num_labels: int, seed: int):
    """``input_ids``, ``attention_mask``, ``labels`` (class id or next-token targets) and ``label``."""
    from datasets import Dataset

    if num_labels + 2 >= VOCAB // 2:
        raise ValueError(f"synthetic_dataset: num_labels must be < {VOCAB // 2 - 2}, got {num_labels}")
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_labels, size=num_examples)
    if task == "classification":
        ids = rng.integers(num_labels + 2, VOCAB, size=(num_examples, seq_len))
        marked = rng.random((num_examples, seq_len)) < 0.5  # half the tokens are the class marker
        ids = np.where(marked, 2 + label[:, None], ids)
        targets = label
    elif task == "causal_lm":
        start = rng.integers(2, VOCAB, size=(num_examples, 1))
        steps = (label + 1)[:, None]
        ids = 2 + (start - 2 + steps * np.arange(seq_len)[None, :]) % (VOCAB - 2)
        targets = ids
    else:
        raise ValueError(f"synthetic_dataset: task must be 'classification' or 'causal_lm', got {task!r}")
    data = {
        "input_ids": ids.astype(np.int64).tolist(),
        "attention_mask": np.ones_like(ids).tolist(),
        "labels": targets.astype(np.int64).tolist(),
        "label": label.astype(np.int64).tolist(),
    }
    return Dataset.from_dict(data).with_format("torch")
