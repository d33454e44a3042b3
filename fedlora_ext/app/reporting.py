"""Run reports: PNG plots of a run or a comparison, and Markdown tables (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


#: headline metrics, first present wins: accuracy (classification), perplexity (causal LM and SFT, whose
#: exact match stays near 0 long after perplexity moves); the server's model before clients' own
HEADLINES = ("test_accuracy", "personal_accuracy", "test_perplexity", "personal_perplexity")


def accuracy_key(history: Sequence[Mapping]) -> str:
    """The run's headline metric: ``test_accuracy`` for methods with a global model, ``personal_accuracy``
    otherwise (FedSA); a language model's (causal LM, SFT) perplexity."""
    return next((k for k in HEADLINES if any(k in row for row in history)), "test_accuracy")


def higher_is_better(key: str) -> bool:
    return not key.endswith("perplexity")


def metric_name(key: str) -> str:
    """``accuracy``, ``exact match`` or ``perplexity`` for a headline key."""
    return key.split("_", 1)[1].replace("_", " ")


def label_axis(ax, key: str, values: Sequence[float], axis: str = "y") -> None:
    """Bounded metrics on [0, 1]; perplexity on a log scale."""
    getattr(ax, f"set_{axis}label")(metric_name(key))
    if higher_is_better(key):
        getattr(ax, f"set_{axis}lim")(0, 1)
    elif values and min(values) > 0:
        getattr(ax, f"set_{axis}scale")("log")


def series(history: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    rows = [(row["round"], row[key]) for row in history if row.get(key) is not None]
    return [r for r, _ in rows], [v for _, v in rows]


def plot_run(history: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Accuracy (left axis) and epsilon spent (right axis, if the run is private) per round."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    key = accuracy_key(history)
    rounds, acc = series(history, key)
    examples = next((row["test_examples"] for row in history if key.startswith("test_") and "test_examples" in row), None)
    ax.plot(rounds, acc, marker="o", color="tab:blue",
            label=key.replace("_", " ") + (f" ({examples} fixed examples)" if examples else ""))
    whole = [(row["round"], row[f"final_{key}"], row["final_test_examples"]) for row in history if f"final_{key}" in row]
    for r, value, n in whole:  # the whole test split, scored once at the end: apart from the rounds' line
        ax.plot([r], [value], marker="*", markersize=12, linestyle="none", color="tab:green",
                label=f"{metric_name(key)} on the whole test split ({n})")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    label_axis(ax, key, acc)
    ax.yaxis.label.set_color("tab:blue")
    rounds_eps, eps = series(history, "epsilon_max")
    if eps:
        right = ax.twinx()
        right.plot(rounds_eps, eps, marker="s", color="tab:red", label="epsilon (max over clients)")
        right.set_ylabel("epsilon spent", color="tab:red")
        right.set_ylim(0, max(eps) * 1.1 if math.isfinite(max(eps)) and max(eps) > 0 else 1)
    ax.set_title(title or "federated run")
    if whole:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def figure_saver(folder: str | Path):
    """``save(fig, name)``, which writes a figure to ``folder/name`` and closes it, and the list of the
    paths it wrote."""
    plt, folder, written = pyplot(), Path(folder), []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)

    return save, written


def plot_comparison(runs: Mapping[str, Sequence[Mapping]], folder: str | Path) -> list[Path]:
    """``accuracy.png`` (per round), ``final_accuracy.png``, ``bytes.png`` (up / down) and, when any run
    is private, ``epsilon.png``, one line or bar per variant."""
    plt = pyplot()
    save, written = figure_saver(folder)
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    keys = {name: accuracy_key(history) for name, history in runs.items()}
    shown = next(iter(keys.values()), "test_accuracy")
    for name, history in runs.items():
        ax.plot(*series(history, keys[name]), marker="o", markersize=3, label=name)
    ax.set(xlabel="round")
    label_axis(ax, shown, [v for name, h in runs.items() for v in series(h, keys[name])[1]])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "accuracy.png")

    names = list(runs)
    fig, ax = plt.subplots(figsize=(7.2, 0.5 + 0.35 * len(names)), dpi=100)
    finals = [(series(runs[n], keys[n])[1] or [0.0])[-1] for n in names]
    ax.barh(names, finals, color="tab:blue")
    label_axis(ax, shown, finals, axis="x")
    ax.set_xlabel("final " + metric_name(shown))
    ax.invert_yaxis()
    save(fig, "final_accuracy.png")

    fig, ax = plt.subplots(figsize=(7.2, 0.5 + 0.45 * len(names)), dpi=100)
    up = [sum(row["bytes_up"] for row in runs[n]) / 2**20 for n in names]
    down = [sum(row["bytes_down"] for row in runs[n]) / 2**20 for n in names]
    positions = range(len(names))
    ax.barh([p - 0.2 for p in positions], up, height=0.4, label="uploaded")
    ax.barh([p + 0.2 for p in positions], down, height=0.4, label="downloaded")
    ax.set_yticks(list(positions), names)
    ax.set(xlabel="MiB over the run")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    save(fig, "bytes.png")

    private = {n: h for n, h in runs.items() if any("epsilon_max" in row for row in h)}
    if private:
        fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
        for name, history in private.items():
            ax.plot(*series(history, "epsilon_max"), marker="o", markersize=3, label=name)
        ax.set(xlabel="round", ylabel="epsilon spent (max over clients)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "epsilon.png")
    return written


def summary_row(name: str, history: Sequence[Mapping]) -> dict:
    """One line of a comparison: the final headline metric (accuracy, or perplexity; on the whole test
    split when the rounds were scored on a fixed subset: ``final_<key>``), the best round's (on the
    rounds' own examples, so every round compares like with like; the lowest perplexity), an SFT run's
    exact match, bytes, epsilon, seconds."""
    key = accuracy_key(history)
    acc = series(history, key)[1]
    last = history[-1] if history else {}
    if key.startswith("personal_"):  # rounds that scored only their participants are not comparable
        acc = series([row for row in history if row.get("personal_scope", "all") == "all"], key)[1] or acc
    best = max if higher_is_better(key) else min
    eps = [row["epsilon_max"] for row in history if "epsilon_max" in row]
    personal = series(history, "personal_accuracy")[1]
    return {
        "variant": name,
        "accuracy": key.split("_", 1)[0],  # test (the server's model) or personal (clients' own)
        "metric": metric_name(key),
        "final": last.get(f"final_{key}", acc[-1] if acc else float("nan")),
        "best": best(acc) if acc else float("nan"),
        **_exact_match(key, history),
        "personal": personal[-1] if personal else None,
        "MiB up": sum(row["bytes_up"] for row in history) / 2**20,
        "MiB down": sum(row["bytes_down"] for row in history) / 2**20,
        "epsilon": eps[-1] if eps else None,
        "seconds": sum(row["seconds"] for row in history),
    }


def examples_scored(history: list[dict]) -> dict:
    """How many test examples the rounds were scored on (``round_examples``, the same every round) and
    the final score (``final_examples``: the whole split after the last round)."""
    last = history[-1] if history else {}
    if "test_examples" not in last:
        return {}
    return {"round_examples": last["test_examples"], "final_examples": last.get("final_test_examples", last["test_examples"])}


def _exact_match(key: str, history: Sequence[Mapping]) -> dict:
    """``{"exact match": final}`` for an SFT run with short answers, else nothing."""
    exact = key.split("_", 1)[0] + "_exact_match"
    values = series(history, exact)[1]
    if not values:
        return {}
    return {"exact match": history[-1].get(f"final_{exact}", values[-1])}


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table of dicts with the same keys (floats to 3 decimals, None as a dash)."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return "inf" if math.isinf(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
