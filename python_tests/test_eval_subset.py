"""``eval_examples``: the global model is evaluated on the same fixed seeded subset of the test split in
every round (``test_*``, ``test_examples``), so the best round and the plot compare like with like; after
the last round the whole split is scored apart (``final_test_*``), and that is the run's final score."""

from __future__ import annotations

import pytest

from fedlora_ext.federated import FedConfig, Simulation
from fedlora_ext.federated.client import derive_seed
from fedlora_ext.federated.evaluate import eval_subset, evaluate
from fedlora_ext.app.reporting import examples_scored, summary_row
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


def test_every_round_uses_the_same_subset_and_the_whole_split_is_scored_apart(tmp_path):
    config = small_config("ffa_lora", num_examples=200, rounds=3, local_steps=1, eval_examples=7,
                          out_dir=str(tmp_path / "run"))
    sim = Simulation(config)
    history = sim.run(progress=False).history
    n = len(sim.test_data)
    assert n > 7
    assert [h["test_examples"] for h in history] == [7, 7, 7]
    assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in history)
    assert [("final_test_accuracy" in h, h.get("final_test_examples")) for h in history] == [(False, None)] * 2 + [(True, n)]
    # the last round's subset score is the subset model's score on those 7 rows, not the whole split's
    model = sim.global_model()
    rows = eval_subset(sim.test_data, 7, derive_seed(config.seed, "eval_subset"))
    assert history[-1]["test_accuracy"] == evaluate(model, rows)["accuracy"]
    assert history[-1]["final_test_accuracy"] == evaluate(model, sim.test_data)["accuracy"]
    row = summary_row("ffa_lora", history)
    assert row["final"] == history[-1]["final_test_accuracy"]  # the whole split
    assert row["best"] == max(h["test_accuracy"] for h in history)  # over rounds that saw the same 7
    assert examples_scored(history) == {"round_examples": 7, "final_examples": n}


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
    assert subset["final_test_examples"] == full["test_examples"]
    assert subset["final_test_accuracy"] == full["test_accuracy"]
    assert subset["final_test_loss"] == pytest.approx(full["test_loss"])
    assert summary_row("a", [subset])["final"] == summary_row("b", [full])["final"]


def test_eval_examples_is_checked():
    with pytest.raises(ValueError, match="eval_examples"):
        FedConfig(eval_examples=0)
    assert FedConfig.from_dict({"eval_examples": 64}).eval_examples == 64
