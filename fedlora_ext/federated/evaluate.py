"""Evaluation of a model on a dataset: loss and accuracy (class accuracy, or next-token accuracy)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """Mean loss and accuracy over ``data`` (rows with input_ids, attention_mask, labels)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count, weight = 0.0, 0, 0, 0
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = len(batch["labels"])
            total_loss += float(out.loss) * n
            weight += n
            if out.logits.dim() == 2:  # classification [N, C]
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                count += n
            else:  # causal LM [N, T, V]: predict token t + 1 from tokens <= t
                hit = out.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]
                correct += int(hit.sum())
                count += hit.numel()
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(weight, 1), "accuracy": correct / max(count, 1)}
