"""Federated LoRA methods, one module each, registered by name (``make_strategy(config)``)."""

from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.strategies import (  # noqa: F401  (importing registers them)
    baselines,
    fedex_lora,
    fedit,
    fedprox,
    fedsa_lora,
    ffa_lora,
    flora,
    hetlora,
    lora_a2,
)
from fedlora_ext.strategies.base import (
    Strategy,
    make_strategy,
    register,
    strategy_names,
)

__all__ = ["ClientState", "GlobalState", "Reply", "Strategy", "make_strategy", "register", "strategy_names"]
