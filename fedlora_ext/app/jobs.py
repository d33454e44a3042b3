"""The CLI's jobs: ``run`` (one federated run with a line per round, a summary and a run folder) and
``simulate`` (a run without the report); ``compare`` runs many of them (:mod:`fedlora_ext.app.compare`).

Each job claims its run folder (:mod:`fedlora_ext.app.run_folder`: never another run's, locked while it
runs). ``run`` ends its folder with ``summary.json`` whose ``status`` is ``completed``, ``failed`` (with
the error) or ``interrupted``; Ctrl-C ends a job with :class:`JobInterrupted`, whose message is the
one line the CLI prints. Every job can append its log to a file (``--log-file``,
:func:`fedlora_ext.app.job_log.job_log`) and write TensorBoard event files of its rounds
(``--tensorboard``, :mod:`fedlora_ext.app.tensorboard`)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import torch

from fedlora_ext.data.inputs import absolute_inputs
from fedlora_ext.federated import FedConfig
from fedlora_ext.app.reporting import examples_scored, plot_run, summary_row
from fedlora_ext.app.job_log import job_log, job_logger, logged
from fedlora_ext.app.run_folder import (
    checkpoint_rounds,
    claim,
    lock_existing,
    new_run_folder,
    write_json_atomic,
)
from fedlora_ext.app.tensorboard import board_for, summary_writer_class, with_board

MIB = 2**20


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job, after the job has left its folder in order (the last checkpoint is whole,
    the lock released); ``message`` is the one line to show (without the ``fedlora:`` prefix)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@contextlib.contextmanager
def _no_interrupts():
    """A second Ctrl-C while a job records how it ended is ignored (in the main thread)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rounds_done(out: Path, simulation=None) -> int:
    """The rounds a resume would continue after: the last checkpoint's (else the simulation's)."""
    done = checkpoint_rounds(out)
    if done is None:
        done = simulation.rounds_done if simulation is not None else 0
    return done


def interrupted_message(out: Path | None, done: int) -> str:
    if done == 0:
        return ("interrupted before round 1 finished; nothing to continue" + (f" in {out}" if out else "")
                + ": start the run again")
    if out is None:
        return f"interrupted after round {done}"
    return f"interrupted after round {done}; continue with: fedlora run --resume {shlex.quote(str(out))}"


def quiet_libraries() -> None:
    """No per-load reports or tokenising bars from transformers / datasets: the job prints its own."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def default_out_dir(config: FedConfig) -> str:
    """A new folder ``runs/<method>-YYYYMMDD-HHMMSS`` (``-2``, ``-3`` ... when taken), created now."""
    return str(new_run_folder("runs", config.method))


def describe(config: FedConfig, simulation) -> str:
    """The run's header: what trains on what, evaluated how, with which privacy; then one line per
    data note (rows dropped, splits unused ...)."""
    from fedlora_ext.federated.simulation import personal_evaluation

    data = f"{config.dataset} ({len(simulation.train_data)} train / {len(simulation.test_data)} test"
    data += f", {len(simulation.label_names)} labels)" if simulation.label_names else ")"
    split = "IID" if config.dirichlet_alpha is None else f"Dirichlet {config.dirichlet_alpha:g}"
    if config.task != "classification" and config.dirichlet_alpha is not None:
        from fedlora_ext.federated.simulation import label_skew_possible

        skewed = label_skew_possible(config, simulation.train_data)
        what = "categories" if config.task == "sft" else "sequence kinds"
        split = f"{split} over {what}" if skewed else f"IID: no {what} to skew"
    privacy = []
    if config.sample_dp:
        privacy.append(f"DP-SGD epsilon <= {config.dp_epsilon:g} per client" if config.dp_epsilon is not None
                       else f"DP-SGD sigma {config.dp_noise_multiplier:g}")
    if config.server_dp:
        privacy.append("DP-FedAvg at the server")
    spec = simulation.bench.spec
    held = (f"each client holds back {config.test_fraction:g} of its examples to evaluate its own model"
            if personal_evaluation(config, simulation.strategy) else "all client examples train")
    lines = [f"{config.method} on {data} with {config.model} ({spec.kind} r={config.rank} on "
             f"{','.join(spec.target_modules)}), {config.num_clients} clients ({split}), {config.rounds} rounds; "
             + (", ".join(privacy) or "no DP"),
             f"  evaluated on {simulation.data['eval_split']}; {held}",
             f"  on {where(simulation.bench)}"]
    lines += [f"  note: {note}" for note in simulation.data["notes"]]
    return "\n".join(lines)


def where(bench) -> str:
    """``cuda:0 (NVIDIA H200), bfloat16 base, float32 adapters, gradient checkpointing`` or ``cpu, float32``."""
    import torch

    from fedlora_ext.core.device import base_dtype

    device = str(bench.device)
    if bench.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(bench.device)})"
    dtype = str(base_dtype(bench.base_model)).removeprefix("torch.")
    text = f"{device}, {dtype} base" + (", float32 adapters and head under autocast" if dtype != "float32" else "")
    return text + (", gradient checkpointing" if bench.config.gradient_checkpointing else "")


def round_line(metrics: dict, rounds: int, steps: int) -> str:
    parts = [f"round {metrics['round']}/{rounds}", f"clients {len(metrics['clients'])}", f"steps {steps}"]
    who = "test" if any(k.startswith("test_") for k in metrics) else "personal"
    for name, key, digits in (("accuracy", "accuracy", 3), ("ppl", "perplexity", 2), ("exact match", "exact_match", 3)):
        if f"{who}_{key}" in metrics:  # language models: perplexity (over response tokens for SFT)
            parts.append(f"{name} {metrics[f'{who}_{key}']:.{digits}f}")
    finals = [(name, metrics[f"final_test_{key}"], digits) for name, key, digits in
              (("accuracy", "accuracy", 3), ("ppl", "perplexity", 2)) if f"final_test_{key}" in metrics]
    for name, value, digits in finals:  # the last round: the whole test split too
        parts.append(f"(whole test split of {metrics['final_test_examples']}: {name} {value:.{digits}f})")
    if "epsilon_max" in metrics:
        parts.append(f"epsilon {metrics['epsilon_max']:.2f}")
    if "server_epsilon" in metrics:
        parts.append(f"server epsilon {metrics['server_epsilon']:.2f}")
    parts += [f"up {metrics['bytes_up'] / MIB:.3f} MiB", f"down {metrics['bytes_down'] / MIB:.3f} MiB",
              f"{metrics['seconds']:.1f} s"]
    return "  ".join(parts)


def run_job(config: FedConfig | None, *, resume: str | Path | None = None, resume_with: dict | None = None,
            progress: bool = True, echo=print, overwrite: bool = False, log_file: str | Path | None = None,
            tensorboard: bool = False) -> dict:
    """One federated run: prints a line per round and a summary, writes the run folder (config,
    metrics.jsonl, a checkpoint per round, adapter.safetensors, privacy.json when private, plot.png,
    summary.json with the ``status``). A dataset or model given as a relative path is recorded absolute,
    so the run resumes from anywhere. ``resume`` continues the run in that folder from its last
    checkpoint; ``resume_with`` holds :meth:`Simulation.resume`'s changes (``rounds``, the new total, and
    ``dp_epsilon``, a raised budget, extend the run; ``dataset`` / ``model``: inputs that moved). The
    folder is claimed first (:func:`fedlora_ext.app.run_folder.claim`; ``overwrite``
    removes an earlier run's files) and locked until the job ends. Returns the summary.

    A failure is recorded in summary.json (``status`` ``failed``, ``error``) and raised; Ctrl-C records
    ``interrupted`` and raises :class:`JobInterrupted`.

    ``log_file`` appends the job's log there (:func:`job_log`; ``echo``'s lines go to it as well);
    ``tensorboard`` writes every round's scalars to ``<run folder>/tensorboard/`` (:class:`TensorBoardRounds`;
    a resumed run continues a folder's event files whether or not ``tensorboard`` is given)."""
    run_folder = resume if resume is not None else config.out_dir or None
    with job_log(log_file, run_folder=run_folder):
        return _run_job(config, resume=resume, resume_with=resume_with or {}, progress=progress,
                        echo=logged(echo), overwrite=overwrite, tensorboard=tensorboard)


def _run_job(config: FedConfig | None, *, resume: str | Path | None, resume_with: dict, progress: bool, echo,
             overwrite: bool, tensorboard: bool) -> dict:
    if tensorboard:
        summary_writer_class()  # before anything is written: a missing package is a one-line error
    quiet_libraries()
    started = time.perf_counter()
    if resume is not None:
        out = Path(resume)
        lock = lock_existing(out)  # None without such a folder: Simulation.resume says what is wrong
    else:
        named = bool(config.out_dir)
        config = config if named else config.replace(out_dir=default_out_dir(config))
        config = config.replace(**absolute_inputs(config.dataset, config.model))
        out = Path(config.out_dir)
        lock = claim(out, overwrite=overwrite, command="run")
    # a default folder of a run that ends before its first round holds nothing of use: it goes
    discard = resume is None and not named
    simulation = None
    # a resumed folder's summary is only replaced once the run has been rebuilt from it
    record = resume is None
    board = None
    try:
        simulation = _start_run(config, resume, resume_with, echo)
        _pause_for_tests(simulation)
        record = True
        board = board_for(out, tensorboard, resumed=resume is not None, echo=echo)
        summary = _finish_run(simulation, simulation.run(progress=progress, on_round=with_board(
            _round_printer(simulation, echo), board)), started, echo)
    except KeyboardInterrupt:
        with _no_interrupts():
            done = rounds_done(out, simulation)
            if record and lock is not None:
                _record_end(out, started, simulation, status="interrupted", rounds_done=done,
                            **({"resume": f"fedlora run --resume {shlex.quote(str(out))}"} if done else {}))
            if lock is not None:
                lock.release()
            if discard and done == 0:
                shutil.rmtree(out, ignore_errors=True)
        raise JobInterrupted(interrupted_message(None if discard and done == 0 else out, done)) from None
    except Exception as error:
        if record and lock is not None:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _record_end(out, started, simulation, status="failed", error=f"{type(error).__name__}: {message}",
                        rounds_done=rounds_done(out, simulation))
        if discard and rounds_done(out, simulation) == 0:
            if lock is not None:
                lock.release()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if board is not None:
            board.close()
        if lock is not None:
            lock.release()
    return summary


def _start_run(config: FedConfig | None, resume: str | Path | None, resume_with: dict, echo):
    from fedlora_ext.federated.simulation import Simulation

    if resume is not None:
        simulation = Simulation.resume(resume, **resume_with)
        config = simulation.config
        echo(f"fedlora run: {resuming(resume, simulation)}: {describe(config, simulation)}")
        return simulation
    torch.manual_seed(config.seed)
    simulation = Simulation(config)
    echo(f"fedlora run: {describe(config, simulation)}")
    return simulation


def resuming(run_dir, simulation) -> str:
    """``resuming DIR after round 2 of 3``, or for a run given more rounds ``extending DIR from 3 to 5 rounds
    after round 3`` (with a raised DP-SGD budget, the budget and the sigma it keeps)."""
    config, done = simulation.config, simulation.rounds_done
    line = (f"resuming {run_dir} after round {done} of {config.rounds}" if simulation.extended_from is None else
            f"extending {run_dir} from {simulation.extended_from} to {config.rounds} rounds after round {done}")
    if config.dp_calibration_epsilon is not None:
        line += (f" (DP-SGD budget epsilon {config.dp_epsilon:g} per client; the noise stays as calibrated for "
                 f"epsilon {config.dp_calibration_epsilon:g} over {config.dp_calibration_rounds} rounds)")
    return line


# Test-only, not for users: FEDLORA_TEST_PAUSE_AFTER_ROUND=<round>:<path> makes `run`, once round <round> is
# checkpointed (before the next round starts, where a real Ctrl-C finds a run between rounds), create <path>
# and wait until a signal ends it (Ctrl-C is handled as always) or <path> is removed (the run goes on).
def _pause_for_tests(simulation) -> None:
    value = os.environ.get("FEDLORA_TEST_PAUSE_AFTER_ROUND")
    if not value:
        return
    after, path = value.split(":", 1)
    step = simulation.step

    def step_after_pause(round_index: int, *args, **kwargs) -> dict:
        if round_index == int(after):
            Path(path).touch()
            while Path(path).exists():
                time.sleep(0.05)  # a signal's handler runs at once
        return step(round_index, *args, **kwargs)

    simulation.step = step_after_pause


def _round_printer(simulation, echo):
    config, strategy = simulation.config, simulation.strategy

    def on_round(metrics: dict) -> None:
        n = {c.cid: c.num_examples for c in simulation.clients}
        steps = sum(strategy.local_steps_per_round(n[cid]) for cid in metrics["clients"])
        echo(round_line(metrics, config.rounds, steps))

    return on_round


def _chance(simulation) -> float | None:
    if simulation is None or simulation.config.task != "classification" or not simulation.label_names:
        return None  # generation and perplexity have no chance level
    return 1 / len(simulation.label_names)


def _record_end(out: Path, started: float, simulation, **status) -> None:
    """summary.json of a run that did not complete: what it did, and how it ended."""
    history = simulation.history if simulation is not None else []
    summary = summary_row(simulation.config.method, history) if history else {}
    summary.update(run_folder=str(out), seconds_total=time.perf_counter() - started, chance=_chance(simulation),
                   rounds=len(history), **status)
    try:
        if history:
            plot_run(history, out / "plot.png", title=f"{simulation.config.method} on {simulation.config.dataset}")
        write_json_atomic(out / "summary.json", summary)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        pass


def _finish_run(simulation, result, started: float, echo) -> dict:
    from fedlora_ext.federated.privacy import format_report

    config = simulation.config
    out = Path(config.out_dir)
    plot_run(result.history, out / "plot.png", title=f"{config.method} on {config.dataset}")
    summary = summary_row(config.method, result.history)
    summary.update(run_folder=str(out), seconds_total=time.perf_counter() - started, chance=_chance(simulation),
                   status="completed", rounds=len(result.history), **examples_scored(result.history))
    write_json_atomic(out / "summary.json", summary)
    echo(summary_line(summary, config.rounds))
    if result.privacy:
        echo(format_report(result.privacy))
    written = ["config.json", "data.json", "labels.json" if simulation.label_names else "", "metrics.jsonl",
               "generations.jsonl" if (out / "generations.jsonl").exists() else "",
               "adapter.safetensors", "plot.png", "summary.json", "privacy.json" if result.privacy else ""]
    echo(f"run folder: {out} ({', '.join(name for name in written if name)})")
    return summary


def summary_line(summary: dict, rounds: int) -> str:
    """``summary: final test accuracy 0.812 on all 445 test examples (best round 0.836 on the 128 every round
    saw, chance 0.20) after 5 rounds; ...``: the final score and the best round's, each on what it saw."""
    digits = 2 if summary["metric"] == "perplexity" else 3
    final = f"final {summary['accuracy']} {summary['metric']} {summary['final']:.{digits}f}"
    best = f"best round {summary['best']:.{digits}f}"
    if summary.get("final_examples") and summary["final_examples"] != summary.get("round_examples"):
        final += f" on all {summary['final_examples']} test examples"
        best += f" on the {summary['round_examples']} every round saw"
    if "exact match" in summary:
        final += f", exact match {summary['exact match']:.3f}"
    chance = f", chance {summary['chance']:.2f}" if summary.get("chance") else ""
    eps = f"; epsilon spent <= {summary['epsilon']:.2f}" if summary.get("epsilon") is not None else ""
    return (f"summary: {final} ({best}{chance}) after {rounds} rounds{eps}; {summary['MiB up']:.2f} MiB up, "
            f"{summary['MiB down']:.2f} MiB down; {summary['seconds_total']:.0f} s")


def simulate_job(config: FedConfig, *, progress: bool = True, overwrite: bool = False,
                 log_file: str | Path | None = None, tensorboard: bool = False):
    """:func:`fedlora_ext.federated.simulate` in a claimed, locked run folder (when ``out_dir`` is set);
    Ctrl-C raises :class:`JobInterrupted`. Returns the SimulationResult. It prints nothing (the CLI
    prints the result); ``log_file`` gets the run's header, a line per round and the totals (:func:`job_log`),
    ``tensorboard`` needs an ``out_dir`` (:class:`TensorBoardRounds`)."""
    with job_log(log_file, run_folder=config.out_dir or None):
        return _simulate_job(config, progress=progress, overwrite=overwrite, tensorboard=tensorboard)


def _simulate_job(config: FedConfig, *, progress: bool, overwrite: bool, tensorboard: bool):
    from fedlora_ext.federated.privacy import format_report
    from fedlora_ext.federated.simulation import Simulation

    out = Path(config.out_dir) if config.out_dir else None
    if tensorboard:
        summary_writer_class()
        if out is None:
            raise ValueError("--tensorboard writes into the run folder: give --out")
    lock = claim(out, overwrite=overwrite, command="simulate") if out is not None else None
    simulation = board = None
    config = config.replace(**absolute_inputs(config.dataset, config.model))
    try:
        torch.manual_seed(config.seed)
        simulation = Simulation(config)
        log_only = job_logger.info  # the console gets the CLI's JSON lines once the run is over
        log_only(f"fedlora simulate: {describe(config, simulation)}")
        board = board_for(out, tensorboard, resumed=False, echo=log_only)
        result = simulation.run(progress=progress, on_round=with_board(_round_printer(simulation, log_only), board))
        log_only(f"bytes uploaded {result.ledger.total('up')}, downloaded {result.ledger.total('down')}"
                 + (f"; run folder {result.out_dir}" if result.out_dir else ""))
        if result.privacy:
            log_only(format_report(result.privacy))
        return result
    except KeyboardInterrupt:
        with _no_interrupts():
            done = rounds_done(out, simulation) if out is not None else (simulation.rounds_done if simulation else 0)
            if lock is not None:
                lock.release()
        raise JobInterrupted(interrupted_message(out, done)) from None
    finally:
        if board is not None:
            board.close()
        if lock is not None:
            lock.release()
