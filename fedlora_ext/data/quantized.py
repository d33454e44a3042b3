"""Quantised bases (QLoRA): a model folder loaded in NF4, FP4 or int8 through transformers'
``BitsAndBytesConfig``, and bitsandbytes kept out of every run that does not ask for it.

bitsandbytes is optional (``pip install "fedlora_ext[quantization]"``). Importing it has side effects
we do not want in a run that never asked for it: on a CPU with AVX-512 BF16 it looks for an optional
kernel on the Hugging Face Hub (a network request) and logs a warning on stderr when that fails. So it
is imported only here, with the Hub offline and its log records kept off the console, and peft (which
imports it whenever it is installed) is kept from doing so for an unquantised base
(:func:`peft_without_bitsandbytes`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings

import torch
from torch import nn

EXTRA = 'pip install "fedlora_ext[quantization]"'
#: the heads transformers puts on a base (new, trained in float32, or the LM head QLoRA keeps in 16 bits)
HEADS = ("classifier", "pre_classifier", "score", "lm_head", "qa_outputs")
#: loggers of the quantisation stack whose warnings belong in the run log, not on the console
LIBRARY_LOGGERS = ("bitsandbytes", "kernels")


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(kind: str) -> None:
    """Raises one line naming the extra when ``kind`` needs bitsandbytes and it is not installed."""
    if kind != "none" and not bitsandbytes_installed():
        raise ValueError(f"quantization {kind!r} needs bitsandbytes, which is not installed: {EXTRA}")


def import_bitsandbytes():
    """bitsandbytes, imported with the Hugging Face Hub offline (no kernel is fetched) and its warnings
    kept off the console (a job's ``--log-file`` still records them)."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        # off the root logger (opacus gives it a console handler) and logging's last resort; a job's
        # --log-file handler is added to these loggers themselves (fedlora_ext.app.job_log)
        logger.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
    with _hub_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes
    # int8 matmuls run in float16 by design; the cast is not news on every forward
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    return bitsandbytes


@contextlib.contextmanager
def _hub_offline():
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def bitsandbytes_config(kind: str, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of ``kind``: 4-bit NF4 / FP4 with double quantisation and
    ``compute_dtype`` matmuls (QLoRA's recipe), or int8 (LLM.int8() without outlier fp16 weights)."""
    require_bitsandbytes(kind)
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEADS))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(HEADS))


def keep_trainable_layout(model: nn.Module) -> nn.Module:
    """Turns off bitsandbytes' CPU inference layout: on an AVX-512 BF16 CPU, a 4-bit layer's first forward
    without gradients (an evaluation) repacks its weight for a kernel that has no backward, and every
    training step after it fails. Federated rounds alternate training and evaluation, so the weight stays
    in the layout both use."""
    for name in quantized_modules(model):
        module = model.get_submodule(name)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a peft model wraps) holds bitsandbytes layers."""
    return bool(quantized_modules(model))


def quantized_modules(model: nn.Module) -> list[str]:
    """The names of the bitsandbytes layers in ``model`` (empty for an unquantised model)."""
    return [name for name, module in model.named_modules()
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")]


@contextlib.contextmanager
def peft_without_bitsandbytes():
    """peft's adapter dispatch with bitsandbytes hidden: peft imports it whenever it is installed, even
    for a float base (see the module docstring). Only the dispatch's own availability checks are
    switched off, and only while the block runs; a quantised base must not use this."""
    import peft.tuners.lora.model as lora_model  # VeRA's dispatch has no bitsandbytes branch

    patched = [(name, getattr(lora_model, name)) for name in ("is_bnb_available", "is_bnb_4bit_available")
               if hasattr(lora_model, name)]
    for name, _ in patched:
        setattr(lora_model, name, lambda: False)
    try:
        yield
    finally:
        for name, original in patched:
            setattr(lora_model, name, original)
