"""`--log-file` and `--tensorboard` on `fedlora run`, `compare` and `simulate`: the log holds the whole
job (header, rounds, warnings, summary, privacy report, the error), each line timestamped, and no other
job's lines; TensorBoard event files hold every number of metrics.jsonl per round; both are refused in
one line when they cannot work.

Tiny synthetic runs (`--preset fedit` on tiny-bert), through `python -m fedlora_ext` from tmp_path or
`fedlora_ext.app.cli.main` in-process with every path under tmp_path."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest

from fedlora_ext.app.cli import main
from fedtools import TINY, ctrl_c_after_round, fedlora, one_error_line

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (INFO|WARNING|ERROR) {1,4}")
TENSORBOARD_MISSING = ('fedlora: error: --tensorboard needs the tensorboard package: '
                       'pip install "fedlora_ext[tensorboard]"')


def messages(log: Path, level: str | None = None) -> list[str]:
    """The log's lines without their stamp (of one level), after checking every line has one."""
    lines = log.read_text().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), log.read_text()[-3000:]
    return [STAMP.sub("", line) for line in lines if level is None or STAMP.match(line).group(1) == level]


CLIENT = "fedlora_ext.client: "  # the clients' own lines (training loss, steps), which the console never shows


def job_lines(log: Path) -> list[str]:
    """The job's INFO lines: what the console shows (the clients' own lines left out)."""
    return [line for line in messages(log, "INFO") if not line.startswith(CLIENT)]


def _no_job_handlers() -> bool:
    """No handler of a job's log is left on the library's loggers."""
    return not [h for name in ("fedlora_ext", "fedlora_ext.job") for h in logging.getLogger(name).handlers
                if isinstance(h, logging.FileHandler) or type(h).__name__ == "_LastResort"]


# ---- --log-file ---------------------------------------------------------------------------------
def test_the_log_file_holds_the_whole_run_timestamped(tmp_path):
    (tmp_path / "logs").mkdir()
    args = ["run", *TINY, "--rounds", "2", "--epsilon", "8", "--set", "client_failure_rate=0.5"]
    done = fedlora(*args, "--out", "run", "--log-file", "logs/fedlora.log", cwd=tmp_path)  # relative: to the cwd
    assert done.returncode == 0, done.stderr[-3000:]
    log = tmp_path / "logs" / "fedlora.log"
    info = job_lines(log)
    assert info == done.stdout.splitlines()  # what the console shows, line for line (the header's three ...)
    # the clients' own lines: each training's loss (kept from the server under DP-SGD), steps and offsets
    own = [line for line in messages(log, "INFO") if line.startswith(CLIENT)]
    assert own and all("training loss" in line and "noise offsets" in line for line in own)
    assert "noise offsets" not in done.stdout + done.stderr
    assert info[0].startswith("fedlora run: fedit on synthetic")
    assert [line.split("  ")[0] for line in info if line.startswith("round ")] == ["round 1/2", "round 2/2"]
    assert any(line.startswith("summary: final test accuracy") for line in info)
    assert any(line.startswith("sample-level epsilon") for line in info)  # the privacy report
    warnings = messages(log, "WARNING")  # an injected client failure, from the library's logger
    assert warnings and all(w.startswith("fedlora_ext.") and "client" in w for w in warnings), warnings
    for warning in warnings:  # the console keeps them too
        assert warning.split(": ", 1)[1] in done.stderr
    # appended: a second run into the same file adds its own lines after the first's
    before = log.read_text()
    again = fedlora("simulate", *TINY, "--rounds", "1", "--log-file", "logs/fedlora.log", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    after = log.read_text()
    assert after.startswith(before) and messages(log)[len(before.splitlines())].startswith("fedlora simulate: ")
    assert not (tmp_path / "run" / "run.log").exists()


def test_jobs_in_one_process_log_to_their_own_files_and_errors_are_logged(tmp_path, capsys):
    first, second, failed = tmp_path / "first.log", tmp_path / "second.log", tmp_path / "failed.log"
    assert main(["compare", *TINY, "--rounds", "1", "--methods", "fedit", "ffa_lora", "--dp", "off",
                 "--out", str(tmp_path / "cmp"), "--log-file", str(first)]) == 0
    assert _no_job_handlers()
    text = first.read_text()
    logged = messages(first)
    for name in ("fedit-nodp-a0.5", "ffa_lora-nodp-a0.5"):
        assert f"run {name} ..." in logged
    # each variant's own lines, which the console does not show
    assert sum(line.startswith("fedlora run: ") for line in logged) == 2
    assert sum(line.startswith("round 1/1") for line in logged) == 2
    assert logged[-1].startswith("wrote ") and logged[-1].endswith("results.md")
    assert "round 1/1" not in capsys.readouterr().out

    assert main(["simulate", *TINY, "--rounds", "1", "--out", str(tmp_path / "sim"), "--log-file", str(second)]) == 0
    assert main(["run", *TINY, "--rounds", "1", "--out", str(tmp_path / "plain")]) == 0  # no log file at all
    assert first.read_text() == text  # the later jobs did not write into the first's log
    assert _no_job_handlers()
    sim = messages(second)
    assert sim[0].startswith("fedlora simulate: fedit") and any(line.startswith("round 1/1") for line in sim)
    assert sim[-1].startswith("bytes uploaded ") and not any("fedlora run:" in line for line in sim)

    # a failed run ends its log with the console's error line
    assert main(["run", *TINY, "--rounds", "1", "--model", str(tmp_path / "no-such-model"),
                 "--out", str(tmp_path / "failed"), "--log-file", str(failed)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fedlora: error: ")
    assert messages(failed, "ERROR") == [error]
    assert first.read_text() == text and _no_job_handlers()


def test_the_log_in_the_run_folder_goes_with_overwrite_and_continues_on_resume(tmp_path):
    out = tmp_path / "run"
    log = out / "run.log"  # the run folder does not exist yet: the run creates it
    done = fedlora("run", *TINY, "--rounds", "1", "--out", out, "--log-file", log, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first = messages(log)
    # refused (it holds a run): the refusal is logged, the run left as it was
    refused = fedlora("run", *TINY, "--rounds", "1", "--out", out, "--log-file", log, cwd=tmp_path)
    one_error_line(refused, "already holds a run")
    assert messages(log) == [*first, refused.stderr.strip()]
    # --overwrite: run.log is the old run's, removed with it; the new log starts afresh
    again = fedlora("run", *TINY, "--rounds", "1", "--out", out, "--log-file", log, "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert job_lines(log) == again.stdout.splitlines()
    # the resume of a completed run appends its own lines
    resumed = fedlora("run", "--resume", out, "--quiet", "--log-file", log, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert job_lines(log) == again.stdout.splitlines() + resumed.stdout.splitlines()


def test_a_log_file_in_a_missing_folder_is_one_line(tmp_path):
    for command in ("run", "compare", "simulate"):
        extra = ["--methods", "fedit"] if command == "compare" else []
        done = fedlora(command, *TINY, *extra, "--rounds", "1", "--out", "out", "--log-file", "no/such/dir/run.log",
                       cwd=tmp_path)
        one_error_line(done, "--log-file no/such/dir/run.log", "no folder no/such/dir")
        assert not (tmp_path / "out").exists() and not (tmp_path / "no").exists()
    folder = fedlora("run", *TINY, "--rounds", "1", "--out", "out", "--log-file", ".", cwd=tmp_path)
    one_error_line(folder, "is a folder")


# ---- --tensorboard ------------------------------------------------------------------------------
def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len({s for s, _ in steps}) == len(steps), (tag, steps)  # one value per round
        scalars[tag] = dict(steps)
    return scalars


def _same_as_metrics(run: Path) -> list[dict]:
    """The event files' scalars are metrics.jsonl's numbers, round by round (float32)."""
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run / "tensorboard")
    expected = {}
    for metrics in history:
        for key, value in metrics.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, {})[metrics["round"]] = float(value)
    assert set(scalars) == set(expected), (sorted(scalars), sorted(expected))
    for key, rounds in expected.items():
        assert set(scalars[key]) == set(rounds), key
        for step, value in rounds.items():
            got = scalars[key][step]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-6, abs=1e-6), \
                (key, step, got, value)
    return history


def test_tensorboard_scalars_are_the_metrics_of_each_round(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "2", "--epsilon", "8", "--set", "server_dp_noise_multiplier=0.5",
                 "--out", str(out), "--tensorboard"]) == 0
    history = _same_as_metrics(out)
    assert len(history) == 2
    tags = set(_scalars(out / "tensorboard"))
    assert {"test_accuracy", "epsilon_max", "server_epsilon", "bytes_up", "bytes_down", "seconds"} <= tags
    assert "train_loss" not in tags  # a private client keeps its loss
    # --overwrite removes the old event files with the rest of the run
    assert main(["run", *TINY, "--rounds", "1", "--out", str(out), "--tensorboard", "--overwrite"]) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(_same_as_metrics(out)) == 1
    # simulate writes them too, and compare one folder per variant
    assert main(["simulate", *TINY, "--rounds", "1", "--out", str(tmp_path / "sim"), "--tensorboard"]) == 0
    _same_as_metrics(tmp_path / "sim")
    assert main(["compare", *TINY, "--rounds", "1", "--methods", "fedit", "--dp", "off", "--out",
                 str(tmp_path / "cmp"), "--tensorboard"]) == 0
    _same_as_metrics(tmp_path / "cmp" / "fedit-nodp-a0.5")


def test_a_resumed_run_continues_its_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from fedlora_ext.federated.checkpoint import read_index

    from torch.utils.tensorboard import SummaryWriter

    out, pause = tmp_path / "run", tmp_path / "paused"
    # paused with round 1 checkpointed and round 2 not started
    stopped = ctrl_c_after_round("run", *TINY, "--rounds", "3", "--out", out, "--tensorboard", cwd=tmp_path,
                                 pause=pause)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert read_index(out)["rounds_done"] == 1
    # what a run killed after logging round 2 but before checkpointing it leaves: a step the resume redoes
    with SummaryWriter(log_dir=str(out / "tensorboard")) as stray:
        stray.add_scalar("test_accuracy", 99.0, 2)
    resumed = fedlora("run", "--resume", out, "--quiet", cwd=tmp_path)  # continued without --tensorboard
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3
    history = _same_as_metrics(out)  # steps 1..3, each once (the stray step 2 purged)
    assert [m["round"] for m in history] == [1, 2, 3]


STUB = ("import sys; sys.modules['tensorboard'] = None  # `import tensorboard` raises ImportError\n"
        "from fedlora_ext.app.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("command", ["run", "compare", "simulate"])
def test_tensorboard_without_the_package_is_one_line_before_training(tmp_path, command):
    extra = ["--methods", "fedit"] if command == "compare" else []
    done = fedlora(command, *TINY, *extra, "--rounds", "1", "--out", "out", "--tensorboard", cwd=tmp_path,
                   python=["-c", STUB])
    assert one_error_line(done) == TENSORBOARD_MISSING
    assert done.stdout == "" and not (tmp_path / "out").exists()
    assert not (tmp_path / "runs").exists()


def test_tensorboard_in_process_without_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["run", *TINY, "--rounds", "1", "--tensorboard", "--out", str(tmp_path / "out"),
                 "--log-file", str(tmp_path / "run.log")]) == 2
    assert capsys.readouterr().err.strip() == TENSORBOARD_MISSING
    assert messages(tmp_path / "run.log") == [TENSORBOARD_MISSING]
    assert not (tmp_path / "out").exists()


def test_simulate_tensorboard_needs_a_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    done = fedlora("simulate", *TINY, "--rounds", "1", "--tensorboard", cwd=tmp_path)
    one_error_line(done, "--tensorboard", "--out")
