"""A Flower run config (``[tool.flwr.app.config]`` and ``flwr run --run-config``) as a FedConfig.

``preset`` names the starting point (default ``"default"``), ``config`` a TOML file of FedConfig keys;
any other FedConfig key overrides it (``-`` and ``_`` alike). Flower's values are scalars, so a tuple
is written ``"8,4,2"``, ``""`` keeps the preset's value (the app declares every key that way, as
Flower only accepts declared keys) and ``"none"`` unsets one (``dirichlet_alpha = "iid"`` too).
``device`` (``"cuda:1"``), ``model-dtype`` (``"bfloat16"``), ``gradient-checkpointing`` (``true`` or
``"true"``) and ``eval-every`` are keys like any other; a node's ``node_config`` ``device`` overrides
the run's ``device`` on that node (``fedlora_ext.flower.client_app.node_device``).
``node-timeout`` and ``round-timeout`` are seconds to wait for the nodes and for a round's replies;
``overwrite`` (the ServerApp's) lets a run replace the run already in ``out-dir``; ``resume`` continues it
(:mod:`fedlora_ext.flower.resume`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora_ext.core.config import FedConfig, preset

OPTIONS = {"node-timeout": 300.0, "round-timeout": 600.0}


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[FedConfig, dict[str, float]]:
    """(the run's FedConfig, the Flower options) from a run config; unknown keys are an error."""
    values = {k.replace("-", "_"): v for k, v in run_config.items() if v != ""}
    options = {k: float(values.pop(k.replace("-", "_"), v)) for k, v in OPTIONS.items()}
    values.pop("overwrite", None)  # the run folder's, read by the ServerApp before the config
    values.pop("resume", None)  # likewise
    base = preset(str(values.pop("preset", "default")))
    path = values.pop("config", "")
    if path:
        base = FedConfig.from_toml(path)
    FedConfig.check_keys(values, who=f"run config (besides preset, config, {', '.join(OPTIONS)})")
    changes = {key: FedConfig.parse_value(key, value) for key, value in values.items()}
    values = {**base.to_dict(), **changes}
    return FedConfig.from_dict(values), options
