"""Evaluation of a model on a dataset: loss and accuracy (class accuracy, or next-token accuracy), and for
instruction data (SFT) loss and perplexity over response tokens and exact match of greedy generation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlora_ext.core.device import autocast, model_device, to_device


#: references up to this many tokens (end token included) are short enough to score by exact match
SHORT_REFERENCE = 16


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """Mean loss and accuracy over ``data`` (rows with input_ids, attention_mask, labels); for a
    classifier also ``class_accuracy``, a list by class id (None for a class absent from ``data``).
    Instruction data (rows with ``prompt_len``) is scored by :func:`evaluate_sft` instead."""
    if "prompt_len" in getattr(data, "column_names", ()):
        return evaluate_sft(model, data, batch_size)
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


@torch.no_grad()
def evaluate_sft(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """Instruction data: ``loss``, the mean negative log-likelihood per response token (prompt tokens
    are not scored), ``perplexity`` = exp(loss), and, when every reference is short (at most
    :data:`SHORT_REFERENCE` tokens: labels, short answers), ``exact_match``: the share of examples whose
    greedy continuation of the prompt, up to its end token, is the reference token for token."""
    was_training, device = model.training, model_device(model)
    model.eval()
    nll, tokens, hits = 0.0, 0, 0
    short = len(data) > 0 and int(max(data["response_len"])) <= SHORT_REFERENCE
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            on_device = to_device({k: batch[k] for k in ("input_ids", "attention_mask")}, device)
            with autocast(model):
                logits = model(**on_device).logits.float()
            targets = batch["labels"][:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                     reduction="sum")
            nll += float(loss)
            tokens += int((targets != -100).sum())
            if short:
                hits += _greedy_hits(model, batch, device)
    finally:
        model.train(was_training)
    loss = nll / max(tokens, 1)
    scores = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "response_tokens": tokens}
    if short:
        scores["exact_match"] = hits / max(len(data), 1)
    return scores


def _greedy_hits(model: nn.Module, batch, device) -> int:
    """How many of the batch's prompts greedy decoding continues with exactly their reference (the
    response tokens, then the end token, which stops it)."""
    prompts = [ids[:n] for ids, n in zip(batch["input_ids"], batch["prompt_len"].tolist())]
    references = [ids[n : n + r] for ids, n, r in zip(batch["input_ids"], batch["prompt_len"].tolist(),
                                                      batch["response_len"].tolist())]
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    end = int(references[0][-1])  # every reference ends with the end token
    steps = max(len(r) for r in references)
    with autocast(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                             min_new_tokens=1, do_sample=False, num_beams=1, eos_token_id=end, pad_token_id=pad)
    generated = out[:, width:].cpu()
    hits = 0
    for row, reference in zip(generated, references):
        stop = (row == end).nonzero()
        produced = row[: int(stop[0]) + 1] if len(stop) else row
        hits += int(torch.equal(produced, reference))
    return hits
