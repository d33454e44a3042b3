"""Per-sample gradients from hooks, and the per-sample loss, against one autograd call per sample.

The reference runs the model on each sample alone and asks autograd for the gradient of that sample's
loss: what DP-SGD's clipping must see. Covered: LoRA on BERT (with the classification head), LoRA on
GPT-2's Conv1D layers (fan_in_fan_out) with a causal-LM loss and ignored labels, VeRA, a frozen factor.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora_ext.data import build_model
from fedlora_ext.dp import PerSampleGradients, summed_loss
from fedlora_ext.core import adapters
from fedtools import TARGETS


def _peft(family: str, task: str, kind: str = "lora") -> nn.Module:
    spec = adapters.AdapterSpec(kind=kind, rank=4, alpha=8.0, target_modules=TARGETS[family])
    model = adapters.attach_adapter(build_model(family, task, 3, seed=0), spec,
                                    "SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    adapters.reset_adapters(model, 1)
    with torch.no_grad():  # B = 0 at init would hide half of the chain rule
        for p in adapters.adapter_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()  # no dropout: the per-sample reference must see the same function


def _batch(task: str, size: int = 5, seq: int = 7):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (size, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded sample
    if task == "classification":
        labels = torch.randint(0, 3, (size,), generator=gen)
    else:
        labels = ids.clone()
        labels[2, :4] = -100  # ignored tokens (a prompt)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, params, batch):
    rows = []
    for i in range(len(batch["labels"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        rows.append(torch.autograd.grad(summed_loss(model, one), params, allow_unused=True))
    return [torch.stack([r[j] if r[j] is not None else torch.zeros_like(params[j]) for r in rows])
            for j in range(len(params))]


@pytest.mark.parametrize("family,task,kind", [
    ("tiny-bert", "classification", "lora"),
    ("tiny-gpt2", "causal_lm", "lora"),
    ("tiny-llama", "causal_lm", "lora"),
    ("tiny-bert", "classification", "vera"),
])
def test_hooks_equal_one_backward_per_sample(family, task, kind):
    model = _peft(family, task, kind)
    params = list(adapters.trainable_parameters(model).values())
    batch = _batch(task)
    with PerSampleGradients(model, params) as collector:
        summed_loss(model, batch).backward()
    expected = _reference(model, params, batch)
    for name, got, want in zip(adapters.trainable_parameters(model), collector.grad_samples, expected):
        assert got is not None, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        # and summed over the batch they are the ordinary gradient
        torch.testing.assert_close(got.sum(0), dict(adapters.trainable_parameters(model))[name].grad,
                                   rtol=1e-4, atol=1e-6)


def test_frozen_factor_gets_no_per_sample_gradient():
    model = _peft("tiny-bert", "classification")
    adapters.set_trainable(model, A=False, B=True, head=False)
    params = list(adapters.trainable_parameters(model).values())
    with PerSampleGradients(model, params) as collector:
        summed_loss(model, _batch("classification")).backward()
    assert all(g is not None and g.shape[0] == 5 for g in collector.grad_samples)
    assert all(n.endswith("lora_B") for n in adapters.trainable_parameters(model))


def test_hooks_are_removed_and_cleared():
    model = _peft("tiny-bert", "classification")
    params = list(adapters.trainable_parameters(model).values())
    collector = PerSampleGradients(model, params)
    with collector:
        summed_loss(model, _batch("classification")).backward()
    collector.clear()
    summed_loss(model, _batch("classification")).backward()  # outside: nothing collected
    assert all(g is None for g in collector.grad_samples)


def test_summed_loss_is_a_sum_of_per_sample_losses():
    model = _peft("tiny-gpt2", "causal_lm")
    batch = _batch("causal_lm")
    total = summed_loss(model, batch)
    parts = sum(summed_loss(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(5))
    torch.testing.assert_close(total, parts, rtol=1e-5, atol=1e-5)


def test_empty_parameter_list_is_refused():
    with pytest.raises(ValueError, match="no trainable adapter parameters"):
        PerSampleGradients(nn.Linear(2, 2), [])


def test_unsupported_owner_is_named():
    model = _peft("tiny-bert", "classification")
    norm = next(p for n, p in model.named_parameters() if "LayerNorm.weight" in n)
    with pytest.raises(ValueError, match="LayerNorm.weight.*not owned by an nn.Linear"):
        PerSampleGradients(model, [norm])
