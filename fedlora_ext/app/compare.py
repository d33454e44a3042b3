"""``fedlora compare``: several variants (method x privacy x label skew x ranks x any ``--vary`` key) on the
same partition and seeds, each a ``run`` (:func:`fedlora_ext.app.jobs.run_job`) in its own folder,
then a Markdown table and plots.

With ``seeds`` N >= 2 every variant runs with seeds ``seed``, ``seed + 1``, ... ``seed + N - 1`` into
``<out>/<variant>/seed<k>/``, and the report gives each variant's mean and 95% interval over its seeds
(:mod:`fedlora_ext.app.seed_report`); with one seed a variant runs into ``<out>/<variant>/`` as it
always did.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora_ext.errors import RunError
from fedlora_ext.federated import FedConfig
from fedlora_ext.app.job_log import job_log, logged
from fedlora_ext.app.jobs import JobInterrupted, run_job
from fedlora_ext.app.reporting import accuracy_key, markdown_table, plot_comparison, summary_row
from fedlora_ext.app.run_folder import claim, new_run_folder, write_json_atomic
from fedlora_ext.app.seed_report import plot_seed_comparison, seed_row, seed_table, t_note
from fedlora_ext.app.tensorboard import summary_writer_class
from fedlora_ext.strategies import make_strategy, strategy_names


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


def compare_job(base: FedConfig, variant_list: Sequence[Variant], out_dir: str | Path | None = None, *,
                seeds: int = 1, progress: bool = False, echo=print, overwrite: bool = False,
                log_file: str | Path | None = None, tensorboard: bool = False) -> Path:
    """Runs every variant into ``out_dir/<variant>`` (with ``seeds`` N >= 2, each of its seeds into
    ``out_dir/<variant>/seed<k>``: :func:`seed_runs`; a variant a method cannot take, or a run that
    fails, is listed with the reason), then writes the report (:func:`write_compare_report`). The
    folder (default ``runs/compare-<time>``) is claimed and locked as a run's; it starts with
    ``compare.json`` (the base configuration and the variants). ``log_file`` gets the console's lines
    and every variant's own (header, rounds, summary); ``tensorboard`` gives each run its
    ``tensorboard/`` (point TensorBoard at the comparison's folder to see them side by side)."""
    if not (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1):
        raise ValueError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    with job_log(log_file, run_folder=out_dir or None):
        return _compare_job(base, variant_list, out_dir, seeds=seeds, progress=progress, echo=logged(echo),
                            overwrite=overwrite, tensorboard=tensorboard)


def seed_runs(variant: Variant, seeds: int) -> list[tuple[str, FedConfig]]:
    """(folder under the comparison, configuration) of each run of ``variant``: with one seed the variant
    itself in ``<variant>``; with N, ``seed`` + i (partition, initialisation, client sampling) for i < N in
    ``<variant>/seed<seed + i>``, a private run's noise seeded the same way (``dp_noise_seed`` = the run's
    seed, or the configured ``dp_noise_seed`` + i) so that each run can be repeated exactly."""
    config = variant.config
    if seeds == 1:
        return [(variant.name, config)]
    private = config.sample_dp or config.server_dp
    noise = config.dp_noise_seed if config.dp_noise_seed is not None else config.seed
    return [(f"{variant.name}/seed{config.seed + i}",
             config.replace(seed=config.seed + i, **({"dp_noise_seed": noise + i} if private else {})))
            for i in range(seeds)]


def _compare_job(base: FedConfig, variant_list: Sequence[Variant], out_dir: str | Path | None, *, seeds: int,
                 progress: bool, echo, overwrite: bool, tensorboard: bool) -> Path:
    if tensorboard:
        summary_writer_class()
    runnable, skipped = check_variants(variant_list)  # before anything trains: a typo costs nothing
    plans = {variant.name: seed_runs(variant, seeds) for variant in runnable}  # a bad seed: before training too
    out = Path(out_dir) if out_dir else new_run_folder("runs", "compare")
    ran: dict[str, list[str]] = {}
    failed = []
    with claim(out, overwrite=overwrite, command="compare"):
        listing = {"base": base.to_dict(), "variants": [v.name for v in variant_list]}
        if seeds > 1:
            listing["seeds"] = [base.seed + i for i in range(seeds)]
        write_json_atomic(out / "compare.json", listing)
        for name, reason in skipped:
            echo(f"not run {name}: {reason}")
        for variant in runnable:
            for folder, config in plans[variant.name]:
                label = folder.replace("/seed", " seed ")
                echo(f"run {label} ...")
                try:
                    summary = run_job(config.replace(out_dir=str(out / folder)), progress=progress,
                                      echo=lambda line: None, tensorboard=tensorboard)  # its lines: the log only
                except (ValueError, RunError) as error:  # the run failed: listed, and the comparison fails
                    failed.append((folder, str(error)))
                    echo(f"    failed: {error}")
                    continue
                except KeyboardInterrupt:
                    done, total = sum(map(len, ran.values())), sum(map(len, plans.values()))
                    what = f"{done} of {len(variant_list)}" if seeds == 1 else f"{done} of {total} runs"
                    raise JobInterrupted(f"interrupted during variant {label} ({what} finished in {out}); run the "
                                         "comparison again with --overwrite") from None
                ran.setdefault(variant.name, []).append(folder)
                echo(f"    final {summary['accuracy']} {summary['metric']} {summary['final']:.3f}, "
                     f"best {summary['best']:.3f}")
            if seeds > 1 and variant.name in ran:
                echo("    " + _seed_line(out, variant.name, ran[variant.name]))
        path = write_compare_report(base, out, ran, skipped, failed, seeds=seeds)
    echo(f"wrote {path}")
    if failed:
        what = "variants" if seeds == 1 else "runs"
        raise RunError(f"{len(failed)} of {sum(map(len, plans.values()))} {what} failed "
                       f"({', '.join(n for n, _ in failed)}): {failed[0][1]}; see {path}")
    return path


def _seed_line(out: Path, name: str, folders: Sequence[str]) -> str:
    """``fedit-nodp-a0.5 over 3 seeds: final test accuracy 0.512 ± 0.034 (95%), best 0.601 ± 0.020``."""
    row = seed_row(name, [summary_row(name, _history(out / f)) for f in folders])
    ci = {key: "" if row[f"{key}_ci95"] is None else f" ± {row[f'{key}_ci95']:.3f}" for key in ("final", "best")}
    return (f"{name} over {row['seeds']} seeds: final {row['accuracy']} {row['metric']} {row['final']:.3f}"
            f"{ci['final']} (95%), best {row['best']:.3f}{ci['best']}")


def _history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def check_variants(variant_list: Sequence[Variant]) -> tuple[list[Variant], list[tuple[str, str]]]:
    """The variants that can run, and (name, reason) of those a method cannot take (e.g. heterogeneous
    ranks for a one-rank method), decided before any trains. An unknown method is a mistake, not a
    variant: ValueError."""
    runnable, skipped = [], []
    known = strategy_names()
    for variant in variant_list:
        if variant.config.method not in known:
            raise ValueError(f"--methods: unknown method {variant.config.method!r}; known methods: {known}")
        try:
            make_strategy(variant.config)
        except ValueError as error:
            skipped.append((variant.name, str(error)))
            continue
        runnable.append(variant)
    if not runnable:
        raise ValueError(f"no variant can run: {'; '.join(f'{name}: {reason}' for name, reason in skipped)}")
    return runnable, skipped


def write_compare_report(base: FedConfig, out: Path, runs: Mapping[str, Sequence[str]],
                         skipped: Sequence[tuple[str, str]], failed: Sequence[tuple[str, str]] = (), *,
                         seeds: int = 1) -> Path:
    """``results.md`` (table and plots), ``results.json`` and the PNGs, from the run folders of each
    variant (``runs``: variant -> its folders under ``out``, one per seed)."""
    if seeds > 1:
        return _write_seed_report(base, out, runs, skipped, failed, seeds)
    histories = {name: _history(out / folders[0]) for name, folders in runs.items()}
    rows = [summary_row(name, history) for name, history in histories.items()]
    if histories:
        plot_comparison(histories, out)
    text = ["# fedlora compare", "", f"Base configuration: `{json.dumps(base.to_dict())}`", "", markdown_table(rows)]
    return _finish_report(out, text, skipped, failed, {"rows": rows, "skipped": list(skipped), "failed": list(failed),
                                                        "accuracy_key": {n: accuracy_key(h) for n, h in histories.items()}})


def _write_seed_report(base: FedConfig, out: Path, runs: Mapping[str, Sequence[str]],
                       skipped: Sequence[tuple[str, str]], failed: Sequence[tuple[str, str]], seeds: int) -> Path:
    histories = {name: [_history(out / folder) for folder in folders] for name, folders in runs.items()}
    per_seed = {name: [summary_row(folder, _history(out / folder)) for folder in folders] for name, folders in runs.items()}
    rows = [seed_row(name, per_seed[name]) for name in runs]
    if histories:
        plot_seed_comparison(histories, out)
    first, last = base.seed, base.seed + seeds - 1
    text = ["# fedlora compare", "", f"Base configuration: `{json.dumps(base.to_dict())}`", "",
            f"Each variant ran with {seeds} seeds, {first} to {last} (the partition, the initialisation, the clients "
            "sampled; a private run's noise too, through `dp_noise_seed`), each in `<variant>/seed<k>/`. The "
            "accuracy columns are the mean over the seeds ± the half-width of its 95% Student-t interval, "
            f"t sd / sqrt(n) with {t_note(seeds)} (n: the `seeds` column); bytes and epsilon are one value, or "
            "their range over the seeds; seconds are the mean of one run.", ""]
    text += [seed_table(rows) if rows else "", "", "Per seed:", "",
             markdown_table([row for name in runs for row in per_seed[name]])]
    return _finish_report(out, text, skipped, failed, {
        "seeds": list(range(first, last + 1)), "rows": rows,
        "runs": [row for name in runs for row in per_seed[name]], "skipped": list(skipped), "failed": list(failed),
        "accuracy_key": {n: accuracy_key(h[0]) for n, h in histories.items()}})


def _finish_report(out: Path, text: list[str], skipped: Sequence[tuple[str, str]], failed: Sequence[tuple[str, str]],
                   results: dict) -> Path:
    """The report's lists of variants not run and failed, its plots, then results.md and results.json."""
    if skipped:
        text += ["", "Not run (the method cannot take the variant):", *[f"- {name}: {reason}" for name, reason in skipped]]
    if failed:
        text += ["", "Failed:", *[f"- {name}: {reason}" for name, reason in failed]]
    plots = [p for p in ("accuracy.png", "final_accuracy.png", "bytes.png", "epsilon.png") if (out / p).exists()]
    text += ["", *[f"![{p}]({p})" for p in plots]]
    (out / "results.md").write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return out / "results.md"
