"""Data and models for runs: tiny in-code models, synthetic tasks, and real data through one pipeline
(:mod:`fedlora_ext.data.pipeline`: read -> clean -> split -> fingerprint -> tokenise)."""

from fedlora_ext.data.synthetic import synthetic_dataset
from fedlora_ext.data.tiny_models import build_model

__all__ = ["build_model", "synthetic_dataset"]
