"""Partitioning (Dirichlet label skew, IID, per-client train/test split) and seeded partial participation."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_ext.federated import Simulation
from fedlora_ext.federated.partition import dirichlet_partition, iid_partition, split_train_test
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config

LABELS = np.random.default_rng(0).integers(0, 4, size=1000)


def _covers_exactly_once(shards, n: int) -> bool:
    return np.array_equal(np.sort(np.concatenate(shards)), np.arange(n))


def _mean_label_entropy(shards, labels, classes: int) -> float:
    """Average over clients of the entropy (nats) of the client's label distribution."""
    entropies = []
    for shard in shards:
        counts = np.bincount(labels[shard], minlength=classes).astype(float)
        q = counts[counts > 0] / counts.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partition_is_a_seeded_partition(alpha):
    shards = dirichlet_partition(LABELS, 10, alpha, seed=3)
    assert len(shards) == 10
    assert all(len(s) > 0 for s in shards)
    assert _covers_exactly_once(shards, len(LABELS))
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)
    again = dirichlet_partition(LABELS, 10, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = dirichlet_partition(LABELS, 10, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_smaller_alpha_gives_more_label_skew():
    """Mean per-client label entropy: log(4) = 1.39 nats for perfectly mixed clients, 0 for one class each.
    It falls with alpha (averaged over 5 seeds so the ordering is not luck)."""
    def entropy(alpha):
        return np.mean([_mean_label_entropy(dirichlet_partition(LABELS, 10, alpha, seed), LABELS, 4)
                        for seed in range(5)])

    values = [entropy(alpha) for alpha in (0.05, 0.5, 5.0, 100.0)]
    assert values == sorted(values), values
    assert values[0] < 0.5 and values[-1] > 1.3
    iid = _mean_label_entropy(iid_partition(len(LABELS), 10, 0), LABELS, 4)
    assert iid > values[1]


def test_dirichlet_keeps_every_client_non_empty_even_when_draws_keep_failing():
    """Few examples, many clients, tiny alpha and one try: the fallback hands the empty clients one
    example each, still a partition."""
    labels = np.arange(25) % 2
    shards = dirichlet_partition(labels, 20, 1e-3, seed=0, max_tries=1)
    assert all(len(s) > 0 for s in shards)
    assert _covers_exactly_once(shards, 25)


def test_iid_partition():
    shards = iid_partition(103, 10, seed=1)
    assert _covers_exactly_once(shards, 103)
    assert {len(s) for s in shards} <= {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(shards, iid_partition(103, 10, seed=1)))
    assert not np.array_equal(shards[0], np.arange(11))  # shuffled, not contiguous


@pytest.mark.parametrize("call, message", [
    (lambda: dirichlet_partition(LABELS, 10, 0.0, 0), r"alpha must be > 0, got 0.0"),
    (lambda: dirichlet_partition(LABELS, 10, -1.0, 0), r"alpha must be > 0"),
    (lambda: dirichlet_partition(LABELS, 0, 0.5, 0), r"num_clients must be >= 1, got 0"),
    (lambda: iid_partition(10, 0, 0), r"num_clients must be >= 1"),
    (lambda: iid_partition(3, 5, 0), r"3 examples cannot give each of 5 clients one"),
])
def test_partition_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_split_train_test():
    indices = np.arange(100, 140)
    train, test = split_train_test(indices, 0.25, seed=2)
    assert len(test) == 10 and len(train) == 30
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    train, test = split_train_test(np.array([7]), 0.5, seed=2)  # one example: it trains
    assert train.tolist() == [7] and test.size == 0


def test_simulation_partitions_the_training_set():
    """Every training example goes to exactly one client, as its train or its test split."""
    config = small_config("fedit", num_clients=5, num_examples=120, dirichlet_alpha=0.3, test_fraction=0.25)
    sim = Simulation(config)
    sizes = [len(train) + len(test) for train, test in sim.client_data]
    assert sum(sizes) == 120
    assert [c.num_examples for c in sim.clients] == [len(train) for train, _ in sim.client_data]
    # the skew is visible in the clients' label mixes
    labels = [np.bincount(np.asarray(train["label"]), minlength=4) for train, _ in sim.client_data]
    assert max(lab.max() / lab.sum() for lab in labels) > 0.5


# ---- partial participation -------------------------------------------------------------------------
def test_partial_participation_is_seeded_and_samples_the_right_count():
    config = small_config("fedit", num_clients=10, participation=0.3, num_examples=100)
    a, b = Simulation(config), Simulation(config)
    chosen = [[c.cid for c in a.participants(r)] for r in range(8)]
    assert chosen == [[c.cid for c in b.participants(r)] for r in range(8)]  # seeded
    assert all(len(c) == 3 and len(set(c)) == 3 and all(0 <= i < 10 for i in c) for c in chosen)
    assert len({tuple(c) for c in chosen}) > 1  # rounds differ
    other = Simulation(config.replace(seed=1))
    assert chosen != [[c.cid for c in other.participants(r)] for r in range(8)]
    assert len(Simulation(config.replace(participation=0.01)).participants(0)) == 1  # at least one
    assert len(Simulation(config.replace(participation=1.0)).participants(0)) == 10


def test_dirichlet_min_size_is_honoured_and_checked():
    labels = [i % 5 for i in range(300)]
    shards = dirichlet_partition(labels, 10, 0.05, seed=1, min_size=20)
    assert min(len(s) for s in shards) >= 20
    assert sorted(np.concatenate(shards).tolist()) == list(range(300))  # still a partition
    with pytest.raises(ValueError, match=r"min_size must be in \[1, 30\]"):
        dirichlet_partition(labels, 10, 0.5, seed=1, min_size=31)
