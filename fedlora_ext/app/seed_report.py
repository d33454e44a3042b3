"""A comparison over seeds (``fedlora compare --seeds N``, N >= 2): each variant's mean and 95% Student-t
interval over its seeds, as a table row and as plots with error bars.

Accuracy-like numbers (``final``, ``best``, an SFT run's ``exact match``, ``personal``) get mean +-
t_{0.975, N-1} sd / sqrt(N) (:func:`fedlora_ext.app.intervals.mean_interval`); bytes and epsilon do not
depend on the seed for most methods, so they get their mean and range, as do the seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedlora_ext.app.intervals import mean_interval, t_quantile
from fedlora_ext.app.reporting import (
    accuracy_key,
    figure_saver,
    label_axis,
    metric_name,
    pyplot,
    series,
    summary_row,
)

#: the columns with an interval, and those with a range (summary_row's names)
MEASURED = ("final", "best", "exact match", "personal")
SPREAD = ("MiB up", "MiB down", "epsilon", "seconds")


def seed_row(name: str, per_seed: Sequence[Mapping]) -> dict:
    """One variant over its seeds, from each seed's :func:`summary_row`: ``final`` (the mean),
    ``final_ci95`` (the interval's half-width; None with one seed), ``final_sd`` and ``final_values``, the
    same for ``best`` (and ``exact match``, ``personal`` when present); ``MiB up``, ``MiB down``,
    ``epsilon``, ``seconds`` as the mean with ``<key>_range`` [min, max]."""
    first = per_seed[0]
    row = {"variant": name, "accuracy": first["accuracy"], "metric": first["metric"], "seeds": len(per_seed)}
    for key in MEASURED:
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if key not in first or not values:
            if key in first:
                row[key] = None
            continue
        interval = mean_interval(values)
        one = len(values) == 1  # no spread to estimate: no interval (None, not NaN, in results.json)
        row.update({key: interval.mean, f"{key}_ci95": None if one else interval.half,
                    f"{key}_sd": None if one else interval.sd, f"{key}_values": values})
    for key in SPREAD:
        values = [r[key] for r in per_seed if r.get(key) is not None]
        row[key] = math.fsum(values) / len(values) if values else None
        row[f"{key}_range"] = [min(values), max(values)] if values else None
    return row


def seed_table(rows: Sequence[Mapping]) -> str:
    """The Markdown table of :func:`seed_row` rows: ``0.512 ± 0.034`` for the measured columns, a value
    or a ``min–max`` range for bytes and epsilon, the mean seconds of a run."""
    measured = [key for key in MEASURED if key in rows[0]]
    header = ["variant", "accuracy", "seeds", *[f"{key} (mean ± 95%)" for key in measured], *SPREAD]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], row["accuracy"], str(row["seeds"])]
        cells += [_plus_minus(row.get(key), row.get(f"{key}_ci95")) for key in measured]
        cells += [_range(row[f"{key}_range"]) for key in SPREAD[:-1]]
        cells.append("-" if row["seconds"] is None else f"{row['seconds']:.1f}")  # per run
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plus_minus(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "-"
    if half is None:
        return f"{mean:.3f} ± n/a"
    return f"{mean:.3f} ± {half:.3f}"


def _range(bounds: Sequence[float] | None) -> str:
    if bounds is None:
        return "-"
    low, high = (f"{b:.3f}" if math.isfinite(b) else "inf" for b in bounds)
    return low if low == high else f"{low}–{high}"


def t_note(seeds: int) -> str:
    """``t_{0.975,4} = 2.776``: the factor of the intervals over ``seeds`` values."""
    return f"t_{{0.975,{seeds - 1}}} = {t_quantile(0.975, seeds - 1):.3f}"


def plot_seed_comparison(runs: Mapping[str, Sequence[Sequence[Mapping]]], folder: str | Path) -> list[Path]:
    """The comparison's plots over seeds (each variant's histories, one per seed): ``accuracy.png`` (the
    mean per round with its 95% band), ``final_accuracy.png`` (mean bars with 95% error bars and each
    seed as a dot), ``bytes.png`` (mean bars, error bars over the seeds' range) and, when any run is
    private, ``epsilon.png`` (mean per round with its 95% band)."""
    plt = pyplot()
    save, written = figure_saver(folder)
    names = list(runs)
    keys = {name: accuracy_key(histories[0]) for name, histories in runs.items()}
    shown = keys[names[0]]
    seeds = max(len(h) for h in runs.values())
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    plotted = []
    for name, histories in runs.items():
        plotted += _banded(ax, histories, keys[name], name)
    ax.set(xlabel="round", title=f"mean over {seeds} seeds, 95% band")
    label_axis(ax, shown, plotted)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "accuracy.png")

    rows = [seed_row(name, [summary_row(name, h) for h in runs[name]]) for name in names]
    fig, ax = plt.subplots(figsize=(7.2, 0.8 + 0.4 * len(names)), dpi=100)
    means = [row["final"] for row in rows]
    errors = [row["final_ci95"] or 0.0 for row in rows]
    ax.barh(names, means, xerr=errors, capsize=4, color="tab:blue", alpha=0.8, label="mean, 95% interval")
    for position, row in enumerate(rows):
        ax.plot(row["final_values"], [position] * len(row["final_values"]), "o", color="tab:red", markersize=3,
                zorder=3, label="one seed" if position == 0 else None)
    label_axis(ax, shown, means, axis="x")
    ax.set_xlabel(f"final {metric_name(shown)} (mean over {seeds} seeds, 95% interval)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "final_accuracy.png")

    fig, ax = plt.subplots(figsize=(7.2, 0.8 + 0.45 * len(names)), dpi=100)
    positions = range(len(names))
    for shift, key, label in ((-0.2, "MiB up", "uploaded"), (0.2, "MiB down", "downloaded")):
        mean = [row[key] for row in rows]
        spread = [[m - row[f"{key}_range"][0] for m, row in zip(mean, rows)],
                  [row[f"{key}_range"][1] - m for m, row in zip(mean, rows)]]
        ax.barh([p + shift for p in positions], mean, height=0.4, xerr=spread, capsize=3, label=label)
    ax.set_yticks(list(positions), names)
    ax.set(xlabel=f"MiB over the run (mean over {seeds} seeds, error bars: range)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    save(fig, "bytes.png")

    private = {n: h for n, h in runs.items() if any("epsilon_max" in row for history in h for row in history)}
    if private:
        fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
        for name, histories in private.items():
            _banded(ax, histories, "epsilon_max", name)
        ax.set(xlabel="round", ylabel="epsilon spent (max over clients)", title=f"mean over {seeds} seeds, 95% band")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "epsilon.png")
    return written


def _banded(ax, histories: Sequence[Sequence[Mapping]], key: str, label: str) -> list[float]:
    """The mean of ``key`` per round over the seeds' histories, and its 95% band (where two or more
    seeds have the round); returns the means."""
    by_round: dict[int, list[float]] = {}
    for history in histories:
        for r, value in zip(*series(history, key)):
            by_round.setdefault(r, []).append(value)
    rounds = sorted(by_round)
    intervals = [mean_interval(by_round[r]) for r in rounds]
    means = [i.mean for i in intervals]
    (line,) = ax.plot(rounds, means, marker="o", markersize=3, label=label)
    banded = [(r, i) for r, i in zip(rounds, intervals) if not math.isnan(i.half)]
    if banded:
        ax.fill_between([r for r, _ in banded], [i.low for _, i in banded], [i.high for _, i in banded],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    return means
