"""Models for runs and tests: tiny randomly initialised BERT / GPT-2 / Llama built in code (no download),
or any local Hugging Face model folder; with the checks that refuse a model before training (a seq_len
beyond its positions, a saved head for another number of labels, an unloadable folder) in one line."""

from __future__ import annotations

import torch
from torch import nn

TINY = ("tiny-bert", "tiny-gpt2", "tiny-llama")
VOCAB = 64
_HIDDEN, _LAYERS, _HEADS, _FFN, _POSITIONS = 32, 2, 2, 64, 128


def build_model(name: str, task: str, num_labels: int, seed: int = 0, vocab_size: int = VOCAB,
                dtype: torch.dtype | None = None, quantization: str = "none",
                device: str | None = None) -> nn.Module:
    """A model for ``task`` (``"classification"`` or ``"causal_lm"``), deterministic for a seed.

    Args:
        name: ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama`` or a local model folder.
        task: the head to put on it.
        num_labels: classes for classification.
        seed: initialisation seed of the tiny models (pretrained folders ignore it).
        vocab_size: of the tiny models (a real tokenizer's size when they read real text).
        dtype: of the weights; None: a folder's own (its config's ``dtype``), float32 for the tiny models.
            A folder is loaded straight into it, tensor by tensor (never a float32 copy first).
        quantization: ``"nf4"``, ``"fp4"`` or ``"int8"`` loads a folder's linear layers through
            bitsandbytes (:mod:`fedlora_ext.data.quantized`), onto ``device`` (quantised weights are placed
            as they load); ``dtype`` (None: bfloat16) is then the compute dtype and that of the other weights.
    """
    import transformers as tf

    classification = task == "classification"
    if quantization != "none" and name in TINY:
        raise ValueError(f"quantization {quantization!r}: the tiny model {name!r} is built in code, not loaded, and "
                         "narrower than bitsandbytes' 64-wide blocks; quantise a model folder (--model PATH)")
    if name not in TINY:
        if classification:
            check_saved_head(name, num_labels)
        auto = tf.AutoModelForSequenceClassification if classification else tf.AutoModelForCausalLM
        # safetensors only: a pickled checkpoint (.bin) in a folder someone handed us could run code
        kwargs = {"use_safetensors": True, "low_cpu_mem_usage": True, "dtype": dtype or "auto"}
        if classification:
            kwargs["num_labels"] = num_labels
        if quantization != "none":
            kwargs.update(quantized_loading(quantization, dtype, device))
        try:
            model = auto.from_pretrained(name, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as error:  # no weights, a bad config, a size mismatch
            message = f"model {name!r} could not be loaded: {type(error).__name__}: {error}"
            raise ValueError(_one_line(message)) from None
        if quantization == "none":
            return model
        from fedlora_ext.data.quantized import keep_trainable_layout

        return keep_trainable_layout(model)
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
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    return model if dtype is None else model.to(dtype)  # drawn in float32, so every dtype starts from one draw


def dequantized_model(name: str, task: str, num_labels: int, quantization: str,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """The weights a ``quantization`` run trained over, dequantised into a plain model (``dtype``, None:
    bfloat16) on the CPU: what an export merges into and what evaluation scores; it computes what the
    quantised model computes (a 4-bit layer dequantises its weight to that dtype before every matmul)."""
    return build_model(name, task, num_labels, dtype=dtype, quantization=quantization, device="cpu").dequantize()


def quantized_loading(quantization: str, dtype: torch.dtype | None, device: str | None) -> dict:
    """``from_pretrained`` arguments that load the linear layers through bitsandbytes onto ``device``
    (``"auto"`` or None: the current GPU when torch sees one, else the CPU; checked by the run before)."""
    from fedlora_ext.data.quantized import bitsandbytes_config

    dtype = dtype or torch.bfloat16
    where = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    if where.startswith("cuda") and not torch.cuda.is_available():  # bitsandbytes places it as it loads
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no usable GPU to load the {quantization} "
                         "base onto; use --device cpu (or auto, which falls back to the CPU)")
    return {"quantization_config": bitsandbytes_config(quantization, dtype), "dtype": dtype, "device_map": {"": where}}


def _one_line(text: str) -> str:
    return " ".join(text.split())[:600]


def model_config(name: str):
    """The transformers config of a model folder (or Hub id), refused in one line naming the model."""
    import transformers as tf

    try:
        return tf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(_one_line(f"model {name!r} could not be loaded: {type(error).__name__}: {error}")) from None


#: model types whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "ibert", "data2vec-text",
                     "xmod", "mpnet", "roberta-prelayernorm")


def max_positions(name: str) -> int | None:
    """The most tokens the model takes (its position table), or None when its config sets no limit."""
    if name in TINY:
        return _POSITIONS
    config = model_config(name)
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


_TINY_TYPES = {"tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}


def check_decoder(name: str, task: str, shown: str | None = None) -> None:
    """Refuses an encoder (BERT, RoBERTa, ELECTRA ...) for ``causal_lm`` / ``sft``: it reads both ways, so
    as a language model it would see the tokens it is asked to predict (transformers still builds a
    "BertLMHeadModel" for it). Decoder families (GPT-2, Llama, Mistral, Qwen ...) pass."""
    if task not in ("causal_lm", "sft"):
        return
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = _TINY_TYPES.get(name) or getattr(model_config(name), "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        hint = "tiny-gpt2, tiny-llama, or a decoder model folder (GPT-2, Llama, Qwen, ...)"
        raise ValueError(f"task {task!r} needs a decoder (causal) language model, but model {shown or name!r} is "
                         f"{'an encoder' if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else 'not a causal LM'} "
                         f"(model_type {model_type!r}); use {hint}, or task 'classification'")


def check_seq_len(name: str, seq_len: int) -> None:
    """Refuses a ``seq_len`` the model's position table cannot hold, before anything is tokenised."""
    limit = max_positions(name)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is above the maximum of model {name!r}: {limit} positions; "
                         f"use --set seq_len={limit} or less")


def saved_head_labels(name: str) -> list[str] | None:
    """The labels (``id2label`` names, in id order) of a classification head saved in a model folder, or
    None when the folder holds a base model (a head is then initialised for the data)."""
    if name in TINY:
        return None
    config = model_config(name)
    if not any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ()):
        return None
    id2label = getattr(config, "id2label", None) or {}
    if not id2label:
        return [str(i) for i in range(config.num_labels)]
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def check_saved_head(name: str, num_labels: int) -> list[str] | None:
    """Refuses a saved classification head for another number of labels than the data's; returns its
    labels (None without a saved head)."""
    head = saved_head_labels(name)
    if head is not None and len(head) != num_labels:
        raise ValueError(f"model {name!r} has a saved classification head for {len(head)} labels, but the data has "
                         f"{num_labels} labels; use the base model folder (no head) or data with {len(head)} labels")
    return head
