"""Differential privacy: DP-SGD pieces for federated clients, accounting, and the opacus drop-in.

The drop-in (``FusedDPOptimizer``, ``fuse``) is imported lazily, so importing this package does not
import opacus's optimizers.
"""

from fedlora_ext.dp.accountant import (
    ACCOUNTANTS,
    PrivacyAccount,
    default_delta,
    noise_for_epsilon,
)
from fedlora_ext.dp.per_sample import PerSampleGradients
from fedlora_ext.dp.sgd import ClientPrivacy, NoiseStream, noisy_gradients_, summed_loss

__all__ = ["ACCOUNTANTS", "ClientPrivacy", "FusedDPOptimizer", "NoiseStream", "PerSampleGradients", "PrivacyAccount",
           "default_delta", "fuse", "noise_for_epsilon", "noisy_gradients_", "summed_loss"]


def __getattr__(name: str):
    if name in ("FusedDPOptimizer", "fuse"):
        from fedlora_ext.dp import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'fedlora_ext.dp' has no attribute {name!r}")
