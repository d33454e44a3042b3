"""Evaluation of a model on a dataset: a classifier's loss and accuracy; a causal LM's loss and perplexity
per token; for instruction data (SFT) loss and perplexity over response tokens, exact match of greedy
generation, and a few sample generations."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlora_ext.core.device import autocast, model_device, to_device


#: references up to this many tokens (end token included) are short enough to score by exact match
SHORT_REFERENCE = 16


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """A classifier's mean loss and accuracy over ``data`` (rows with input_ids, attention_mask, labels)
    and ``class_accuracy``, a list by class id (None for a class absent from ``data``). A causal LM's
    ``loss``, the mean negative log-likelihood per predicted token, and ``perplexity`` = exp(loss): no
    accuracy, whose next-token hits say little about a language model. Instruction data (rows with
    ``prompt_len``) is scored by :func:`evaluate_sft` instead."""
    if "prompt_len" in getattr(data, "column_names", ()):
        return evaluate_sft(model, data, batch_size)
    was_training, device = model.training, model_device(model)
    model.eval()
    total_loss, correct, count, tokens, language_model = 0.0, 0, 0, 0, False
    class_hits, class_counts = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            labels = batch["labels"]
            with autocast(model):  # a no-op over a float32 base
                out = model(**to_device({k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, device))
            if out.logits.dim() == 2:  # classification [N, C]
                n = len(labels)
                total_loss += float(out.loss) * n
                hit = out.logits.argmax(-1).cpu() == labels
                correct += int(hit.sum())
                count += n
                classes = out.logits.shape[-1]
                class_hits = _grow(class_hits, classes) + torch.bincount(labels[hit], minlength=classes)
                class_counts = _grow(class_counts, classes) + torch.bincount(labels, minlength=classes)
            else:  # causal LM [N, T, V]: token t + 1 from tokens <= t; padding (-100) is not scored
                nll, n = _token_nll(out.logits, labels.to(device))
                total_loss, tokens, language_model = total_loss + nll, tokens + n, True
    finally:
        model.train(was_training)
    if language_model:
        loss = total_loss / max(tokens, 1)
        return {"loss": loss, "perplexity": perplexity(loss)}
    scores = {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}
    if len(class_counts):
        scores["class_accuracy"] = [h / c if c else None for h, c in zip(class_hits.tolist(), class_counts.tolist())]
    return scores


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The summed next-token negative log-likelihood of ``labels`` (-100: not scored) and its token count."""
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                             reduction="sum")
    return float(loss), int((targets != -100).sum())


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so that an untrained model's perplexity stays a finite number."""
    return float(np.exp(min(loss, 50.0)))


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


#: a sample generation is cut after this many new tokens (the reference is cut the same way)
SAMPLE_TOKENS = 64


@torch.no_grad()
def evaluate_sft(model: nn.Module, data, batch_size: int = 64, samples: int = 0) -> dict:
    """Instruction data: ``loss``, the mean negative log-likelihood per response token (prompt tokens
    are not scored), ``perplexity`` = exp(loss), and, when every reference is short (at most
    :data:`SHORT_REFERENCE` tokens: labels, short answers), ``exact_match``: the share of examples whose
    greedy continuation of the prompt, up to and including its end token, is the reference token for
    token (plain greedy decoding: a model whose first choice is the end token answers nothing).
    ``samples`` > 0 adds ``generations``: the first ``samples`` rows' ``prompt``, ``reference`` and greedy
    ``output`` as token id lists (at most :data:`SAMPLE_TOKENS` new tokens), for a run's generations.jsonl."""
    was_training, device = model.training, model_device(model)
    model.eval()
    nll, tokens, hits = 0.0, 0, 0
    short = len(data) > 0 and int(max(data["response_len"])) <= SHORT_REFERENCE
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            on_device = to_device({k: batch[k] for k in ("input_ids", "attention_mask")}, device)
            with autocast(model):
                logits = model(**on_device).logits
            batch_nll, batch_tokens = _token_nll(logits, batch["labels"].to(device))
            nll, tokens = nll + batch_nll, tokens + batch_tokens
            if short:
                prompts, references = _prompts_and_references(batch)
                outputs = _greedy(model, prompts, max(len(r) for r in references), int(references[0][-1]), device)
                hits += sum(int(torch.equal(o, r)) for o, r in zip(outputs, references))
        scores = {"loss": nll / max(tokens, 1), "response_tokens": tokens}
        scores["perplexity"] = perplexity(scores["loss"])
        if short:
            scores["exact_match"] = hits / max(len(data), 1)
        if samples and len(data):
            scores["generations"] = _samples(model, data[: min(samples, len(data))], device)
    finally:
        model.train(was_training)
    return scores


def _prompts_and_references(batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each row's prompt tokens and its reference: the response tokens, then the end token."""
    lengths = zip(batch["input_ids"], batch["prompt_len"].tolist(), batch["response_len"].tolist())
    rows = [(ids[:n], ids[n : n + r]) for ids, n, r in lengths]
    return [p for p, _ in rows], [r for _, r in rows]


def _samples(model: nn.Module, batch, device) -> list[dict]:
    prompts, references = _prompts_and_references(batch)
    steps = min(max(len(r) for r in references), SAMPLE_TOKENS)
    outputs = _greedy(model, prompts, steps, int(references[0][-1]), device)
    return [{"prompt": p.tolist(), "reference": r[:SAMPLE_TOKENS].tolist(), "output": o.tolist()}
            for p, r, o in zip(prompts, references, outputs)]


def _greedy(model: nn.Module, prompts: list[torch.Tensor], steps: int, end: int, device) -> list[torch.Tensor]:
    """Plain greedy continuations of ``prompts`` (at most ``steps`` tokens), each up to and including the
    first ``end`` token. The end token may come first: nothing forbids an empty answer."""
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    with autocast(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                             do_sample=False, num_beams=1, eos_token_id=end, pad_token_id=pad)
    outputs = []
    for row in out[:, width:].cpu():
        stop = (row == end).nonzero()
        outputs.append(row[: int(stop[0]) + 1] if len(stop) else row)
    return outputs
