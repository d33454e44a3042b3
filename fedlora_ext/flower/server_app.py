"""The ServerApp: ``flwr run`` starts it on the SuperLink; it runs the configured method to the end.

The run config picks the preset and overrides (:mod:`fedlora_ext.flower.run_config`); with
``out_dir`` set, the server writes what ``fedlora run`` writes: config.json, metrics.jsonl (a line per
round), adapter.safetensors (after every round), base_model/ (tiny models), privacy.json, plot.png and
summary.json (the keys of ``fedlora run``'s, with ``status`` ``completed`` or ``failed`` and the
``error``: ``flwr run`` exits 0 whatever happens here). The out-dir is read from the run config before
the rest is checked, so a configuration error is reported there too. The folder is claimed and locked
as ``fedlora run`` does (:mod:`fedlora_ext.app.run_folder`): never a folder holding another run, and
``fedlora status`` shows it. Every round is checkpointed there as ``fedlora run`` does; ``resume = true``
with the same run config continues a run whose server stopped (:mod:`fedlora_ext.flower.resume`), its
lock taken over from the dead server; a refused resume writes nothing into the folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora_ext.federated.simulation import save_base_model
from fedlora_ext.flower.run_config import config_from_run_config
from fedlora_ext.flower.resume import Continued, check_resumable
from fedlora_ext.flower.strategy import FedLoRAStrategy
from fedlora_ext.app.reporting import examples_scored, plot_run, summary_row
from fedlora_ext.app.run_folder import RunLock, claim, lock_existing, write_json_atomic

app = ServerApp()
log = logging.getLogger("fedlora_ext.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fedlora_ext").setLevel(logging.INFO)
    run_server(grid, context.run_config)


def out_dir_of(run_config: Mapping[str, Any]) -> str | None:
    """The run config's out-dir (``out-dir`` or ``out_dir``), before anything else in it is checked."""
    for key in ("out-dir", "out_dir"):
        value = run_config.get(key)
        if isinstance(value, str) and value.strip() and value.strip().lower() != "none":
            return value.strip()
    return None


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict:
    """The whole server side of a run; returns the summary (also summary.json with an out-dir).
    Any failure, a configuration error included, is recorded in summary.json and raised."""
    started = time.perf_counter()
    # `overwrite` (true: replace the run already in out-dir) and `resume` (true: continue it), declared by
    # the app, false by default
    overwrite, resume = (str(run_config.get(key, "")).strip().lower() in ("true", "1", "yes")
                         for key in ("overwrite", "resume"))
    run_config = {k: v for k, v in run_config.items() if k not in ("overwrite", "resume")}
    if resume:
        out, lock = _take_over(run_config, overwrite)
    else:
        out = out_dir_of(run_config)
        lock = claim(out, overwrite=overwrite, command="flower") if out else None
    strategy = None
    try:
        try:
            config, options = config_from_run_config(run_config)
            if lock is None and config.out_dir:  # an out_dir from the preset or the config file
                out, lock = config.out_dir, claim(config.out_dir, overwrite=overwrite, command="flower")
            strategy = FedLoRAStrategy(config, node_timeout=options["node-timeout"], resume=resume)
            strategy.round_timeout = options["round-timeout"]  # also each stage of secure aggregation
            strategy.connect(grid)
            if strategy.out_dir is not None:  # a tiny model's base, for `fedlora export` (as `fedlora run` saves it)
                save_base_model(strategy.out_dir, strategy.config, strategy.bench, strategy.label_names)
            done = strategy.rounds_done  # Flower numbers the rounds of a start from 1
            Continued(strategy, done).start(grid, initial_arrays=strategy.global_arrays(),
                                            num_rounds=strategy.config.rounds - done, timeout=options["round-timeout"])
            strategy.finish()
        except Exception as error:  # `flwr run` exits 0 whatever happens here: say it in the run folder
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _write_summary(out, strategy, started, status="failed", error=f"{type(error).__name__}: {message}")
            raise
        return _write_summary(out, strategy, started, status="completed")
    finally:
        if lock is not None:
            lock.release()


def _take_over(run_config: Mapping[str, Any], overwrite: bool) -> tuple[str, RunLock]:
    """``resume = true``: the out-dir of the run to continue, locked (a killed server's lock died with it),
    after the checks that need no node (:func:`fedlora_ext.flower.resume.check_resumable`). A refusal is
    raised, not written into the folder: it holds a run that stays as it is."""
    if overwrite:
        raise ValueError("resume = true and overwrite = true: resume continues the run in out-dir, overwrite "
                         "replaces it; give one of them")
    config, _ = config_from_run_config(run_config)
    out = out_dir_of(run_config) or config.out_dir
    if not out:
        raise ValueError("resume = true continues the run in out-dir, but no out-dir is given; give the run's "
                         "out-dir")
    if not Path(out).is_dir():
        raise ValueError(f"resume = true: out-dir {out} is no folder; give the out-dir of the run to continue")
    lock = lock_existing(out)
    try:
        check_resumable(Path(out), config.replace(out_dir=out))
    except BaseException:
        lock.release(remove=False)
        raise
    return out, lock


def _chance(strategy) -> float | None:
    """1 / the number of classes, as ``fedlora run`` reports it (None for synthetic data)."""
    try:
        if strategy.config.dataset == "synthetic" or strategy.config.task != "classification":
            return None
        labels = strategy.bench.model(strategy.strategy.global_rank()).config.num_labels
        return 1 / labels if labels else None
    except Exception:  # noqa: BLE001 - a missing chance level must not hide the run's result
        return None


def _write_summary(out: str | None, strategy, started: float, **status) -> dict:
    """summary.json: ``fedlora run``'s keys (:func:`fedlora_ext.app.reporting.summary_row`, run_folder,
    seconds_total, chance) for the rounds done, ``rounds``, and ``status`` (``error`` when failed);
    plot.png when a round was recorded."""
    history = list(strategy.history) if strategy is not None else []
    config = strategy.config if strategy is not None else None
    summary = summary_row(config.method, history) if history else {}
    summary.update(run_folder=out, seconds_total=time.perf_counter() - started,
                   chance=_chance(strategy) if strategy is not None and strategy.server is not None else None,
                   rounds=len(history), **examples_scored(history), **status)
    if out:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            if history:
                plot_run(history, Path(out) / "plot.png", title=f"{config.method} on {config.dataset} (Flower)")
            write_json_atomic(Path(out) / "summary.json", summary)
        except Exception as error:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not write the summary to %s: %s", out, error)
    return summary
