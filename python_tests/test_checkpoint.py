"""Checkpoints stored per client: a round writes the global state and the clients it changed, a crash
at any point of a save leaves the previous round whole, resume stays bitwise equal, and export and
evaluate read a checkpoint through the same reader (``read_run``) as resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedtools import one_thread, small_config  # noqa: F401 (one_thread: autouse, one intra-op thread)
from safetensors.torch import load_file, save_file

from fedlora_ext.federated import Simulation
from fedlora_ext.federated import checkpoint as ckpt
from fedlora_ext.federated.checkpoint import FOLDER, INDEX, client_entries, read_index, read_run


def fedsa(tmp_path, **changes):
    """FedSA-LoRA (each client keeps its own B) over 6 clients, 2 sampled per round, private: every
    client that trains changes its tensors and its account, the others nothing."""
    values = dict(num_clients=6, participation=1 / 3, rounds=4, local_steps=1, dp_epsilon=8.0, dp_noise_seed=7,
                  out_dir=str(tmp_path))
    return small_config("fedsa_lora", **{**values, **changes})


def uninterrupted(run_dir):
    torch.manual_seed(0)
    Simulation(fedsa(run_dir)).run(progress=False)
    return run_dir


def checkpointed(run_dir, rounds: int) -> Simulation:
    """The same run, stepped and checkpointed by hand for ``rounds`` rounds (so a test can cut in)."""
    torch.manual_seed(0)
    sim = Simulation(fedsa(run_dir))
    run_dir.mkdir(exist_ok=True)
    for round_index in range(rounds):
        sim.step(round_index)
        sim.save_checkpoint(round_index + 1, run_dir)
    return sim


def files(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / FOLDER).iterdir())}


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("seconds")} for m in history]


def assert_same_state(a, b) -> None:
    assert a.rounds_done == b.rounds_done and timeless(a.history) == timeless(b.history) and a.ledger == b.ledger
    assert a.state.tensors.keys() == b.state.tensors.keys()
    assert all(torch.equal(a.state.tensors[n], b.state.tensors[n]) for n in a.state.tensors)
    assert [(c.cid, c.rank, sorted(c.tensors), c.info) for c in a.clients] == \
           [(c.cid, c.rank, sorted(c.tensors), c.info) for c in b.clients]
    for x, y in zip(a.clients, b.clients):
        assert all(torch.equal(x.tensors[n], y.tensors[n]) for n in x.tensors)
        assert (x.privacy is None) == (y.privacy is None)
        if x.privacy is not None:
            assert x.privacy.account.history == y.privacy.account.history
            assert x.privacy.noise.offset == y.privacy.noise.offset and x.privacy.noise.seed == y.privacy.noise.seed


def test_a_round_writes_the_global_state_and_only_the_clients_it_changed(tmp_path):
    torch.manual_seed(0)
    sim = Simulation(fedsa(tmp_path))
    sim.step(0)
    sim.save_checkpoint(1, tmp_path)
    first = files(tmp_path)
    assert sorted(first) == sorted(["global-00001.safetensors"] + [f"client-{c}-00001.safetensors" for c in range(6)])
    for round_index in (1, 2):
        sampled = {c.cid for c in sim.participants(round_index)}
        sim.step(round_index)
        sim.save_checkpoint(round_index + 1, tmp_path)
        now = files(tmp_path)
        tag = f"{round_index + 1:05d}"
        new = {n for n in now if n not in first}
        assert new == {f"global-{tag}.safetensors"} | {f"client-{c}-{tag}.safetensors" for c in sampled}, new
        assert len(sampled) == 2 and len(now) == 7  # one file per client, the replaced ones removed
        assert all(now[n] == first[n] for n in now if n in first)  # the others untouched, byte for byte
        first = now
    index = read_index(tmp_path)
    assert {e["cid"]: f"client-{e['cid']}-{e['round']:05d}.safetensors" for e in client_entries(index)} == \
           {int(n.split("-")[1]): n for n in first if n.startswith("client-")}
    mirror = ckpt.RunState(3, {}, sim.state, sim.clients, None, sim.ledger.rounds, sim.history)
    assert_same_state(read_run(tmp_path, keys=True), mirror)


@pytest.mark.parametrize("method, changes", [
    ("fedsa_lora", {"dp_epsilon": 8.0, "dp_noise_seed": 7}), ("hetlora", {"client_ranks": (4, 2, 2, 1, 1, 1)}),
    ("lora_a2", {}), ("flora", {"client_ranks": (4, 2, 2, 1, 1, 1)}), ("fedex_lora", {}), ("standalone", {}),
    ("rolora", {}), ("fed_sb", {"dp_epsilon": 8.0, "dp_noise_seed": 7}),
    ("scaffold", {"dp_epsilon": 8.0, "dp_noise_seed": 7}),
    ("flexlora", {"client_ranks": (4, 2, 2, 1, 1, 1)}), ("fedsvd", {"svd_period": 1}),
    ("fedit", {"personal_eval": True, "server_dp_noise_multiplier": 0.5})])
def test_the_clients_a_round_samples_are_all_it_changes(tmp_path, method, changes):
    """The simulation tells the writer which clients a round may have changed (those it sampled), and
    the writer looks at no other: every method must change no client it did not sample, which
    ``unsaved`` (a look at every client) checks after each save."""
    torch.manual_seed(0)
    sim = Simulation(small_config(method, num_clients=6, participation=1 / 3, rounds=3, local_steps=1,
                                  out_dir=str(tmp_path), **changes))
    for round_index in range(3):
        sim.step(round_index)
        sim.save_checkpoint(round_index + 1, tmp_path)
        assert sim._checkpoints.unsaved(sim.run_state(round_index + 1)) == [], (method, round_index)
    assert_same_state(read_run(tmp_path, keys=True), ckpt.RunState(3, {}, sim.state, sim.clients, None,
                                                                    sim.ledger.rounds, sim.history))


def test_clients_without_state_get_no_file(tmp_path):
    """Non-private FedIT keeps only the round a client last trained in: a client not sampled yet has no
    state, so the index alone holds it (rank, example count)."""
    torch.manual_seed(0)
    sim = Simulation(small_config("fedit", out_dir=str(tmp_path), num_clients=6, participation=1 / 3, rounds=1))
    sampled = {c.cid for c in sim.participants(0)}
    sim.step(0)
    sim.save_checkpoint(1, tmp_path)
    assert sorted(files(tmp_path)) == sorted(["global-00001.safetensors",
                                              *(f"client-{c}-00001.safetensors" for c in sampled)])
    run = read_run(tmp_path)
    assert [(c.cid, c.rank, c.num_examples, c.tensors, c.info) for c in run.clients] == \
           [(c.cid, c.rank, c.num_examples, {}, c.info) for c in sim.clients]
    assert [c.info for c in run.clients if c.cid not in sampled] == [{}] * 4


class Crash(BaseException):
    """A kill at a chosen point of a save (BaseException: nothing on the way catches it)."""


def crash_after(monkeypatch, files_whole: int, partial: bool) -> None:
    """Makes the next save die after ``files_whole`` tensor files are in place, either between files or
    (``partial``) halfway through writing the next one's temporary file."""
    written = [0]
    real = ckpt.save_file

    def save(tensors, path, metadata=None):
        if written[0] == files_whole:
            if partial:
                real(tensors, path, metadata=metadata)
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
            raise Crash
        written[0] += 1
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save)


def crash_before_index(monkeypatch) -> None:
    def write_atomic(path, data, mode=0o644):
        if path.name == INDEX:
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(data[: len(data) // 2])  # half the new index, never renamed
            raise Crash
        real(path, data, mode)

    real = ckpt.write_atomic
    monkeypatch.setattr(ckpt, "write_atomic", write_atomic)


@pytest.mark.parametrize("point", ["global file halfway", "after the global file", "after one client file",
                                   "halfway through the second client file", "before the index is renamed"])
def test_a_crash_during_a_save_leaves_the_previous_round_whole_and_resume_exact(tmp_path, monkeypatch, point):
    whole, cut = uninterrupted(tmp_path / "whole"), tmp_path / "cut"
    sim = checkpointed(cut, rounds=2)
    state = read_run(cut, keys=True)
    sim.step(2)
    with monkeypatch.context() as patch:
        if point == "before the index is renamed":
            crash_before_index(patch)
        else:
            whole_files = {"global file halfway": 0, "after the global file": 1, "after one client file": 2,
                           "halfway through the second client file": 2}[point]
            crash_after(patch, whole_files, partial="halfway" in point)
        with pytest.raises(Crash):
            sim.save_checkpoint(3, cut)
    assert read_index(cut)["rounds_done"] == 2
    assert_same_state(read_run(cut, keys=True), state)  # every file the index names is whole
    resumed = Simulation.resume(cut)  # the leftovers of the crash are swept by its first save
    resumed.run(progress=False)
    assert load_file(str(cut / "adapter.safetensors")).keys() == load_file(str(whole / "adapter.safetensors")).keys()
    for name, tensor in load_file(str(whole / "adapter.safetensors")).items():
        assert torch.equal(tensor, load_file(str(cut / "adapter.safetensors"))[name]), name
    assert_same_state(read_run(cut, keys=True), read_run(whole, keys=True))
    assert sorted(files(cut)) == sorted(files(whole)) and not list(cut.glob(".*.tmp"))


KILLED_MID_SAVE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint import checkpointed
from fedlora_ext.federated import checkpoint as ckpt
sim = checkpointed(Path({cut!r}), rounds=2)
sim.step(2)
real, written = ckpt.save_file, []
def save(tensors, path, metadata=None):
    if len(written) == 2:  # the global file and one client's are in place
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(path)
    real(tensors, path, metadata=metadata)
ckpt.save_file = save
sim.save_checkpoint(3, Path({cut!r}))
"""


def test_a_process_killed_between_files_leaves_the_previous_round_whole(tmp_path):
    """The same as above with a real SIGKILL of the saving process, not an exception."""
    whole, cut = uninterrupted(tmp_path / "whole"), tmp_path / "cut"
    code = KILLED_MID_SAVE.format(tests=str(Path(__file__).parent), cut=str(cut))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # outside the checkout
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert read_index(cut)["rounds_done"] == 2 and len(files(cut)) == 7 + 2  # the index's 7, and the 2 new
    resumed = Simulation.resume(cut)
    resumed.run(progress=False)
    assert_same_state(read_run(cut, keys=True), read_run(whole, keys=True))
    assert sorted(files(cut)) == sorted(files(whole))


def test_the_first_save_after_resume_writes_only_what_changed(tmp_path):
    checkpointed(tmp_path, rounds=2)
    kept = files(tmp_path)
    resumed = Simulation.resume(tmp_path)
    sampled = {c.cid for c in resumed.participants(2)}
    resumed.step(2)
    resumed.save_checkpoint(3, tmp_path)
    now = files(tmp_path)
    assert {n for n in now if n not in kept} == {"global-00003.safetensors"} | {
        f"client-{c}-00003.safetensors" for c in sampled}


def write_format_1(run_dir, run) -> None:
    """A checkpoint as fedlora wrote it before per-client files (format 1): one tensor file beside the
    index, the clients' metas in the index."""
    from fedlora_ext.federated.client_state import client_meta

    tensors = {"rng/torch": run.rng, **{f"global/{n}": t for n, t in run.state.tensors.items()},
               **{f"base/{n}": t for n, t in run.state.base.items()}}
    clients = []
    for c in run.clients:
        tensors.update({f"client{c.cid}/{n}": t for n, t in c.tensors.items()})
        clients.append({**client_meta(c, secret=False), "tensors": sorted(c.tensors),
                        "info": ckpt._pack(c.info, tensors, f"client{c.cid}-info/")})
    name = f"checkpoint-{run.rounds_done:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(run_dir / name))
    index = {"format": 1, "rounds_done": run.rounds_done, "config": run.config,
             "global": {"tensors": list(run.state.tensors), "base": list(run.state.base),
                        "info": ckpt._pack(run.state.info, tensors, "info/")},
             "clients": clients,
             "server_privacy": None,
             "ledger": [{d: [[cid, n] for cid, n in r[d].items()] for d in r} for r in run.ledger],
             "history": run.history, "tensors_file": name, "sha256": ckpt._sha256(run_dir / name)}
    (run_dir / INDEX).write_text(json.dumps(index))


def test_a_format_1_checkpoint_still_resumes_exactly(tmp_path):
    """Runs checkpointed before per-client files are read (without keys, as export reads them) and
    resume as they did; the first save moves them to the new format and removes the old tensor file."""
    whole, cut = uninterrupted(tmp_path / "whole"), tmp_path / "cut"
    checkpointed(cut, rounds=2)
    state = read_run(cut, keys=True)
    (cut / INDEX).unlink()
    for path in (cut / FOLDER).iterdir():
        path.unlink()
    write_format_1(cut, state)
    assert_same_state(read_run(cut, keys=True), state)
    assert [c.privacy for c in read_run(cut).clients] == [None] * 6
    resumed = Simulation.resume(cut)
    resumed.run(progress=False)
    assert not list(cut.glob("checkpoint-*.safetensors")) and read_index(cut)["format"] == ckpt.FORMAT
    assert_same_state(read_run(cut, keys=True), read_run(whole, keys=True))


def test_damaged_index_is_one_line(tmp_path):
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=f"{INDEX} is not JSON"):
        read_run(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"format": 7}))
    with pytest.raises(ValueError, match="has format 7, expected 1 or 2"):
        read_run(tmp_path)
