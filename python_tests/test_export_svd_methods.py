"""`fedlora export` of FlexLoRA and FedSVD runs: the peft adapter and the merged model compute what the
run's global model computes (FlexLoRA's at the global rank G = ``rank``, FedSVD's re-factorised B, A),
on GPT-2's Conv1D layers (fan_in_fan_out) and on BERT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fedlora_ext.app.export import export_run
from fedlora_ext.federated import Simulation
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config

CASES = {
    "flexlora-gpt2": ("flexlora", "tiny-gpt2", "causal_lm", {"rank": 7, "client_ranks": (4, 2, 1)}),
    "fedsvd-bert": ("fedsvd", "tiny-bert", "classification", {"svd_period": 1}),
}


def logits(model, data) -> torch.Tensor:
    model.eval()
    batch = data[:16]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_exports_equal_the_global_model(case, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    method, model, task, changes = CASES[case]
    folder = tmp_path / "run"
    config = small_config(method, model=model, task=task, rounds=2, local_steps=2, device="cpu",
                          out_dir=str(folder), **changes)
    torch.manual_seed(config.seed)
    sim = Simulation(config)
    sim.run(progress=False)
    reference = logits(sim.global_model(), sim.test_data)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    export_run(folder, "peft", tmp_path / "peft")
    export_run(folder, "merged", tmp_path / "merged")
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["r"] == config.rank
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft = PeftModel.from_pretrained(auto.from_pretrained(adapter["base_model_name_or_path"]), str(tmp_path / "peft"))
    assert float((logits(peft, sim.test_data) - reference).abs().max()) <= 1e-5
    merged = auto.from_pretrained(tmp_path / "merged")
    assert float((logits(merged, sim.test_data) - reference).abs().max()) <= 1e-5
