"""Models for runs and tests: tiny randomly initialised BERT / GPT-2 / Llama built in code (no download),
or any local Hugging Face model folder."""

from __future__ import annotations

import torch
from torch import nn

TINY = ("tiny-bert", "tiny-gpt2", "tiny-llama")
VOCAB = 64
_HIDDEN, _LAYERS, _HEADS, _FFN, _POSITIONS = 32, 2, 2, 64, 128


def build_model(name: str, task: str, num_labels: int, seed: int = 0, vocab_size: int = VOCAB) -> nn.Module:
    """A model for ``task`` (``"classification"`` or ``"causal_lm"``), deterministic for a seed.

    Args:
        name: ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama`` or a local model folder.
        task: the head to put on it.
        num_labels: classes for classification.
        seed: initialisation seed of the tiny models (pretrained folders ignore it).
        vocab_size: of the tiny models (a real tokenizer's size when they read real text).
    """
    import transformers as tf

    classification = task == "classification"
    if name not in TINY:
        auto = tf.AutoModelForSequenceClassification if classification else tf.AutoModelForCausalLM
        # safetensors only: a pickled checkpoint (.bin) in a folder someone handed us could run code
        kwargs = {"num_labels": num_labels, "use_safetensors": True} if classification else {"use_safetensors": True}
        try:
            return auto.from_pretrained(name, **kwargs)
        except OSError as error:  # a missing folder, or a hub id without network
            raise ValueError(f"model {name!r} could not be loaded: {error}".splitlines()[0]) from None
    if name == "tiny-bert":
        config = tf.BertConfig(vocab_size=vocab_size, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
                               num_attention_heads=_HEADS, intermediate_size=_FFN,
                               max_position_embeddings=_POSITIONS, num_labels=num_labels,
                               is_decoder=not classification)
        cls = tf.BertForSequenceClassification if classification else tf.BertLMHeadModel
    elif name == "tiny-gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS,
                               n_positions=_POSITIONS, num_labels=num_labels, pad_token_id=0,
                               bos_token_id=1, eos_token_id=1)
        cls = tf.GPT2ForSequenceClassification if classification else tf.GPT2LMHeadModel
    else:
        config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=_HIDDEN, intermediate_size=_FFN,
                                num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_HEADS,
                                max_position_embeddings=_POSITIONS, num_labels=num_labels, pad_token_id=0,
                                bos_token_id=1, eos_token_id=1)
        cls = tf.LlamaForSequenceClassification if classification else tf.LlamaForCausalLM
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return cls(config)
    finally:
        torch.random.set_rng_state(state)


def default_target_modules(name: str) -> tuple[str, ...]:
    """The attention projections LoRA papers adapt (q and v) for each tiny family."""
    return {"tiny-gpt2": ("c_attn",), "tiny-llama": ("q_proj", "v_proj")}.get(name, ("query", "value"))
