"""Differential privacy: the fused DP-SGD optimizer (an opacus drop-in)."""

from fedlora_ext.dp.optimizer import FusedDPOptimizer, fuse

__all__ = ["FusedDPOptimizer", "fuse"]
