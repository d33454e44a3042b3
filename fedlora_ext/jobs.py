"""The CLI's jobs: ``run`` (one federated run with a line per round, a summary and a run folder) and
``compare`` (several variants on the same partition and seeds, a Markdown table and plots)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora_ext.federated import FedConfig
from fedlora_ext.reporting import accuracy_key, markdown_table, plot_comparison, plot_run, summary_row

MIB = 2**20


def quiet_libraries() -> None:
    """No per-load reports or tokenising bars from transformers / datasets: the job prints its own."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def default_out_dir(config: FedConfig) -> str:
    return str(Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def describe(config: FedConfig, simulation) -> str:
    data = f"{config.dataset} ({len(simulation.train_data)} train / {len(simulation.test_data)} test"
    data += f", {len(simulation.label_names)} labels)" if simulation.label_names else ")"
    split = "IID" if config.dirichlet_alpha is None else f"Dirichlet {config.dirichlet_alpha:g}"
    privacy = []
    if config.sample_dp:
        privacy.append(f"DP-SGD epsilon <= {config.dp_epsilon:g} per client" if config.dp_epsilon is not None
                       else f"DP-SGD sigma {config.dp_noise_multiplier:g}")
    if config.server_dp:
        privacy.append("DP-FedAvg at the server")
    return (f"{config.method} on {data} with {config.model}, {config.num_clients} clients ({split}), "
            f"{config.rounds} rounds; " + (", ".join(privacy) or "no DP"))


def round_line(metrics: dict, rounds: int, steps: int) -> str:
    parts = [f"round {metrics['round']}/{rounds}", f"clients {len(metrics['clients'])}", f"steps {steps}"]
    key = "test_accuracy" if "test_accuracy" in metrics else "personal_accuracy"
    if key in metrics:
        parts.append(f"accuracy {metrics[key]:.3f}")
    if "epsilon_max" in metrics:
        parts.append(f"epsilon {metrics['epsilon_max']:.2f}")
    if "server_epsilon" in metrics:
        parts.append(f"server epsilon {metrics['server_epsilon']:.2f}")
    parts += [f"up {metrics['bytes_up'] / MIB:.3f} MiB", f"down {metrics['bytes_down'] / MIB:.3f} MiB",
              f"{metrics['seconds']:.1f} s"]
    return "  ".join(parts)


def run_job(config: FedConfig | None, *, resume: str | Path | None = None, progress: bool = True, echo=print) -> dict:
    """One federated run: prints a line per round and a summary, writes the run folder (config,
    metrics.jsonl, a checkpoint per round, adapter.safetensors, privacy.json when private, plot.png).
    ``resume`` continues the run in that folder from its last checkpoint. Returns the summary."""
    from fedlora_ext.federated.privacy import format_report
    from fedlora_ext.federated.simulation import Simulation

    quiet_libraries()
    started = time.perf_counter()
    if resume is not None:
        simulation = Simulation.resume(resume)
        config = simulation.config
        echo(f"fedlora run: resuming {resume} after round {simulation.rounds_done} of {config.rounds}: "
             f"{describe(config, simulation)}")
    else:
        config = config if config.out_dir else config.replace(out_dir=default_out_dir(config))
        torch.manual_seed(config.seed)
        simulation = Simulation(config)
        echo(f"fedlora run: {describe(config, simulation)}")
    strategy = simulation.strategy

    def on_round(metrics: dict) -> None:
        n = {c.cid: c.num_examples for c in simulation.clients}
        steps = sum(strategy.local_steps_per_round(n[cid]) for cid in metrics["clients"])
        echo(round_line(metrics, config.rounds, steps))

    result = simulation.run(progress=progress, on_round=on_round)
    out = Path(config.out_dir)
    plot_run(result.history, out / "plot.png", title=f"{config.method} on {config.dataset}")
    summary = summary_row(config.method, result.history)
    summary.update(run_folder=str(out), seconds_total=time.perf_counter() - started,
                   chance=1 / len(simulation.label_names) if simulation.label_names else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    chance = f", chance {summary['chance']:.2f}" if summary["chance"] else ""
    eps = f"; epsilon spent <= {summary['epsilon']:.2f}" if summary["epsilon"] is not None else ""
    echo(f"summary: final {summary['accuracy']} accuracy {summary['final']:.3f} (best {summary['best']:.3f}{chance}) "
         f"after {config.rounds} rounds{eps}; {summary['MiB up']:.2f} MiB up, {summary['MiB down']:.2f} MiB down; "
         f"{summary['seconds_total']:.0f} s")
    if result.privacy:
        echo(format_report(result.privacy))
    echo(f"run folder: {out} (config.json, metrics.jsonl, adapter.safetensors, plot.png"
         + (", privacy.json)" if result.privacy else ")"))
    return summary


@dataclass(frozen=True)
class Variant:
    name: str
    config: FedConfig


def variants(base: FedConfig, methods: Sequence[str], dp: Sequence[str], epsilons: Sequence[float],
             alphas: Sequence[float | None], ranks: Sequence[str], client_ranks: Sequence[int],
             vary: dict[str, Sequence] | None = None) -> list[Variant]:
    """Every combination of method x privacy (off, or on at each epsilon) x Dirichlet alpha x ranks
    (``homogeneous``, or ``heterogeneous`` with ``client_ranks``) x each ``vary`` key's values, on the
    base config's seed."""
    privacy = [("nodp", {"dp_epsilon": None, "dp_noise_multiplier": None})] if "off" in dp else []
    if "on" in dp:
        privacy += [(f"eps{e:g}", {"dp_epsilon": e, "dp_noise_multiplier": None}) for e in epsilons]
    axes = [[(key, value) for value in values] for key, values in (vary or {}).items()]
    out = []
    for method, (tag, dp_values), alpha, rank_mode, *extra in itertools.product(methods, privacy, alphas, ranks, *axes):
        changes = {"method": method, "dirichlet_alpha": alpha, **dp_values, **dict(extra)}
        name = [method, tag, f"a{alpha:g}" if alpha is not None else "iid"]
        if rank_mode == "heterogeneous":
            changes["client_ranks"] = tuple(client_ranks)
            name.append("het")
        name += [f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}" for key, value in extra]
        out.append(Variant("-".join(name), base.replace(**changes)))
    return out


def compare_job(base: FedConfig, variant_list: Sequence[Variant], out_dir: str | Path, *, progress: bool = False,
                echo=print) -> Path:
    """Runs every variant into ``out_dir/<variant>`` (a variant a method cannot take is listed with the
    reason), then writes the report (:func:`write_compare_report`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ran, skipped = [], []
    for variant in variant_list:
        echo(f"run {variant.name} ...")
        try:
            summary = run_job(variant.config.replace(out_dir=str(out / variant.name)), progress=progress,
                              echo=lambda line: None)
        except ValueError as error:  # e.g. heterogeneous ranks for a one-rank method
            skipped.append((variant.name, str(error)))
            echo(f"    not run: {error}")
            continue
        ran.append(variant.name)
        echo(f"    final {summary['accuracy']} accuracy {summary['final']:.3f}, best {summary['best']:.3f}")
    path = write_compare_report(base, out, ran, skipped)
    echo(f"wrote {path}")
    return path


def write_compare_report(base: FedConfig, out: Path, names: Sequence[str], skipped: Sequence[tuple[str, str]]) -> Path:
    """``results.md`` (table and plots), ``results.json`` and the PNGs, from the variants' run folders."""
    histories = {name: [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
                 for name in names}
    rows = [summary_row(name, history) for name, history in histories.items()]
    if histories:
        plot_comparison(histories, out)
    text = ["# fedlora compare", "", f"Base configuration: `{json.dumps(base.to_dict())}`", "", markdown_table(rows)]
    if skipped:
        text += ["", "Not run:", *[f"- {name}: {reason}" for name, reason in skipped]]
    plots = [p for p in ("accuracy.png", "final_accuracy.png", "bytes.png", "epsilon.png") if (out / p).exists()]
    text += ["", *[f"![{p}]({p})" for p in plots]]
    (out / "results.md").write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "skipped": list(skipped),
                                                  "accuracy_key": {n: accuracy_key(h) for n, h in histories.items()}},
                                                 indent=2))
    return out / "results.md"
