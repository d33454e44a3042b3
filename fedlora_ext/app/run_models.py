"""A run folder's models, rebuilt without reading its data: what ``fedlora export`` writes and what
``fedlora evaluate`` scores.

From the :class:`FedConfig` of ``config.json``, the base model (the run's ``base_model/`` for the built-in
tiny models, else the model folder of its config; the head sized by ``labels.json``), a
:class:`ModelBench`, the strategy and the state of the run's last checkpoint, the global model is exactly
what the run evaluated (:func:`fedlora_ext.federated.simulation.global_model`), and client K's own model
what the run evaluated for K after its last round (:func:`fedlora_ext.federated.simulation.client_model`).
A Flower run's checkpoint holds the server's state (its clients' own tensors live on the nodes): the global
model only. A run without a checkpoint (a Flower run from before they were written) has its global model
rebuilt from ``adapter.safetensors`` (global tensors and FLoRA / FedEx-LoRA's ``base_delta.<module>``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.device import base_dtype, resolve_dtype
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.data.tiny_models import TINY, build_model, dequantized_model
from fedlora_ext.federated.checkpoint import INDEX, client_entries, read_index, read_run
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.federated.simulation import BASE_MODEL, client_model, global_model, initial_model
from fedlora_ext.strategies.base import Strategy, make_strategy

LABELS = "labels.json"
ADAPTER_FILE = "adapter.safetensors"
_DELTA = "base_delta."


@dataclass
class RunModels:
    """A run rebuilt from its folder: config, strategy, bench (the base once) and the last state.

    ``clients`` is None for a run without a checkpoint (a Flower run: global model only). Models handed
    out share the bench's base weights: a ``merge_and_unload`` of one changes them for the next."""

    run_dir: Path
    config: FedConfig
    strategy: Strategy
    bench: ModelBench
    state: GlobalState
    clients: list[ClientState] | None
    rounds_done: int | None
    label_names: list[str]
    base_source: str | None  # the base folder (base_model_name_or_path); None: a tiny base to write out
    tokenizer: object | None = None
    notes: list[str] = field(default_factory=list)

    def global_model(self) -> nn.Module:
        """The server's model as the run evaluated it (global tensors, merged base), in eval mode."""
        model = global_model(self.bench, self.strategy, self.state)
        model.eval()
        return model

    def client(self, cid: int) -> ClientState:
        return next(c for c in self.clients if c.cid == cid)

    def client_model(self, cid: int) -> nn.Module:
        """Client ``cid``'s own model after the last round (its kept tensors plus what it downloads), as
        the run's final evaluation of that client saw it, in eval mode."""
        client = self.client(cid)
        round_index = self.rounds_done - 1
        payload = self.strategy.download(self.state, client, round_index)
        model = client_model(self.bench, self.strategy, self.state, client, payload, round_index)
        model.eval()
        return model


def read_run_config(run_dir: str | Path) -> FedConfig:
    """The FedConfig of a run folder, refused in one line when ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder (expected a run folder of `fedlora run` / `simulate` / Flower)")
    try:
        values = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        values = None
    if not isinstance(values, dict) or "method" not in values or "model_type" in values:
        hint = "; a comparison's runs are its subfolders" if (run_dir / "results.md").exists() else ""
        raise ValueError(f"{run_dir} is not a run folder (no config.json of a fedlora run){hint}")
    return FedConfig.from_dict(values, who=f"{run_dir / 'config.json'}")


def label_names_of(folder: Path) -> list[str]:
    try:
        id2label = json.loads((folder / LABELS).read_text())["id2label"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _model_task(config: FedConfig) -> str:
    return "causal_lm" if config.task == "sft" else config.task


def tokenizer_for(config: FedConfig, model_name: str):
    """The run's tokenizer (the packaged MiniLM one for tiny models), with its pad token."""
    from fedlora_ext.data.models import load_tokenizer

    return load_tokenizer(config, model_name)[0]


def _build_base(run_dir: Path, config: FedConfig, label_names: list[str]):
    """(base model as the run built it, its folder or None, the tokenizer or None, notes)."""
    from fedlora_ext.data.models import resolve_model

    task = _model_task(config)
    if config.task == "sft":
        num_labels = 2
    else:
        num_labels = len(label_names) if label_names else config.num_labels
    dtype = resolve_dtype(config.model_dtype)
    synthetic = config.dataset == "synthetic"
    notes = []
    tokenizer = None if synthetic else tokenizer_for(config, resolve_model(config.model))
    if config.model in TINY:
        folder = run_dir / BASE_MODEL
        if (folder / "config.json").is_file():
            model, source = build_model(str(folder), task, num_labels, dtype=dtype), str(folder.resolve())
        else:  # a run from before base_model/: rebuilt from the seed, as the run built it
            vocab = {} if tokenizer is None else {"vocab_size": len(tokenizer)}
            model, source = build_model(config.model, task, num_labels, config.seed, dtype=dtype, **vocab), None
            notes.append(f"the run has no {BASE_MODEL}/ (it predates it): its tiny base was rebuilt from seed "
                         f"{config.seed}")
    elif config.quantization != "none":  # the weights the run trained over, dequantised: a plain model
        name = resolve_model(config.model)
        model = dequantized_model(name, task, num_labels, config.quantization, dtype)
        source = str(Path(name).resolve())
        notes.append(f"the {config.quantization} base is dequantised to {str(base_dtype(model)).removeprefix('torch.')}")
    else:
        name = resolve_model(config.model)
        model = build_model(name, task, num_labels, config.seed, dtype=dtype)
        source = str(Path(name).resolve()) if Path(name).is_dir() else name
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # as build_task sets it
    return model, source, tokenizer, notes


def load_run(run_dir: str | Path, *, device: str = "cpu") -> RunModels:
    """A run folder's models, rebuilt on ``device`` from its config, base and last checkpoint (or, without
    one, its ``adapter.safetensors``: the global model only).

    Raises:
        ValueError: not a run folder, or a run that has no trained model yet.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir).replace(device=device)
    strategy = make_strategy(config)
    has_checkpoint = (run_dir / INDEX).is_file()
    if not has_checkpoint and not (run_dir / ADAPTER_FILE).is_file():
        raise ValueError(f"{run_dir} holds no trained model yet (no {INDEX} or {ADAPTER_FILE}: no round has "
                         "finished)")
    label_names = label_names_of(run_dir)
    model, source, tokenizer, notes = _build_base(run_dir, config, label_names)
    bench = ModelBench(config, model)
    strategy.init_state(initial_model(bench, strategy))  # the strategy's own set-up (standalone's start ...)
    if has_checkpoint:
        run = read_run(run_dir, device=bench.device)  # no privacy state (nor keys): not needed for a model
        state, clients, rounds_done = run.state, run.clients, run.rounds_done
    else:
        from safetensors.torch import load_file

        saved = {k: v.to(bench.device) for k, v in load_file(str(run_dir / ADAPTER_FILE)).items()}
        pristine = bench.pristine_base()
        base = {k[len(_DELTA):]: pristine[k[len(_DELTA):]].float() + v.float()
                for k, v in saved.items() if k.startswith(_DELTA)}
        state = GlobalState(tensors={k: v for k, v in saved.items() if not k.startswith(_DELTA)}, base=base)
        clients, rounds_done = None, _rounds_logged(run_dir)
        notes.append(f"no {INDEX} (a Flower run?): the global model comes from {ADAPTER_FILE}")
    return RunModels(run_dir, config, strategy, bench, state, clients, rounds_done, label_names, source, tokenizer,
                     notes)


def _rounds_logged(run_dir: Path) -> int | None:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return None



def check_client(run_dir: Path, config: FedConfig, strategy: Strategy, client: int | None) -> None:
    """Refuses, before the model is built, a model the run does not have: the global model of a method
    without one, a client id out of range, or a client whose own model is the global model."""
    method = config.method
    if client is None:
        if not strategy.global_model:
            raise ValueError(f"method {method!r} has no global model (each client's own model is its model); pass "
                             f"--client K (0..{config.num_clients - 1})")
        return
    index = read_index(run_dir) if (run_dir / INDEX).is_file() else None
    if index is None:
        why = ("it holds no trained model yet" if not (run_dir / ADAPTER_FILE).is_file()
               else "a Flower run keeps its clients' state on their nodes")
        raise ValueError(f"--client needs the run's {INDEX} (every client's own tensors); {run_dir} has none ({why})")
    if index.get("nodes") is not None:
        raise ValueError(f"--client needs every client's own tensors, which a Flower run keeps on its nodes ({run_dir}'s "
                         f"{INDEX} holds the server's state); leave out --client")
    entries = client_entries(index)
    cids = [int(m["cid"]) for m in entries]
    if client not in cids:
        span = f"0..{max(cids)}" if cids else "none"
        raise ValueError(f"--client {client} is out of range: the run has clients {span}")
    meta = next(m for m in entries if int(m["cid"]) == client)
    if not strategy.personalised and not meta.get("tensors") and int(meta["rank"]) == strategy.global_rank():
        raise ValueError(f"method {method!r}: client {client} keeps nothing of its own and trains at the global "
                         "rank, so its model is the global model; leave out --client")


@contextlib.contextmanager
def quiet_progress():
    """No transformers / datasets progress bars (saving shards, loading weights, tokenising)."""
    from transformers.utils import logging as hf_logging

    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # no "loss_type=None ..." notices around the one line
    try:
        import datasets

        datasets_shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except (ImportError, AttributeError):
        datasets, datasets_shown = None, False
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if shown:
            hf_logging.enable_progress_bar()
        if datasets is not None and datasets_shown:
            datasets.enable_progress_bars()



def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None

