"""``eval_examples``: the global model is evaluated on a fixed seeded subset of the test split in every
round but the last, which always sees the whole split; ``test_examples`` in the metrics says which."""

from __future__ import annotations

import pytest

from fedlora_ext.federated import FedConfig, Simulation
from fedlora_ext.federated.evaluate import eval_subset
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config


def test_subset_is_fixed_ordered_and_full_when_asked():
    sim = Simulation(small_config("ffa_lora", num_examples=200))
    test = sim.test_data
    n = len(test)
    a, b = eval_subset(test, 10, seed=3), eval_subset(test, 10, seed=3)
    assert len(a) == 10 and a[:]["input_ids"].tolist() == b[:]["input_ids"].tolist()  # the same rows every time
    assert eval_subset(test, 10, seed=4)[:]["input_ids"].tolist() != a[:]["input_ids"].tolist()
    assert len(eval_subset(test, 10, seed=3, full=True)) == n
    assert len(eval_subset(test, None, seed=3)) == n and len(eval_subset(test, n + 5, seed=3)) == n


def test_rounds_use_the_subset_and_the_last_round_the_whole_split():
    config = small_config("ffa_lora", num_examples=200, rounds=3, local_steps=1, eval_examples=7)
    sim = Simulation(config)
    history = sim.run(progress=False).history
    n = len(sim.test_data)
    assert n > 7
    assert [h["test_examples"] for h in history] == [7, 7, n]
    assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in history)


def test_unset_evaluates_the_whole_split_every_round():
    config = small_config("fedit", num_examples=120, rounds=2, local_steps=1)
    assert config.eval_examples is None
    sim = Simulation(config)
    history = sim.run(progress=False).history
    assert [h["test_examples"] for h in history] == [len(sim.test_data)] * 2


def test_final_scores_do_not_depend_on_the_subset():
    base = dict(num_examples=120, rounds=2, local_steps=2)
    full = Simulation(small_config("ffa_lora", **base)).run(progress=False).history[-1]
    subset = Simulation(small_config("ffa_lora", eval_examples=5, **base)).run(progress=False).history[-1]
    assert subset["test_examples"] == full["test_examples"]
    assert subset["test_accuracy"] == full["test_accuracy"] and subset["test_loss"] == pytest.approx(full["test_loss"])


def test_eval_examples_is_checked():
    with pytest.raises(ValueError, match="eval_examples"):
        FedConfig(eval_examples=0)
    assert FedConfig.from_dict({"eval_examples": 64}).eval_examples == 64
