"""Run folders from the command line: a folder holding a run is never written over without
--overwrite (which leaves nothing of the old run), a lock stops a second run on a folder in use,
default names never collide, Ctrl-C ends a run with one line and a whole checkpoint, `fedlora status`
tells how a run stands, and a Flower run's config error lands in its summary.json.

Tiny synthetic runs (`--preset fedit` on tiny-bert) through `python -m fedlora_ext`, from tmp_path (the
checkout's fedlora_ext/ without _C would shadow the installed one)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from fedlora_ext.errors import RunError
from fedlora_ext.app.run_folder import LOCK, RunLock, claim, lock_holder, new_run_folder, run_status
from fedtools import TINY, cli_env, ctrl_c_after_round, fedlora, finish, one_error_line, start_fedlora
from pausing import paused, wait_for_pause


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) by its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed two-round run; tests copy or only read it."""
    root = tmp_path_factory.mktemp("finished")
    done = fedlora("run", *TINY, "--rounds", "2", "--out", root / "run", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


# ---- refusing and replacing a run ---------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_and_left_untouched(finished, tmp_path):
    before = snapshot(finished)
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert not (finished / LOCK).exists()  # released on a normal exit
    for command in ("run", "simulate", "compare"):
        extra = ["--methods", "fedit"] if command == "compare" else []
        line = one_error_line(fedlora(command, *TINY, *extra, "--rounds", "2", "--out", finished, cwd=tmp_path),
                              str(finished), "already holds a run", "--overwrite")
        assert "Traceback" not in line
    assert snapshot(finished) == before


def test_overwrite_leaves_nothing_of_a_private_run(tmp_path):
    out = tmp_path / "run"
    done = fedlora("run", *TINY, "--rounds", "2", "--epsilon", "8", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "privacy.json").exists() and (out / "keys").is_dir()
    (out / ".adapter.safetensors.tmp").write_bytes(b"half a file")  # what a crash mid-write leaves
    done = fedlora("run", *TINY, "--rounds", "1", "--out", out, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = fedlora("run", *TINY, "--rounds", "1", "--out", tmp_path / "fresh", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    names = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert names == {str(p.relative_to(tmp_path / "fresh")) for p in (tmp_path / "fresh").rglob("*")}, names
    assert not names & {"privacy.json", "keys", ".adapter.safetensors.tmp", "checkpoint-00002.safetensors"}
    assert json.loads((out / "config.json").read_text())["dp_epsilon"] is None
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["epsilon"] is None


def test_a_folder_of_other_files_is_never_taken_nor_emptied(finished, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "data").mkdir()
    (other / "data" / "x.csv").write_text("a,b\n")
    mixed = tmp_path / "mixed"  # a run plus a file fedlora did not write
    mixed.mkdir()
    shutil.copytree(finished, mixed, dirs_exist_ok=True)
    (mixed / "notes.txt").write_text("mine too")
    before = {folder: snapshot(folder) for folder in (other, mixed)}
    one_error_line(fedlora("run", *TINY, "--rounds", "1", "--out", other, "--overwrite", cwd=tmp_path),
                   str(other), "notes.txt", "not a fedlora run")
    one_error_line(fedlora("run", *TINY, "--rounds", "1", "--out", mixed, "--overwrite", cwd=tmp_path),
                   str(mixed), "notes.txt")
    for folder, files in before.items():
        assert snapshot(folder) == files and not (folder / LOCK).exists()


def test_claim_rules(finished, tmp_path):
    """In process: new and empty folders are taken; a stale lock file does not block; a run that failed
    before its first round leaves a folder a new run may take; a file is not a folder."""
    with claim(tmp_path / "new" / "deeper") as lock:
        assert lock.held and lock_holder(tmp_path / "new" / "deeper")["pid"] == os.getpid()
    assert not (tmp_path / "new" / "deeper" / LOCK).exists() and lock_holder(tmp_path / "new" / "deeper") is None
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
    assert lock_holder(stale) is None
    with claim(stale):
        assert json.loads((stale / LOCK).read_text())["pid"] == os.getpid()
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad model"}))
    (failed / "config.json").write_text("{}")
    with claim(failed):
        assert [p.name for p in failed.iterdir()] == [LOCK]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a folder"):
        claim(tmp_path / "file")
    # a refused claim leaves a stale lock exactly as found
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(finished, copy, dirs_exist_ok=True)
    (copy / LOCK).write_text("stale")
    before = snapshot(copy)
    with pytest.raises(RunError, match="already holds a run"):
        claim(copy)
    assert snapshot(copy) == before


# ---- concurrent runs ----------------------------------------------------------------------------
def test_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    out, pause = tmp_path / "run", tmp_path / "paused"
    first = start_fedlora("run", *TINY, "--rounds", "2", "--out", out, cwd=tmp_path, env=paused(cli_env(), 1, pause))
    try:
        wait_for_pause(pause, first)  # the first run holds the folder until the pause ends
        holder = f"pid {first.pid} on "
        second = [start_fedlora("run", *TINY, "--rounds", "1", "--out", out, cwd=tmp_path),
                  start_fedlora("run", "--resume", out, "--quiet", cwd=tmp_path)]
        for process in second:
            one_error_line(finish(process), str(out), "in use", holder)
        pause.unlink()  # the first run goes on
        done = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2/2" in done.stdout and json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not (out / LOCK).exists()


def test_the_lock_is_exclusive_between_processes(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held
        lock.record()
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            message = pool.apply(_try_lock, (str(tmp_path),))
        assert "in use by another run" in message and f"pid {os.getpid()}" in message
    with context.Pool(1) as pool:
        assert pool.apply(_try_lock, (str(tmp_path),)) == "taken"


def _try_lock(folder: str) -> str:
    try:
        with RunLock(folder):
            return "taken"
    except RunError as error:
        return str(error)


def _new_folder(args) -> str:
    parent, now = args
    return str(new_run_folder(parent, "fedit", now=now))


def test_default_run_folders_never_collide(tmp_path):
    now = time.mktime((2026, 11, 22, 6, 15, 0, 0, 0, -1))
    names = [new_run_folder(tmp_path / "runs", "fedit", now=now).name for _ in range(3)]
    assert names == ["fedit-20261122-061500", "fedit-20261122-061500-2", "fedit-20261122-061500-3"]
    with multiprocessing.get_context("fork").Pool(4) as pool:  # racing processes, the same second
        made = pool.map(_new_folder, [(str(tmp_path / "race"), now)] * 12)
    assert len(set(made)) == 12 and all(Path(m).is_dir() for m in made)


# ---- Ctrl-C -------------------------------------------------------------------------------------
def test_ctrl_c_leaves_a_whole_checkpoint_and_one_line(tmp_path):
    from fedlora_ext.federated.checkpoint import read_run

    out, pause = tmp_path / "run", tmp_path / "paused"
    # paused between rounds 1 and 2, where a Ctrl-C finds a run
    stopped = ctrl_c_after_round("run", *TINY, "--rounds", "3", "--out", out, cwd=tmp_path, pause=pause)
    done = read_run(out).rounds_done  # whole: every file matches the index's SHA-256
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert done == 1
    assert stopped.stderr.strip().splitlines() == [f"fedlora: interrupted after round {done}; continue with: "
                                                   f"fedlora run --resume {out}"], stopped.stderr[-3000:]
    assert not (out / LOCK).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_done"] == done
    assert run_status(out) == f"{out}: interrupted after round {done}/3 (continue with fedlora run --resume {out})"
    with pytest.raises(RunError, match=f"continue it with `fedlora run --resume {out}`"):
        claim(out)
    resumed = fedlora("run", "--resume", out, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after round {done} of 3" in resumed.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# ---- fedlora status -----------------------------------------------------------------------------
def test_status_of_completed_failed_and_other_folders(finished, tmp_path):
    done = fedlora("status", finished, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"{finished}: completed 2/2 rounds, final test accuracy ")
    failed = tmp_path / "failed"
    bad = fedlora("run", *TINY, "--rounds", "1", "--model", "./no/such/model", "--out", failed, cwd=tmp_path)
    one_error_line(bad, "does not exist")
    assert json.loads((failed / "summary.json").read_text())["status"] == "failed"
    line = run_status(failed)
    assert line.startswith(f"{failed}: failed: ") and "model folder './no/such/model' does not exist" in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(fedlora("status", empty, cwd=tmp_path), str(empty), "holds no run")
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no run"):
        run_status(empty)
    with pytest.raises(ValueError, match="is not a folder"):
        run_status(tmp_path / "nowhere")
    # a run that failed before its first round: the folder is taken again without --overwrite
    again = fedlora("run", *TINY, "--rounds", "1", "--out", failed, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_status(failed).startswith(f"{failed}: completed 1/1 rounds")


def test_status_of_a_running_folder(tmp_path):
    with claim(tmp_path / "busy"):
        line = run_status(tmp_path / "busy")
    assert line.startswith(f"{tmp_path / 'busy'}: running (pid {os.getpid()} on ")


# ---- Flower -------------------------------------------------------------------------------------
def test_flower_config_errors_land_in_summary_json(finished, tmp_path):
    pytest.importorskip("flwr")
    from fedlora_ext.flower.server_app import out_dir_of, run_server

    assert out_dir_of({"out-dir": "", "out_dir": "x"}) == "x" and out_dir_of({"out-dir": "none"}) is None
    out = tmp_path / "flower"
    for run_config, message in [({"preset": "nonsense"}, "unknown preset 'nonsense'"),
                                ({"no-such-key": 1}, "no_such_key"),
                                ({"rank": 0}, "rank must be >= 1")]:
        with pytest.raises(ValueError):
            run_server(None, {**run_config, "out-dir": str(out)})
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "failed" and message in summary["error"], summary
        assert summary["run_folder"] == str(out) and not (out / LOCK).exists()
        assert run_status(out).startswith(f"{out}: failed: ValueError: ")
    before = snapshot(finished)  # a folder holding another run is refused, untouched
    with pytest.raises(RunError, match="already holds a run"):
        run_server(None, {"preset": "nonsense", "out-dir": str(finished)})
    assert snapshot(finished) == before


def test_flower_run_writes_the_summary_and_plot_of_fedlora_run(finished, tmp_path):
    pytest.importorskip("flwr")
    from flowertools import InMemoryGrid

    from fedlora_ext.flower.client_app import app as client_app
    from fedlora_ext.flower.server_app import run_server

    out = tmp_path / "flower"
    nodes = {1000 + 7 * cid: {"partition-id": cid, "num-partitions": 3} for cid in range(3)}
    run_config = {"preset": "fedit", "model": "tiny-bert", "dataset": "synthetic", "num-clients": 3, "rounds": 2,
                  "local-steps": 1, "num-examples": 48, "seq-len": 16, "batch-size": 16, "out-dir": str(out),
                  "round-timeout": 60.0}
    summary = run_server(InMemoryGrid(client_app, nodes), run_config)
    ours = json.loads((out / "summary.json").read_text())
    theirs = json.loads((finished / "summary.json").read_text())
    assert ours.keys() == theirs.keys() and ours["status"] == "completed" and ours["rounds"] == 2, ours
    assert summary["final"] == ours["final"] and 0 <= ours["final"] <= 1
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / LOCK).exists()
    assert run_status(out).startswith(f"{out}: completed 2/2 rounds")
