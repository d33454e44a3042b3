"""Every method end to end through ``simulate``: classification (tiny BERT) and causal LM (tiny GPT-2 with
its Conv1D ``c_attn``, tiny Llama with ``q_proj``/``v_proj``); the run's files; the training loss falls.

Learning setting (chosen for a robust trend, measured with these seeds): 3 clients, IID, rank 4, 6 AdamW
steps of lr 0.05 per round, 3 rounds. The mean training loss of round 3 vs round 1 fell by 18-70% on
classification and by 0.5-2% on the causal LM task (a tiny random model, attention adapters only,
near log(64) = 4.16 nats); we assert at least 5% and 0.1%.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fedlora_ext.federated import Simulation, simulate
from fedlora_ext.strategies import strategy_names
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config

METHODS = strategy_names()
SETTINGS = {"bert-classification": ("tiny-bert", "classification", 0.05),
            "gpt2-causal_lm": ("tiny-gpt2", "causal_lm", 0.001),
            "llama-causal_lm": ("tiny-llama", "causal_lm", 0.001)}
ROUNDS = 3
#: methods whose local rule is plain SGD (AdamW refused) need a larger step than AdamW's 0.05 on these tiny
#: models: at SGD lr 2.0 SCAFFOLD's loss fell 7% (classification) and 0.22% (GPT-2) over the 3 rounds
SGD_LR = {"scaffold": 2.0}


def test_every_method_is_covered():
    assert METHODS == sorted(["fedit", "fedprox", "ffa_lora", "fedsa_lora", "fedsa_rslora", "fedsa_vera", "flora",
                              "hetlora", "lora_a2", "fedex_lora", "centralized", "standalone", "scaffold",
                              "rolora", "fed_sb", "flexlora", "fedsvd"])


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method, setting, tmp_path):
    model, task, min_drop = SETTINGS[setting]
    config = small_config(method, model=model, task=task, rounds=ROUNDS, local_steps=6, lr=SGD_LR.get(method, 0.05),
                          out_dir=str(tmp_path / "run"))
    initial = copy.deepcopy(Simulation(config).state)  # the run's deterministic starting point
    result = simulate(config, progress=False)

    # metrics: one entry per round with loss, accuracy, bytes and seconds; the same lines on disk
    assert [h["round"] for h in result.history] == list(range(1, ROUNDS + 1))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.history
    who = "personal" if method in ("fedsa_lora", "fedsa_rslora", "fedsa_vera", "standalone") else "test"
    for h in result.history:
        assert h["train_loss"] > 0 and h["seconds"] > 0
        if task == "classification":
            assert 0.0 <= h[f"{who}_accuracy"] <= 1.0
        else:  # a language model is scored by perplexity per token, and reports no accuracy
            if who == "test":
                assert h["test_perplexity"] == pytest.approx(math.exp(h["test_loss"]), rel=1e-6)
            else:  # the clients' mean perplexity: at least exp of their mean loss (Jensen)
                assert h["personal_perplexity"] >= math.exp(h["personal_loss"]) * (1 - 1e-6)
            assert f"{who}_accuracy" not in h
        assert h["bytes_up"] >= 0 and h["bytes_down"] >= 0
        if method == "standalone":
            assert h["bytes_up"] == h["bytes_down"] == 0  # nothing is sent
        else:
            assert h["bytes_up"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config.to_dict()

    # the final global adapter, loadable, equal to the server's state
    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    global_tensors = result.strategy.global_tensors(result.state)
    for name, tensor in global_tensors.items():
        assert torch.equal(saved[name], tensor)
    if method in ("flora", "fedex_lora"):
        deltas = [n for n in saved if n.startswith("base_delta.")]
        assert deltas and all(saved[n].abs().sum() > 0 for n in deltas)  # the merges are in the file

    # weights really moved (Opacus issue 820: adapters can silently stop updating)
    if method in ("flora", "fedex_lora"):
        moved = any(not torch.equal(result.state.base[n], initial.base[n]) for n in initial.base)
    elif method in ("fedsa_lora", "fedsa_rslora", "fedsa_vera", "standalone"):
        moved = all(c.tensors for c in result.clients)
        first = result.clients[0].tensors
        moved &= any(not torch.equal(first[n], initial.tensors[n]) for n in first if n in initial.tensors)
    else:
        moved = any(not torch.equal(result.state.tensors[n], initial.tensors[n]) for n in initial.tensors
                    if not n.startswith("head."))
    assert moved

    # the training loss goes down
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < (1 - min_drop) * losses[0], f"{method} {setting}: losses {losses}"


def test_progress_bar_and_partial_participation(capsys):
    """The progress bar path runs; with participation 0.5 of 4 clients each round trains 2 of them."""
    config = small_config("fedit", num_clients=4, participation=0.5, rounds=2, local_steps=2)
    result = simulate(config, progress=True)
    assert all(len(h["clients"]) == 2 for h in result.history)
    assert "round 2/2" in capsys.readouterr().err
