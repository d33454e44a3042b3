"""Helpers of the federated-layer tests (``test_fed_*.py``) and of every test that runs the command line.

* ``small_config``: a tiny, fast FedConfig for any method (the extra knobs a method needs included).
* ``METHOD_EXTRAS`` / ``method_extras``: the one registry of what each method needs on top of FedConfig's
  defaults; every test that runs every method takes its extras from here.
* ``fedlora`` / ``start_fedlora`` / ``finish`` / ``one_error_line`` / ``ctrl_c_after_round``: the command
  line in a subprocess, as a user runs it, its one-line errors and a Ctrl-C between rounds; ``TINY``, the
  flags of a tiny run.
* ``Recorder``: wraps a Simulation's strategy hooks and keeps, for every client round, the client's
  adapter as it started and as it finished training (read from the live peft model), and for every
  aggregation the server state before and after plus the replies.
* Plain-torch views of peft models and of server states: factors, base weights and the effective
  weight ``W + s B A`` in the ``[out, in]`` convention, computed here independently of
  ``fedlora_ext.core.adapters`` so that the tests do not check the library against itself.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora_ext.data import build_model
from fedlora_ext.federated import FedConfig, Simulation
from pausing import paused, wait_for_pause

PEFT_PREFIX = "base_model.model."

#: target modules of every tiny family
TARGETS = {"tiny-bert": ("query", "value"), "tiny-gpt2": ("c_attn",), "tiny-llama": ("q_proj", "v_proj")}

#: what each method needs on top of the defaults to be a valid configuration: the one registry of method
#: extras (``method_extras`` adds the two-client runs' own choices)
METHOD_EXTRAS = {
    "fedprox": {"fedprox_mu": 0.01},
    "fedsa_rslora": {"rslora": True},
    "fedsa_vera": {"adapter": "vera"},
    "scaffold": {"optimizer": "sgd"},  # its local rule is SGD's; AdamW is refused
}
#: what the every-method runs on two clients of rank 4 (test_precision, test_sft_run) change on top:
#: a larger proximal weight, and FLoRA / HetLoRA with a different rank per client
TWO_CLIENT_EXTRAS = {
    "fedprox": {"fedprox_mu": 0.1},
    "flora": {"client_ranks": (4, 2)},
    "hetlora": {"client_ranks": (4, 2)},
    "flexlora": {"client_ranks": (4, 2)},
}


def method_extras(method: str, *, two_clients: bool = False) -> dict:
    """The config changes ``method`` needs (``METHOD_EXTRAS``), updated with ``TWO_CLIENT_EXTRAS`` for a
    run on two clients of rank 4 (``two_clients``); a new dict."""
    return {**METHOD_EXTRAS.get(method, {}), **(TWO_CLIENT_EXTRAS.get(method, {}) if two_clients else {})}


FLOAT32_EPS = torch.finfo(torch.float32).eps


def small_config(method: str = "fedit", *, model: str = "tiny-bert", task: str = "classification",
                 **changes) -> FedConfig:
    """A configuration that trains in well under a second per round on 2 CPU cores."""
    values = dict(method=method, model=model, task=task, target_modules=TARGETS[model], rank=4, alpha=8.0,
                  num_clients=3, rounds=2, local_steps=4, batch_size=16, lr=2e-2, num_examples=96, seq_len=12,
                  dirichlet_alpha=None, test_fraction=0.2, seed=0)
    values.update(method_extras(method))
    values.update(changes)
    return FedConfig(**values)


# ---- plain-torch views of peft models ---------------------------------------------------------------
@dataclass
class LayerView:
    """One adapted layer of a peft model, copied out: factors, base weight, scaling, layout."""

    A: Tensor | None  # [r, in] (LoRA) or None (VeRA)
    B: Tensor | None  # [out, r]
    W: Tensor  # the base weight as stored: [out, in], GPT-2 Conv1D [in, out]
    conv1d: bool
    scaling: float | None
    vera_d: Tensor | None = None
    vera_b: Tensor | None = None
    R: Tensor | None = None  # LoRA-SB's [r, r] between A and B (Fed-SB): the update is s B R A

    def weight_oi(self) -> Tensor:
        """The base weight as [out, in], float64."""
        return (self.W.T if self.conv1d else self.W).double()

    def effective(self, scaling: float | None = None) -> Tensor:
        """``W + s B A`` (with R: ``W + s B R A``) as [out, in], float64 (LoRA layers)."""
        s = self.scaling if scaling is None else scaling
        middle = self.B.double() if self.R is None else self.B.double() @ self.R.double()
        return self.weight_oi() + s * (middle @ self.A.double())


def layer_views(model: nn.Module) -> dict[str, LayerView]:
    """Every peft LoRA / VeRA layer of ``model`` by module path (peft prefix removed), as copies."""
    views = {}
    for name, module in model.named_modules():
        lora = getattr(module, "lora_A", None)
        vera = getattr(module, "vera_lambda_d", None)
        if lora is not None and "default" in lora:
            base = module.base_layer
            views[name.removeprefix(PEFT_PREFIX)] = LayerView(
                A=module.lora_A["default"].weight.detach().clone(),
                B=module.lora_B["default"].weight.detach().clone(),
                W=base.weight.detach().clone(), conv1d=isinstance(base, Conv1D),
                scaling=float(module.scaling["default"]),
                R=module.lora_A["default"].R.weight.detach().clone() if hasattr(module.lora_A["default"], "R") else None)
        elif vera is not None and "default" in vera:
            base = module.base_layer
            views[name.removeprefix(PEFT_PREFIX)] = LayerView(
                A=None, B=None, W=base.weight.detach().clone(), conv1d=isinstance(base, Conv1D), scaling=None,
                vera_d=module.vera_lambda_d["default"].detach().clone(),
                vera_b=module.vera_lambda_b["default"].detach().clone())
    return views


def head_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable copies of the classification head (peft ``modules_to_save``) by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".modules_to_save.default." in n}


def pristine_weights(config: FedConfig) -> dict[str, Tensor]:
    """Base weights of every Linear / Conv1D of a freshly built model (same seed as the run), by path."""
    model = build_model(config.model, config.task, config.num_labels, config.seed)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def is_conv1d(config: FedConfig) -> bool:
    return config.model == "tiny-gpt2"


def lora_scale(config: FedConfig, rank: int) -> float:
    """s = alpha / r (rsLoRA: alpha / sqrt(r)), written out here rather than taken from the library."""
    return config.alpha / math.sqrt(rank) if config.rslora else config.alpha / rank


def state_effective(state, module: str, pristine: Tensor, conv1d: bool, scaling: float) -> Tensor:
    """The server model's effective weight of ``module`` as [out, in], float64: the merged base (or the
    pristine one) plus ``s B A`` of the global factors when the state has them."""
    W = state.base.get(module, pristine).double()
    W = W.T if conv1d else W
    a, b = f"{module}.lora_A", f"{module}.lora_B"
    if a in state.tensors and b in state.tensors:
        W = W + scaling * (state.tensors[b].double() @ state.tensors[a].double())
    return W


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.norm((actual - expected).double()) / torch.linalg.norm(expected.double()))


def fedavg_p(replies) -> Tensor:
    """p_k = n_k / sum_j n_j in float64, computed here."""
    n = torch.tensor([float(r.num_examples) for r in replies], dtype=torch.float64)
    return n / n.sum()


def layer_map(layer: nn.Module, in_features: int) -> Tensor:
    """The linear map a (peft) layer applies, as [in, out]: ``layer(I) - layer(0)``, read off its forward.
    Layout-free: the same for nn.Linear and GPT-2's Conv1D, so it exposes a delta added transposed."""
    with torch.no_grad():
        eye = torch.eye(in_features)
        return (layer(eye) - layer(torch.zeros(1, in_features))).double()


# ---- recording a simulation -------------------------------------------------------------------------
@dataclass
class RoundRecord:
    index: int
    before: object  # GlobalState (deep copy) handed to aggregate
    replies: list  # the replies (deep copies)
    after: object  # GlobalState (deep copy) aggregate returned


@dataclass
class Recorder:
    """Wraps ``prepare``, ``upload`` and ``aggregate`` of a simulation's strategy (instance attributes
    shadow the class's methods), keeping what every client started and finished training with."""

    sim: Simulation
    started: dict = field(default_factory=dict)  # (round, cid) -> {module: LayerView} as training starts
    finished: dict = field(default_factory=dict)  # (round, cid) -> {module: LayerView} at upload
    heads: dict = field(default_factory=dict)  # (round, cid) -> head params at upload
    ranks: dict = field(default_factory=dict)  # (round, cid) -> client.rank during the round
    rounds: list = field(default_factory=list)

    def __post_init__(self) -> None:
        strategy = self.sim.strategy
        local_update, upload, aggregate = strategy.local_update, strategy.upload, strategy.aggregate

        def recording_local_update(trainer, model, client, round_index):
            # called only inside a client round, right after prepare: the model is what training starts from
            self.started[(round_index, client.cid)] = layer_views(model)
            self.ranks[(round_index, client.cid)] = client.rank
            return local_update(trainer, model, client, round_index)

        def recording_upload(model, client, start, round_index):
            self.finished[(round_index, client.cid)] = layer_views(model)
            self.heads[(round_index, client.cid)] = head_params(model)
            return upload(model, client, start, round_index)

        def recording_aggregate(state, replies, round_index):
            before = copy.deepcopy(state)  # merging strategies update the state in place
            replies_copy = copy.deepcopy(replies)
            after = aggregate(state, replies, round_index)
            self.rounds.append(RoundRecord(round_index, before, replies_copy, copy.deepcopy(after)))
            return after

        strategy.local_update = recording_local_update
        strategy.upload = recording_upload
        strategy.aggregate = recording_aggregate


def assert_alternating_freeze(rec: Recorder) -> None:
    """Rounds 1, 3, ... train B only and rounds 2, 4, ... A only (LoRA-A2, RoLoRA): on every client the
    trained factor moved and the other is bit-for-bit as it started; the server leaves the other as it was."""
    for (round_index, cid), views in rec.finished.items():
        trained, frozen = ("B", "A") if round_index % 2 == 0 else ("A", "B")
        moved = False
        for module, view in views.items():
            start = rec.started[(round_index, cid)][module]
            assert torch.equal(getattr(view, frozen), getattr(start, frozen)), f"round {round_index}: {frozen} moved"
            moved |= not torch.equal(getattr(view, trained), getattr(start, trained))
        assert moved, f"round {round_index}, client {cid}: {trained} never moved"
    for record in rec.rounds:
        frozen = "lora_A" if record.index % 2 == 0 else "lora_B"
        for name, t in record.before.tensors.items():
            if name.endswith(frozen):
                assert torch.equal(record.after.tensors[name], t), f"round {record.index}: the server moved {name}"


def run_recorded(config: FedConfig, **kwargs) -> tuple[Simulation, Recorder]:
    torch.manual_seed(config.seed)
    sim = Simulation(config, **kwargs)
    recorder = Recorder(sim)
    sim.run(progress=False)
    return sim, recorder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run fastest on one intra-op thread, and two threads spin badly when the 2 CPU
    cores are shared (measured 0.16 s vs 7 s per 2-round run); restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the command line in a subprocess ----------------------------------------------------------------
#: `fedlora run` flags of a tiny synthetic run (tiny-bert, three clients, one local step, quiet)
TINY = ["--preset", "fedit", "--clients", "3", "--local-steps", "1", "--set", "num_examples=48", "--set", "seq_len=16",
        "--set", "batch_size=16", "--quiet"]


def cli_env() -> dict:
    """The environment of a CLI subprocess: this one's, unbuffered (a paused or killed run has printed
    what it did)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _command(args, python: Sequence[str]) -> list[str]:
    return [sys.executable, *python, *map(str, args)]


def fedlora(*args, cwd, timeout: float = 300, env: dict | None = None,
            python: Sequence[str] = ("-m", "fedlora_ext")) -> subprocess.CompletedProcess:
    """``fedlora ARGS`` as a user runs it (``python -m fedlora_ext``, or ``python PYTHON... ARGS``), run to
    its end from ``cwd``, stdout and stderr captured as text. ``cwd`` is outside the checkout (e.g.
    tmp_path): there the checkout's fedlora_ext/ without _C would shadow the installed package."""
    return subprocess.run(_command(args, python), capture_output=True, text=True, cwd=cwd,
                          env=cli_env() if env is None else env, timeout=timeout)


def start_fedlora(*args, cwd, env: dict | None = None) -> subprocess.Popen:
    """``fedlora ARGS`` started the same way and left running (stdout and stderr piped, text); ``finish``
    waits for it."""
    return subprocess.Popen(_command(args, ("-m", "fedlora_ext")), cwd=cwd, env=cli_env() if env is None else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Waits for a started command and returns what ``fedlora`` would have."""
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ctrl_c_after_round(*args, cwd, pause: Path, after_round: int = 1,
                       timeout: float = 120) -> subprocess.CompletedProcess:
    """``fedlora ARGS`` paused once round ``after_round`` is checkpointed (``pause``, pausing.py), then
    sent SIGINT there, as a Ctrl-C between rounds; returns what it printed and its exit status (killed
    if still running after ``timeout`` seconds, or when waiting fails)."""
    run = start_fedlora(*args, cwd=cwd, env=paused(cli_env(), after_round, pause))
    try:
        wait_for_pause(pause, run)
        run.send_signal(signal.SIGINT)
        return finish(run, timeout)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line ``fedlora: error: ...`` holding every needle, no traceback;
    returns the line."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- a user's files ---------------------------------------------------------------------------------
def tree_hashes(folder) -> dict[str, str]:
    """Every entry under ``folder`` by its relative path: a file's SHA-256, a link's target, ``"folder"``
    for a folder (so an emptied or removed folder shows too). Tests compare it before and after a command
    to check that files the command did not write are left exactly as they were."""
    import hashlib
    import os
    from pathlib import Path

    root = Path(folder)
    hashes = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            hashes[name] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            hashes[name] = "folder"
        else:
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes
