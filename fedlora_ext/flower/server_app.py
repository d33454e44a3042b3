"""The ServerApp: ``flwr run`` starts it on the SuperLink; it runs the configured method to the end.

The run config picks the preset and overrides (:mod:`fedlora_ext.flower.run_config`); with
``out_dir`` set, the server writes what ``fedlora run`` writes: config.json, metrics.jsonl (a line per
round), adapter.safetensors (after every round) and privacy.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora_ext.flower.run_config import config_from_run_config
from fedlora_ext.flower.strategy import FedLoRAStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fedlora_ext").setLevel(logging.INFO)
    config, options = config_from_run_config(context.run_config)
    strategy = FedLoRAStrategy(config, node_timeout=options["node-timeout"])
    try:
        strategy.connect(grid)
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=strategy.config.rounds,
                       timeout=options["round-timeout"])
        report = strategy.finish()
    except Exception as error:  # `flwr run` exits 0 whatever happens here: say it in the run folder
        _write_summary(config, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                "rounds": len(strategy.history)})
        raise
    _write_summary(config, {"status": "completed", "rounds": len(strategy.history),
                            "final": strategy.history[-1] if strategy.history else None, "privacy": report})


def _write_summary(config, summary: dict) -> None:
    if config.out_dir:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
