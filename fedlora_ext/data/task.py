"""The data and base model of a run, from its configuration: synthetic tokens for tiny tests, or real
text (packaged corpora or ``datasets``) tokenised for the chosen model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.data.text import load_text, packaged_model_folder, resolve_model, tokenize
from fedlora_ext.data.tiny_models import TINY, build_model


@dataclass
class Task:
    """Tokenised train / test data (``input_ids``, ``attention_mask``, ``labels``, ``label``), the base
    model, and the class names (empty for synthetic data)."""

    train: object
    test: object
    model: nn.Module
    label_names: list[str]


def build_task(config) -> Task:
    """The task of a ``FedConfig``: its dataset, tokenised for its model, and that model with a head
    sized to the dataset's classes. Tiny models reading real text use the packaged MiniLM tokenizer."""
    if config.dataset == "synthetic":
        train = synthetic_dataset(config.task, config.num_examples, config.seq_len, config.num_labels, config.seed)
        test = synthetic_dataset(config.task, max(config.num_examples // 4, 8), config.seq_len, config.num_labels,
                                 config.seed + 1)
        return Task(train, test, build_model(config.model, config.task, config.num_labels, config.seed), [])
    from transformers import AutoTokenizer

    text = load_text(config.dataset, seed=config.seed, test_fraction=config.eval_fraction,
                     max_examples=config.max_examples, text_column=config.text_column, label_column=config.label_column)
    model_name = config.model if config.model in TINY else resolve_model(config.model)
    tokenizer_source = packaged_model_folder() if model_name in TINY else model_name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none: pad with the end token
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(model_name, config.task, len(text.label_names), config.seed, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last real token
    cache = _cache_files(config, tokenizer_source)
    train = tokenize(text.train, tokenizer, config.seq_len, config.task, cache and cache[0])
    test = tokenize(text.test, tokenizer, config.seq_len, config.task, cache and cache[1])
    return Task(train, test, model, text.label_names)


def _cache_files(config, tokenizer_source: str) -> tuple[Path, Path] | None:
    """Per-run token caches, named by everything that decides their content."""
    if not config.out_dir:
        return None
    key = json.dumps([config.dataset, tokenizer_source, config.seq_len, config.task, config.seed,
                      config.eval_fraction, config.max_examples, config.text_column, config.label_column])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(config.out_dir) / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"train-{digest}.arrow", folder / f"test-{digest}.arrow"
