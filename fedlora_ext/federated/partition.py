"""Splitting a dataset among clients: IID, or label-skewed by a Dirichlet(alpha) draw per class.

Dirichlet label partitioning follows Hsu et al. 2019 ("Measuring the effects of non-identical data
distribution"): for every class, client shares ~ Dir(alpha * 1_K); smaller alpha, stronger skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffled, near-equal index shards, one per client."""
    _check(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(shard) for shard in np.array_split(order, num_clients)]


def dirichlet_partition(labels: Sequence[int], num_clients: int, alpha: float, seed: int,
                        max_tries: int = 100, min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed index shards: class c is split among clients by proportions ~ Dir(alpha).

    Redraws (seeded) until every client holds at least ``min_size`` examples; after ``max_tries`` draws
    the smallest clients take examples from the largest shard, so the result is always usable.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    if not 1 <= min_size <= len(labels) // num_clients:
        raise ValueError(f"dirichlet_partition: min_size must be in [1, {len(labels) // num_clients}] for "
                         f"{len(labels)} examples and {num_clients} clients, got {min_size}")
    if not alpha > 0:
        raise ValueError(f"dirichlet_partition: alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    shards: list[list[int]] = []
    for _ in range(max_tries):
        shards = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            break
    else:
        for client in range(num_clients):
            while len(shards[client]) < min_size:
                donor = max(range(num_clients), key=lambda k: len(shards[k]))
                shards[client].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def split_train_test(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own train/test split (for personalised evaluation); train keeps at least one example."""
    order = np.random.default_rng(seed).permutation(indices)
    n_test = min(int(round(len(order) * test_fraction)), len(order) - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _check(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"partition: num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(f"partition: {num_examples} examples cannot give each of {num_clients} clients one")
