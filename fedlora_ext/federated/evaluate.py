"""Evaluation of a model on a dataset: loss and accuracy (class accuracy, or next-token accuracy)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlora_ext.core.device import autocast, model_device, to_device


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """Mean loss and accuracy over ``data`` (rows with input_ids, attention_mask, labels); for a
    classifier also ``class_accuracy``, a list by class id (None for a class absent from ``data``)."""
    was_training, device = model.training, model_device(model)
    model.eval()
    total_loss, correct, count, weight = 0.0, 0, 0, 0
    class_hits, class_counts = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            labels = batch["labels"]
            with autocast(model):  # a no-op over a float32 base
                out = model(**to_device({k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, device))
            n = len(labels)
            total_loss += float(out.loss) * n
            weight += n
            if out.logits.dim() == 2:  # classification [N, C]
                hit = out.logits.argmax(-1).cpu() == labels
                correct += int(hit.sum())
                count += n
                classes = out.logits.shape[-1]
                class_hits = _grow(class_hits, classes) + torch.bincount(labels[hit], minlength=classes)
                class_counts = _grow(class_counts, classes) + torch.bincount(labels, minlength=classes)
            else:  # causal LM [N, T, V]: predict token t + 1 from tokens <= t
                hit = out.logits[:, :-1].argmax(-1).cpu() == labels[:, 1:]
                correct += int(hit.sum())
                count += hit.numel()
    finally:
        model.train(was_training)
    scores = {"loss": total_loss / max(weight, 1), "accuracy": correct / max(count, 1)}
    if len(class_counts):
        scores["class_accuracy"] = [h / c if c else None for h, c in zip(class_hits.tolist(), class_counts.tolist())]
    return scores


def _grow(counts: torch.Tensor, size: int) -> torch.Tensor:
    return counts if len(counts) == size else torch.zeros(size, dtype=torch.long)


def eval_subset(data, size: int | None, seed: int, full: bool = False):
    """The examples of ``data`` an evaluation sees: a fixed subset of ``size`` rows drawn with ``seed``
    (the same rows every call, in their original order), or all of ``data`` when ``full``, ``size`` is
    None or ``size >= len(data)``."""
    if full or size is None or size >= len(data):
        return data
    chosen = np.sort(np.random.default_rng(seed).choice(len(data), size, replace=False))
    return data.select(chosen.tolist())
