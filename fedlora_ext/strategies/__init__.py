"""Federated LoRA methods, one module each, registered by name (``make_strategy(config)``)."""

from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.strategies import (  # noqa: F401  (importing registers them)
    baselines,
    fed_sb,
    fedex_lora,
    fedit,
    fedprox,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_a2,
    rolora,
    scaffold,
)
from fedlora_ext.strategies.base import (
    Strategy,
    make_strategy,
    register,
    strategy_names,
)

__all__ = ["ClientState", "GlobalState", "Reply", "Strategy", "make_strategy", "register", "strategy_names"]
