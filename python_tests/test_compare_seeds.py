"""`fedlora compare --seeds N`: Student-t quantiles against known values, each variant's mean and 95%
interval against a hand computation from its seeds' own summaries, the per-seed folders and their
seeds (DP noise included), N = 1 exactly as before, and one-line errors for bad N."""

from __future__ import annotations

import json
import math

import pytest

from fedlora_ext.app.cli import main
from fedlora_ext.app.compare import Variant, seed_runs
from fedlora_ext.app.intervals import mean_interval, t_quantile, t_two_sided
from fedlora_ext.app.run_folder import foreign_entries
from fedlora_ext.app.seed_report import seed_row, seed_table
from fedlora_ext.federated import FedConfig

#: t_{0.975, df} to 3 decimals, from printed tables
KNOWN_T = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045}
#: t_{0.975,1} and t_{0.975,2} in closed form (df 1 is Cauchy; df 2: P(|T| <= t) = t / sqrt(2 + t^2) = 0.95),
#: and t_{0.975,4} (scipy)
T1 = math.tan(math.pi * 0.475)
T2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
T4 = 2.7764451051977934


@pytest.mark.parametrize("df,value", sorted(KNOWN_T.items()))
def test_t_quantiles_match_the_tables(df, value):
    assert round(t_quantile(0.975, df), 3) == value


def test_t_distribution_closed_forms():
    # df 1 is Cauchy: P(|T| <= 1) = 1/2; df 2: P(|T| <= t) = t / sqrt(2 + t^2)
    assert t_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert t_two_sided(3.0, 2) == pytest.approx(3 / math.sqrt(11), abs=1e-15)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962339, abs=1e-6)  # near the normal's 1.960


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 31), 60, 200]:
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10), (p, df)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="df must be an integer >= 1, got 0"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"p must be in \[0.5, 1\), got 1.0"):
        t_quantile(1.0, 3)


def test_mean_interval_by_hand():
    interval = mean_interval([0.5, 0.6, 0.7])
    # mean 0.6, sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1, half-width t_{0.975,2} 0.1 / sqrt(3)
    assert interval.mean == pytest.approx(0.6) and interval.sd == pytest.approx(0.1)
    assert interval.half == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx((0.6 - interval.half, 0.6 + interval.half))
    assert math.isnan(mean_interval([0.4]).half)


def _summary(final, best, up, eps, seconds):
    return {"variant": "v", "accuracy": "test", "metric": "accuracy", "final": final, "best": best, "personal": None,
            "MiB up": up, "MiB down": 2 * up, "epsilon": eps, "seconds": seconds}


def test_seed_row_and_table_by_hand():
    per_seed = [_summary(0.50, 0.60, 1.5, 8.0, 10.0), _summary(0.70, 0.75, 1.5, 8.0, 12.0),
                _summary(0.60, 0.72, 1.6, 7.5, 14.0), _summary(0.64, 0.65, 1.5, 8.0, 16.0),
                _summary(0.56, 0.68, 1.5, 8.0, 18.0)]
    row = seed_row("v", per_seed)
    finals = [0.50, 0.70, 0.60, 0.64, 0.56]
    mean = sum(finals) / 5
    sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / 4)
    assert row["seeds"] == 5 and row["final"] == pytest.approx(0.6) and row["final_sd"] == pytest.approx(sd)
    assert row["final_ci95"] == pytest.approx(T4 * sd / math.sqrt(5), rel=1e-12)
    assert row["final_values"] == finals and row["best"] == pytest.approx(0.68)
    assert row["personal"] is None and "personal_ci95" not in row
    assert row["MiB up_range"] == [1.5, 1.6] and row["MiB down_range"] == [3.0, 3.2]
    assert row["epsilon_range"] == [7.5, 8.0] and row["seconds"] == pytest.approx(14.0)
    table = seed_table([row, seed_row("w", per_seed[:1])])
    lines = table.splitlines()
    assert lines[0] == ("| variant | accuracy | seeds | final (mean ± 95%) | best (mean ± 95%) | personal (mean ± 95%) "
                        "| MiB up | MiB down | epsilon | seconds |")
    # bests 0.60 0.75 0.72 0.65 0.68: mean 0.68, sd sqrt((.0064 + .0049 + .0016 + .0009 + 0) / 4)
    half, best_half = T4 * sd / math.sqrt(5), T4 * math.sqrt(0.0138 / 4) / math.sqrt(5)
    assert f"{best_half:.3f}" == "0.073"
    assert lines[2] == f"| v | test | 5 | 0.600 ± {half:.3f} | 0.680 ± {best_half:.3f} | - | 1.500–1.600 | 3.000–3.200 | 7.500–8.000 | 14.0 |"
    assert lines[3] == "| w | test | 1 | 0.500 ± n/a | 0.600 ± n/a | - | 1.500 | 3.000 | 8.000 | 10.0 |"


def test_seed_runs_seed_each_run_and_its_noise():
    private = Variant("p", FedConfig(dp_epsilon=8.0, seed=3))
    runs = seed_runs(private, 3)
    assert [folder for folder, _ in runs] == ["p/seed3", "p/seed4", "p/seed5"]
    assert [(c.seed, c.dp_noise_seed) for _, c in runs] == [(3, 3), (4, 4), (5, 5)]
    chosen = seed_runs(Variant("q", FedConfig(dp_epsilon=8.0, dp_noise_seed=100)), 2)
    assert [(c.seed, c.dp_noise_seed) for _, c in chosen] == [(0, 100), (1, 101)]
    plain = seed_runs(Variant("r", FedConfig(seed=1)), 2)
    assert [(c.seed, c.dp_noise_seed) for _, c in plain] == [(1, None), (2, None)]
    assert seed_runs(private, 1) == [("p", private.config)]  # one seed: the variant as it is


TINY = ["--model", "tiny-bert", "--dataset", "synthetic", "--clients", "2", "--rounds", "2", "--local-steps", "1",
        "--quiet"]


def _history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_compare_over_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "fedit", "--dp", "on", "off", "--seed", "7", "--seeds", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run fedit-eps8-a0.5 seed 8 ..." in printed and "fedit-nodp-a0.5 over 2 seeds: final" in printed
    assert json.loads((out / "compare.json").read_text())["seeds"] == [7, 8]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [7, 8] and [r["variant"] for r in results["rows"]] == ["fedit-nodp-a0.5",
                                                                                      "fedit-eps8-a0.5"]
    for row in results["rows"]:
        folders = [out / row["variant"] / f"seed{k}" for k in (7, 8)]
        configs = [json.loads((f / "config.json").read_text()) for f in folders]
        assert [c["seed"] for c in configs] == [7, 8]
        private = row["variant"].startswith("fedit-eps")
        assert [c["dp_noise_seed"] for c in configs] == ([7, 8] if private else [None] * 2)
        # by hand from each seed's own summary.json and metrics.jsonl
        summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
        assert all(s["status"] == "completed" for s in summaries)
        finals = [s["final"] for s in summaries]
        mean, sd = sum(finals) / 2, abs(finals[0] - finals[1]) / math.sqrt(2)
        assert row["final_values"] == finals and row["final"] == pytest.approx(mean, abs=1e-12)
        assert row["final_ci95"] == pytest.approx(T1 * sd / math.sqrt(2), abs=1e-12)
        bests = [max(r["test_accuracy"] for r in _history(f)) for f in folders]
        assert row["best_values"] == bests
        ups = [sum(r["bytes_up"] for r in _history(f)) / 2**20 for f in folders]
        assert row["MiB up_range"] == [min(ups), max(ups)]
        assert (row["epsilon_range"] is not None) == private
    table = (out / "results.md").read_text()
    assert "t_{0.975,1} = 12.706" in table and "| fedit-eps8-a0.5/seed8 |" in table
    assert f"| fedit-nodp-a0.5 | test | 2 | {results['rows'][0]['final']:.3f} ± " in table
    for plot in ("accuracy.png", "final_accuracy.png", "bytes.png", "epsilon.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the folder is a comparison's, nothing foreign: --overwrite may replace it, a plain re-run may not
    assert foreign_entries(out) == []
    (out / "fedit-nodp-a0.5" / "notes.txt").write_text("mine")
    assert foreign_entries(out) == ["fedit-nodp-a0.5"]
    (out / "fedit-nodp-a0.5" / "notes.txt").unlink()
    assert main(["compare", *TINY, "--methods", "fedit", "--dp", "off", "--seeds", "2", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_one_seed_writes_what_compare_always_wrote(tmp_path, capsys):
    """--seeds 1 is the default and changes nothing: one folder per variant, the same table and files."""
    plain, one = tmp_path / "plain", tmp_path / "one"
    flags = [*TINY, "--methods", "fedit", "ffa_lora", "--dp", "off"]
    assert main(["compare", *flags, "--out", str(plain)]) == 0
    assert main(["compare", *flags, "--seeds", "1", "--out", str(one)]) == 0
    for out in (plain, one):
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fedit-nodp-a0.5", "ffa_lora-nodp-a0.5"]
        assert (out / "fedit-nodp-a0.5" / "metrics.jsonl").exists()
        assert set(json.loads((out / "compare.json").read_text())) == {"base", "variants"}
        assert set(json.loads((out / "results.json").read_text())) == {"rows", "skipped", "failed", "accuracy_key"}
        lines = (out / "results.md").read_text().splitlines()
        assert lines[4] == "| variant | accuracy | metric | final | best | personal | MiB up | MiB down | epsilon | seconds |"

    def without_time(out):
        rows = json.loads((out / "results.json").read_text())["rows"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_time(plain) == without_time(one)


@pytest.mark.parametrize("value", ["0", "-1", "two", "2.5", ""])
def test_bad_seed_counts_are_one_line(value, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "fedit", "--seeds", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedlora: error: --seeds must be a whole number >= 1 (the seeds each variant runs with), "
                   f"got {value!r}"]
    assert not out.exists()
