"""A Flower run config (``[tool.flwr.app.config]`` and ``flwr run --run-config``) as a FedConfig.

``preset`` names the starting point (default ``"default"``), ``config`` a TOML file of FedConfig keys;
any other FedConfig key overrides it (``-`` and ``_`` alike). Flower's values are scalars, so a tuple
is written ``"8,4,2"``, ``""`` keeps the preset's value (the app declares every key that way, as
Flower only accepts declared keys) and ``"none"`` unsets one (``dirichlet_alpha = "iid"`` too).
``node-timeout`` and ``round-timeout`` are seconds to wait for the nodes and for a round's replies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedlora_ext.federated.config import FedConfig, preset

OPTIONS = {"node-timeout": 300.0, "round-timeout": 600.0}


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[FedConfig, dict[str, float]]:
    """(the run's FedConfig, the Flower options) from a run config; unknown keys are an error."""
    values = {k.replace("-", "_"): v for k, v in run_config.items() if v != ""}
    options = {k: float(values.pop(k.replace("-", "_"), v)) for k, v in OPTIONS.items()}
    base = preset(str(values.pop("preset", "default")))
    path = values.pop("config", "")
    if path:
        base = FedConfig.from_toml(path)
    fields = {f.name: f for f in dataclasses.fields(FedConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"run config: unknown keys {unknown}; use FedConfig keys, preset, config, "
                         f"{', '.join(OPTIONS)}")
    changes = {}
    for key, value in values.items():
        annotation = fields[key].type.replace(" ", "")
        if annotation.startswith("tuple[") and isinstance(value, str):
            kind = int if annotation.startswith("tuple[int") else str
            value = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        elif "None" in annotation and value in ("none", "None"):
            value = None
        changes[key] = value
    values = {**base.to_dict(), **changes}
    return FedConfig.from_dict(values), options
