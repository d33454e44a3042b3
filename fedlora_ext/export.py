"""``fedlora export`` and ``fedlora evaluate``: a run's model as a folder that peft / transformers load,
and the scores of such a folder (or of a run folder) on any dataset a run accepts.

Export rebuilds the run's model without reading its data: the :class:`FedConfig` of ``config.json``, the
base model (the run's ``base_model/`` for the built-in tiny models, else the model folder of its config;
the head sized by ``labels.json``), a :class:`ModelBench`, the strategy, and the state of the run's last
checkpoint. The global model is then exactly what the run evaluated
(:func:`fedlora_ext.federated.simulation.global_model`), and client K's own model what the run evaluated
for K after its last round (:func:`fedlora_ext.federated.simulation.client_model`). A Flower run keeps no
checkpoint (its clients' state lives on the nodes): its global model is rebuilt from
``adapter.safetensors`` (global tensors and FLoRA / FedEx-LoRA's ``base_delta.<module>``).

Formats:

* ``peft``: ``save_pretrained`` of the peft model (``adapter_config.json`` + ``adapter_model.safetensors``
  in peft's own names; a classification head rides in ``modules_to_save``), with ``base_model_name_or_path``
  naming the base folder. Refused for FLoRA / FedEx-LoRA: their global model includes updates merged
  into the base weights, which no adapter carries.
* ``merged``: ``merge_and_unload()`` saved as a transformers model folder (safetensors) with
  ``id2label`` / ``label2id`` in its config and the tokenizer (none for synthetic-token runs).

Both also hold ``labels.json`` (classification with named labels) and ``fedlora_export.json`` (what was
exported from which run, the run's config, notes, and under ``written`` every file and folder the export
wrote: what ``--overwrite`` may remove). peft warns about keys it does not know in
``adapter_config.json``, so the label names are not put there. A causal LM read with a tokenizer (SFT,
causal_lm) also gets ``generation_config.json``: eos is the token training ended every answer with (the
tokenizer's eos, else its separator), pad the tokenizer's (a merged ``config.json`` agrees); SFT exports
keep ``prompt_template.json``, how training built each prompt.

``--out`` is new, empty or (with ``overwrite``) an earlier export holding nothing else: files fedlora did
not write are never touched. The export is written into a new hidden folder beside it and renamed into
place; an earlier export is moved aside first and removed last, so a failed export leaves it whole.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedlora_ext.core import adapters
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.device import base_dtype, resolve_dtype
from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.data.tiny_models import TINY, build_model, check_seq_len
from fedlora_ext.federated.checkpoint import INDEX, unpack_info, read_checkpoint
from fedlora_ext.federated.client import ModelBench
from fedlora_ext.federated.client_state import restore_client
from fedlora_ext.federated.evaluate import evaluate
from fedlora_ext.federated.simulation import (
    BASE_MODEL,
    client_model,
    global_model,
    initial_model,
    label_maps,
    save_base_model,
)
from fedlora_ext.strategies.base import Strategy, make_strategy

FORMATS = ("peft", "merged")
#: what an export says about itself: format, run, method, client, base, notes, the run's config
EXPORT_INFO = "fedlora_export.json"
LABELS = "labels.json"
ADAPTER_FILE = "adapter.safetensors"
#: the ids generation needs (eos: the token training ended answers with; pad), as transformers reads them
GENERATION = "generation_config.json"
#: how training built an SFT prompt (format, template, special ids, end token)
PROMPT = "prompt_template.json"
_DELTA = "base_delta."


# ---------------------------------------------------------------------------------------- a run's models
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


def _label_names(folder: Path) -> list[str]:
    try:
        id2label = json.loads((folder / LABELS).read_text())["id2label"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _checkpoint_index(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / INDEX).read_text())
    except (OSError, ValueError):
        return None


def _model_task(config: FedConfig) -> str:
    return "causal_lm" if config.task == "sft" else config.task


def _tokenizer_for(config: FedConfig, model_name: str):
    """The run's tokenizer (the packaged MiniLM one for tiny models), with its pad token."""
    from fedlora_ext.data.task import load_tokenizer

    return load_tokenizer(config, model_name)[0]


def _build_base(run_dir: Path, config: FedConfig, label_names: list[str]):
    """(base model as the run built it, its folder or None, the tokenizer or None, notes)."""
    from fedlora_ext.data.text import resolve_model

    task = _model_task(config)
    if config.task == "sft":
        num_labels = 2
    else:
        num_labels = len(label_names) if label_names else config.num_labels
    dtype = resolve_dtype(config.model_dtype)
    synthetic = config.dataset == "synthetic"
    notes = []
    tokenizer = None if synthetic else _tokenizer_for(config, resolve_model(config.model))
    if config.model in TINY:
        folder = run_dir / BASE_MODEL
        if (folder / "config.json").is_file():
            model, source = build_model(str(folder), task, num_labels, dtype=dtype), str(folder.resolve())
        else:  # a run from before base_model/: rebuilt from the seed, as the run built it
            vocab = {} if tokenizer is None else {"vocab_size": len(tokenizer)}
            model, source = build_model(config.model, task, num_labels, config.seed, dtype=dtype, **vocab), None
            notes.append(f"the run has no {BASE_MODEL}/ (it predates it): its tiny base was rebuilt from seed "
                         f"{config.seed}")
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
    label_names = _label_names(run_dir)
    model, source, tokenizer, notes = _build_base(run_dir, config, label_names)
    bench = ModelBench(config, model, merges=strategy.merges_base)
    strategy.init_state(initial_model(bench, strategy))  # the strategy's own set-up (standalone's start ...)
    if has_checkpoint:
        try:
            index, tensors = read_checkpoint(run_dir)
        except ValueError as error:
            raise ValueError(str(error).removeprefix("resume: ")) from None
        tensors = {k: v.to(bench.device) for k, v in tensors.items() if not k.startswith("rng/")}
        g = index["global"]
        state = GlobalState(tensors={n: tensors[f"global/{n}"] for n in g["tensors"]},
                            base={n: tensors[f"base/{n}"].clone() for n in g["base"]},
                            info=unpack_info(g["info"], tensors))
        clients = []
        for meta in index["clients"]:  # the privacy state (and its key) is not needed to build a model
            cid = int(meta["cid"])
            client = restore_client({k: v for k, v in meta.items() if k not in ("privacy", "info")},
                                    {n: tensors[f"client{cid}/{n}"] for n in meta["tensors"]})
            client.info = unpack_info(meta["info"], tensors)
            clients.append(client)
        rounds_done = int(index["rounds_done"])
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


# ----------------------------------------------------------------------------------------------- export
#: what an export wrote besides its ``files`` before fedlora_export.json listed everything (``written``)
_LEGACY_WRITTEN = (EXPORT_INFO, LABELS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", f"{BASE_MODEL}/")


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _tree(folder: Path, root: Path | None = None) -> list[str]:
    """Every entry under ``folder``, relative to ``root`` (folders end in ``/``; links are not followed)."""
    root = root or folder
    entries = []
    for entry in sorted(folder.iterdir()):
        name = entry.relative_to(root).as_posix()
        if entry.is_dir() and not entry.is_symlink():
            entries += [f"{name}/", *_tree(entry, root)]
        else:
            entries.append(name)
    return entries


def _foreign(out: Path, info: dict) -> list[str]:
    """The entries of an earlier export's folder that the export did not write (a folder it did not
    write is named as a whole)."""
    written = info.get("written")
    legacy = not isinstance(written, list)
    if legacy:  # an export from before `written`: its `files`, its tokenizer and base_model/ as a whole
        files = info.get("files")
        written = [*(files if isinstance(files, list) else []), *_LEGACY_WRITTEN]
    written = set(map(str, written))
    foreign = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            name = entry.relative_to(out).as_posix()
            if not (entry.is_dir() and not entry.is_symlink()):
                if name not in written:
                    foreign.append(name)
            elif f"{name}/" not in written:
                foreign.append(f"{name}/")
            elif not (legacy and name == BASE_MODEL):
                walk(entry)

    walk(out)
    return foreign


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuses an ``--out`` that is not a new or empty folder, or (with ``overwrite``) a folder holding
    an earlier export and nothing else: files fedlora did not write are never touched."""
    if out.is_symlink():  # replacing it would replace the link, not what it points to
        raise ValueError(f"--out {out} is a symbolic link; give the folder itself or another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose another --out")
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or run in resolved.parents:
        raise ValueError(f"--out {out} is inside the run folder {run_dir}, which holds only what the run writes; "
                         "choose a folder outside it")
    if not out.is_dir() or not any(out.iterdir()):
        return
    info = _read_json(out / EXPORT_INFO)
    if info is None:
        names = sorted(e.name for e in out.iterdir())
        raise ValueError(f"--out {out} holds files that are not a fedlora export ({_listing(names)}; no "
                         f"{EXPORT_INFO}); not touching it, --overwrite or not: choose an empty or new --out")
    foreign = _foreign(out, info)
    if foreign:
        raise ValueError(f"--out {out} holds, besides an earlier export, files fedlora did not write "
                         f"({_listing(foreign)}); not touching it, --overwrite or not: move them out or choose "
                         "an empty or new --out")
    if not overwrite:
        raise ValueError(f"--out {out} is not empty: it holds an earlier export; pass --overwrite to replace it, "
                         "or choose another --out")


def _new_folder(parent: Path, stem: str) -> Path:
    """A new empty folder ``parent/stem-N`` (never one that exists: nothing of anyone's is reused)."""
    for n in itertools.count(os.getpid()):
        folder = parent / f"{stem}-{n}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def _put_in_place(temporary: Path, out: Path, run_dir: Path, overwrite: bool) -> None:
    """Renames the finished export to ``out``. An earlier export there is moved aside first and removed
    only once the new one is in place, so a failure leaves it as it was."""
    _check_out(out, run_dir, overwrite)  # again: files may have come while the model was written
    old = None
    if out.exists():
        old = _new_folder(out.parent, f".{out.name}.replaced")
        out.replace(old)  # onto the empty folder just made
    try:
        temporary.replace(out)
    except BaseException:
        if old is not None:
            old.replace(out)
        raise
    if old is not None:
        shutil.rmtree(old)  # only what the earlier export wrote (checked above)


def _check_request(run_dir: Path, config: FedConfig, strategy: Strategy, fmt: str, client: int | None) -> None:
    """Everything refused before the model is built: format, method, client id."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    method = config.method
    if fmt == "peft" and strategy.merges_base:
        raise ValueError(f"method {method!r} merges client updates into the base weights, so its model is a new "
                         "base, not an adapter over the original one; export it with --format merged")
    if client is None:
        if not strategy.global_model:
            raise ValueError(f"method {method!r} has no global model (each client's own model is its model); pass "
                             f"--client K (0..{config.num_clients - 1})")
        return
    index = _checkpoint_index(run_dir)
    if index is None:
        why = ("it holds no trained model yet" if not (run_dir / ADAPTER_FILE).is_file()
               else "a Flower run keeps its clients' state on their nodes")
        raise ValueError(f"--client needs the run's {INDEX} (every client's own tensors); {run_dir} has none ({why})")
    cids = [int(m["cid"]) for m in index.get("clients", [])]
    if client not in cids:
        span = f"0..{max(cids)}" if cids else "none"
        raise ValueError(f"--client {client} is out of range: the run has clients {span}")
    meta = next(m for m in index["clients"] if int(m["cid"]) == client)
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


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, client: int | None = None,
               overwrite: bool = False) -> dict:
    """Writes the run's global model (or client ``client``'s own) to ``out`` as a peft adapter folder
    (``fmt = "peft"``) or a merged transformers model folder (``"merged"``); returns what
    ``fedlora_export.json`` says, with ``line``, a sentence for the command line.

    The folder is built next to ``out`` and renamed into place: a failed export leaves nothing half
    written. An existing non-empty ``out`` is replaced only with ``overwrite`` and only when it holds an
    earlier export.

    Raises:
        ValueError: one line: not a run folder, no trained model yet, an unknown format, peft for a method
            that merges into the base, no ``client`` for a method without a global model, a client id out
            of range or one whose model is the global model, ``out`` not empty (or not an export).
    """
    run_dir, out = Path(run_dir), Path(out)
    config = read_run_config(run_dir)
    strategy = make_strategy(config)
    if not (run_dir / INDEX).is_file() and not (run_dir / ADAPTER_FILE).is_file():
        raise ValueError(f"{run_dir} holds no trained model yet (no {INDEX} or {ADAPTER_FILE}: no round has "
                         "finished)")
    _check_request(run_dir, config, strategy, fmt, client)
    _check_out(out, run_dir, overwrite)
    with quiet_progress():
        run = load_run(run_dir, device="cpu")  # exported files are CPU tensors
        model = run.global_model() if client is None else run.client_model(client)
        out.parent.mkdir(parents=True, exist_ok=True)
        # a fresh hidden folder beside out: the rename into place stays on one file system
        temporary = _new_folder(out.parent, f".{out.name}.export")
        try:
            info = _write(run, model, fmt, client, temporary, out)
            info["written"] = [*_tree(temporary), EXPORT_INFO]  # what --overwrite may remove later
            (temporary / EXPORT_INFO).write_text(json.dumps(info, indent=2))
            _put_in_place(temporary, out, run_dir, overwrite)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    what = "the global model" if client is None else f"client {client}'s own model"
    kind = "a peft adapter folder" if fmt == "peft" else "a merged transformers model folder"
    info["line"] = (f"exported {what} of {run_dir} ({config.method}, after round {run.rounds_done}) as {kind} to "
                    f"{out}" + (f"; base: {info['base_model_name_or_path']}" if fmt == "peft" else "")
                    + ("" if info["tokenizer"] else "; no tokenizer (the run read synthetic tokens)"))
    return info


def _generation(run: RunModels, model: nn.Module):
    """The model's generation config with the ids training used (None for classification and for
    synthetic-token runs): eos is the token that ended every training text (an SFT answer's end token:
    the tokenizer's eos, else its separator), pad the tokenizer's, bos the one special id put before
    each prompt (when there is one)."""
    if run.config.task == "classification" or run.tokenizer is None:
        return None
    from transformers import GenerationConfig

    from fedlora_ext.data.sft import end_token_id, leading_special_ids

    ids = {"eos_token_id": end_token_id(run.tokenizer), "pad_token_id": run.tokenizer.pad_token_id}
    lead = leading_special_ids(run.tokenizer)
    if len(lead) == 1:
        ids["bos_token_id"] = lead[0]
    own = getattr(model, "generation_config", None)  # the base's sampling defaults stay
    generation = copy.deepcopy(own) if own is not None else GenerationConfig()
    generation.update(**ids)
    generation._from_model_config = False  # ours, not derived from config.json: generate() keeps it as is
    return generation


def _sft_format(run: RunModels) -> str | None:
    """The run's SFT format, from the note its data.json keeps ("<format> format; ..."); None if unknown."""
    from fedlora_ext.data.sft import FORMATS, PACKAGED_INSTRUCTIONS

    if run.config.dataset in PACKAGED_INSTRUCTIONS:
        return "prompt_response"
    notes = (_read_json(run.run_dir / "data.json") or {}).get("notes") or [""]
    first = str(notes[0]).split(" ", 1)[0]
    return first if first in FORMATS and str(notes[0]).startswith(f"{first} format") else None


def _write(run: RunModels, model: nn.Module, fmt: str, client: int | None, folder: Path, out: Path) -> dict:
    config = run.config
    notes = list(run.notes)
    base_source = run.base_source
    generation = _generation(run, model)
    if fmt == "peft":
        final = base_source
        if base_source is None:  # an old tiny run: its rebuilt base goes into the export
            base_source = str(save_base_model(folder, config, run.bench, run.label_names))
            final = str((out / BASE_MODEL).resolve())
            notes.append(f"the rebuilt base is in {BASE_MODEL}/ of this folder")
        model.peft_config[adapters.ADAPTER].base_model_name_or_path = base_source  # peft reads its config
        model.save_pretrained(str(folder))
        if final != base_source:  # where the base will be once the folder is in place
            saved = json.loads((folder / "adapter_config.json").read_text())
            saved["base_model_name_or_path"] = final
            (folder / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
        base_source = final
        files = ["adapter_config.json", "adapter_model.safetensors"]
        if generation is not None:  # the base's own may end on another token: pass this one to generate()
            generation.save_pretrained(str(folder))
    else:
        dtype = base_dtype(run.bench.base_model)
        merged = model.merge_and_unload()
        if dtype != torch.float32:  # the float32 head joins the 16-bit base
            merged.to(dtype)
            notes.append(f"merged into the {str(dtype).removeprefix('torch.')} base: the merge rounds to it")
        if config.task == "classification" and run.label_names:
            maps = label_maps(run.label_names)
            merged.config.id2label = {int(i): n for i, n in maps["id2label"].items()}
            merged.config.label2id = maps["label2id"]
        if generation is not None:  # config.json and generation_config.json agree on the ids
            for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
                setattr(merged.config, key, getattr(generation, key))
            merged.generation_config = generation
        merged.save_pretrained(str(folder))
        files = ["config.json", "model.safetensors"]
    if run.tokenizer is not None:
        run.tokenizer.save_pretrained(str(folder))
    else:
        notes.append("no tokenizer: the run trained on synthetic token ids, not text")
    if run.label_names:
        (folder / LABELS).write_text(json.dumps(label_maps(run.label_names), indent=2))
        files.append(LABELS)
    info = {"format": fmt, "run": str(run.run_dir.resolve()), "method": config.method,
            "model": "global" if client is None else f"client {client}", "client": client,
            "rounds_done": run.rounds_done, "task": config.task, "adapter": config.adapter,
            "base_model_name_or_path": base_source, "tokenizer": run.tokenizer is not None, "files": files}
    if generation is not None:
        info["generation"] = {k: getattr(generation, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        files.append(GENERATION)
    if config.task == "sft" and run.tokenizer is not None:
        from fedlora_ext.data.sft import prompt_template

        info["prompt_template"] = prompt_template(_sft_format(run), run.tokenizer, config.dataset)
        (folder / PROMPT).write_text(json.dumps(info["prompt_template"], indent=2))
        files.append(PROMPT)
    return {**info, "notes": notes, "config": config.to_dict()}


# --------------------------------------------------------------------------------------------- evaluate
@dataclass
class Loaded:
    """A model to evaluate, what it is, its label names (empty: none), its tokenizer (or None) and the
    FedConfig its data settings start from."""

    model: nn.Module
    kind: str
    label_names: list[str]
    tokenizer: object | None
    config: FedConfig
    base: str  # a model name or folder for the seq_len check
    run_dataset: str | None = None  # the dataset its run trained on (None: a model folder without a run)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _generic(names: list[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def _config_labels(model_config) -> list[str]:
    id2label = getattr(model_config, "id2label", None) or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [] if _generic(names) else names


def _folder_tokenizer(config: FedConfig, folder: str):
    """The tokenizer saved in ``folder`` (with a pad token), or None when it holds none."""
    if not any((Path(folder) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")):
        return None
    return _tokenizer_for(config, folder)


def _task_of(classifier: bool, wanted: str | None, what: str) -> str:
    """classification for a sequence classifier, else causal_lm (or sft when ``wanted``)."""
    if classifier:
        if wanted not in (None, "classification"):
            raise ValueError(f"task {wanted!r}: {what} is a sequence classifier; use task classification")
        return "classification"
    if wanted == "classification":
        raise ValueError(f"task 'classification': {what} is not a sequence classifier (a causal LM)")
    return wanted or "causal_lm"


def _is_decoder(model_config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model_config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _check_head(path: Path, model_config, wanted: str | None) -> None:
    """Refuses a model folder without a sequence-classification head where it would be scored with a
    random one: for task classification, and a bare encoder for anything (as a language model transformers
    gives it a random LM head, so every call would print another loss)."""
    decoder = _is_decoder(model_config)
    if decoder and wanted != "classification":
        return
    architectures = list(getattr(model_config, "architectures", None) or [])
    kind = "a causal LM" if decoder else "an encoder without a task head"
    raise ValueError(f"model {str(path)!r} has no classification head (architectures {architectures}: {kind}), so "
                     "it would be scored with a randomly initialised one; evaluate an export (`fedlora export RUN "
                     "--out DIR`) or a run folder instead")


def load_for_evaluation(path: str | Path, *, client: int | None = None, device: str = "auto",
                        changes: dict | None = None) -> Loaded:
    """A run folder (its global model, or client ``client``'s), a peft export (its base from
    ``base_model_name_or_path``) or a transformers model folder (a merged export), on ``device``."""
    from fedlora_ext.core.device import resolve_device

    path = Path(path)
    changes = dict(changes or {})
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder (expected a run folder, a peft adapter folder or a transformers "
                         "model folder)")
    info = _read_json(path / EXPORT_INFO) or {}
    is_peft = (path / "adapter_config.json").is_file()
    is_model = "model_type" in (_read_json(path / "config.json") or {})
    if is_peft or is_model:
        if client is not None:
            raise ValueError("--client applies to a run folder only (an export holds one model)")
        start = FedConfig.from_dict(info["config"]) if isinstance(info.get("config"), dict) else FedConfig()
        start = start.replace(out_dir=None, device=device)
        wanted = changes.get("task") or (start.task if info else None)
        run_dataset = start.dataset if info.get("config") else None
        if is_peft:
            return _load_peft(path, start, wanted, device, run_dataset)
        import transformers as tf

        model_config = tf.AutoConfig.from_pretrained(str(path))
        classifier = any(a.endswith("ForSequenceClassification") for a in model_config.architectures or ())
        if not classifier:
            _check_head(path, model_config, wanted)
        task = _task_of(classifier, wanted, f"model {str(path)!r}")
        model = build_model(str(path), task, getattr(model_config, "num_labels", 2), dtype=None)
        tokenizer = _folder_tokenizer(start, str(path))
        if model.config.pad_token_id is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.to(resolve_device(device)).eval()
        names = _label_names(path) or _config_labels(model.config)
        return Loaded(model, "merged export" if info else "model folder", names, tokenizer,
                      start.replace(task=task), str(path), run_dataset)
    config = read_run_config(path)
    strategy = make_strategy(config)
    if "task" in changes and (changes["task"] == "classification") != (config.task == "classification"):
        raise ValueError(f"task {changes['task']!r} does not fit the run's model (task {config.task!r})")
    if not (path / INDEX).is_file() and not (path / ADAPTER_FILE).is_file():
        raise ValueError(f"{path} holds no trained model yet (no {INDEX} or {ADAPTER_FILE}: no round has finished)")
    _check_request(path, config, strategy, "merged", client)
    run = load_run(path, device=device)
    model = run.global_model() if client is None else run.client_model(client)
    from fedlora_ext.data.text import resolve_model

    base = run.base_source or resolve_model(config.model)
    return Loaded(model, "run folder" if client is None else f"run folder, client {client}", run.label_names,
                  run.tokenizer, run.config.replace(out_dir=None), base, config.dataset)


def _load_peft(path: Path, start: FedConfig, wanted: str | None, device: str, run_dataset: str | None) -> Loaded:
    import transformers as tf
    from peft import PeftConfig, PeftModel

    from fedlora_ext.core.device import resolve_device

    peft_config = PeftConfig.from_pretrained(str(path))
    base = peft_config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(f"{path}: its base_model_name_or_path {base!r} is not a model folder here (a peft adapter "
                         "needs its base model)")
    model_config = tf.AutoConfig.from_pretrained(base)
    classifier = str(getattr(peft_config, "task_type", "") or "").endswith("SEQ_CLS")
    task = _task_of(classifier, wanted, f"adapter {str(path)!r}")
    names = _label_names(path)
    num_labels = len(names) if names else getattr(model_config, "num_labels", 2)
    model = build_model(base, task, num_labels, dtype=None)
    tokenizer = _folder_tokenizer(start, str(path)) or _folder_tokenizer(start, base)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(path))
    model.to(resolve_device(device)).eval()
    return Loaded(model, "peft export", names or _config_labels(model.config), tokenizer, start.replace(task=task),
                  base, run_dataset)


def evaluation_data(config: FedConfig, tokenizer, label_names: list[str], num_labels: int | None, *,
                    held_by: str | None = None):
    """(tokenised rows, what they are, naming the dataset): its own test split when it has one; else, with
    ``held_by`` (the run's own dataset: who held the rows out, "the run"), exactly the rows a run of
    ``config`` holds out (its seeded ``eval_fraction`` split), else all its rows; for ``synthetic`` the test
    set a run of ``config`` evaluates on. Class ids follow the model's labels."""
    from fedlora_ext.data.sft import load_sft, tokenize_sft
    from fedlora_ext.data.synthetic import synthetic_dataset
    from fedlora_ext.data.text import load_documents, load_text, tokenize

    name, task = config.dataset, config.task
    if name == "synthetic":
        if task == "sft":
            raise ValueError("dataset 'synthetic' has no instructions: task 'sft' needs instruction data")
        n_test = max(config.num_examples // 4, 8)
        if task == "classification" and num_labels is not None and config.num_labels > num_labels:
            raise ValueError(f"synthetic data with num_labels {config.num_labels}, but the model has {num_labels} "
                             f"labels; set --set num_labels={num_labels}")
        data = synthetic_dataset(task, n_test, config.seq_len, config.num_labels, config.seed + 1)
        return data, f"the synthetic test set ({n_test} examples, seed {config.seed + 1})"
    if tokenizer is None:
        raise ValueError(f"dataset {name!r} is text, but the model has no tokenizer (a run on synthetic token ids "
                         "has none, nor has a folder without tokenizer files); evaluate it on --dataset synthetic")
    # the run's own split settings, so that its held-out rows come out as the run drew them
    common = {"seed": config.seed, "test_fraction": config.eval_fraction, "max_examples": config.max_examples,
              "encoding": config.encoding, "drop_invalid_rows": config.drop_invalid_rows}
    if task == "sft":
        text = load_sft(name, category_column=config.category_column, **common)
    elif task == "causal_lm":
        text = load_documents(name, text_column=config.text_column, **common)
    else:
        text = load_text(name, text_column=config.text_column, label_column=config.label_column, **common)
    rows, what = _rows_to_score(text, name, config, held_by)
    if task == "classification":
        rows = _follow_labels(rows, text.label_names, label_names, num_labels, name)
    if task == "sft":
        data, dropped = tokenize_sft(rows, tokenizer, config.seq_len)
        if dropped:
            what += f"; {dropped} whose response does not fit seq_len {config.seq_len} left out"
        if not len(data):
            raise ValueError(f"dataset {name!r}: no example fits seq_len {config.seq_len}; raise it with --set seq_len=N")
        return data, what
    return tokenize(rows, tokenizer, config.seq_len, task), what


def _rows_to_score(text, name: str, config: FedConfig, held_by: str | None):
    """(rows, what they are) of loaded data: its own test split, the run's held-out rows, or all rows."""
    import datasets

    if text.eval_split.startswith("the dataset's own"):
        return text.test, f"{text.eval_split} of {name!r} ({len(text.test)} examples)"
    if held_by:
        return text.test, (f"the {len(text.test)} rows {held_by} held out of {name!r} (eval_fraction "
                           f"{config.eval_fraction}, seed {config.seed}; it has no test split)")
    rows = datasets.concatenate_datasets([text.train, text.test])
    kept = "" if config.max_examples is None else f" kept by max_examples {config.max_examples}"
    return rows, f"all {len(rows)} rows of {name!r}{kept} (it has no test split)"


def _follow_labels(rows, data_names: list[str], model_names: list[str], num_labels: int | None, name: str):
    """The data's class ids as the model's: by name when the model has named labels, else as they are."""
    if model_names:
        unknown = [n for n in data_names if n not in model_names]
        if unknown:
            raise ValueError(f"dataset {name!r} has label(s) {unknown[:5]} the model does not know (its labels: "
                             f"{model_names[:10]})")
        new_id = [model_names.index(n) for n in data_names]
        if new_id == list(range(len(data_names))):
            return rows
        return rows.map(lambda batch: {"label": [new_id[i] for i in batch["label"]]}, batched=True,
                        keep_in_memory=True)
    if num_labels is not None and len(data_names) > num_labels:
        raise ValueError(f"dataset {name!r} has {len(data_names)} labels, the model {num_labels}")
    return rows


def _same_dataset(a: str, b: str) -> bool:
    """The same name, or two paths to the same file or folder."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _run_dataset_here(dataset: str) -> str:
    """The run's dataset as the default ``--dataset``, refused in one line when it is a relative path that
    does not lead to it from here (the run read it from the folder it started in)."""
    from fedlora_ext.data.sources import looks_like_path

    path = Path(dataset).expanduser()
    if looks_like_path(dataset) and not path.is_absolute() and not path.exists():
        raise ValueError(f"the run's dataset {dataset!r} is a path relative to the folder the run started in, and "
                         f"it is not in {Path.cwd()}; pass --dataset with its path from here")
    return dataset


def evaluate_path(path: str | Path, dataset: str | None = None, *, changes: dict | None = None,
                  client: int | None = None, device: str = "auto") -> dict:
    """Loss and accuracy (causal LM: loss and perplexity; SFT: also, for short answers, exact match) of
    a merged export, a peft export or a run folder's global model (client ``client``'s own with
    ``client``) on ``dataset`` (None: the run's own), tokenised as a run tokenises it: its own test split
    when it has one; else, when it is the run's dataset, the rows the run held out, else all its rows;
    ``synthetic``: the test set a run with the same settings evaluates on. ``changes`` are FedConfig keys
    (``--set``) over the run's (an export's run's) settings; returns the scores with ``line`` for the
    command line."""
    changes = dict(changes or {})
    with quiet_progress():
        loaded = load_for_evaluation(path, client=client, device=device, changes=changes)
        if dataset is None:
            if loaded.run_dataset is None:
                raise ValueError(f"--dataset is needed: {path} is a {loaded.kind} without a run behind it (no "
                                 f"{EXPORT_INFO}), so it has no dataset of its own")
            dataset = _run_dataset_here(loaded.run_dataset)
        held_by = None
        if loaded.run_dataset is not None and _same_dataset(dataset, loaded.run_dataset):
            moved = [k for k in ("seed", "eval_fraction", "max_examples")  # another split than the run's
                     if k in changes and changes[k] != getattr(loaded.config, k)]
            held_by = f"a run with --set {', '.join(moved)}" if moved else "the run"
        config = loaded.config.replace(**{**changes, "dataset": dataset, "out_dir": None})
        if dataset != "synthetic":
            check_seq_len(loaded.base, config.seq_len)
            vocab = loaded.model.get_input_embeddings().num_embeddings
            if loaded.tokenizer is not None and len(loaded.tokenizer) > vocab:
                raise ValueError(f"the tokenizer has {len(loaded.tokenizer)} tokens, the model's vocabulary {vocab}: "
                                 "they do not belong together")
        num_labels = getattr(loaded.model.config, "num_labels", None) if config.task == "classification" else None
        data, what = evaluation_data(config, loaded.tokenizer, loaded.label_names, num_labels, held_by=held_by)
        scores = evaluate(loaded.model, data, config.batch_size * 4)
    keys = ("loss", "accuracy", "perplexity", "exact_match")
    result = {"model": str(path), "kind": loaded.kind, "dataset": dataset, "task": config.task, "split": what,
              "examples": len(data), "seq_len": config.seq_len, **{k: float(scores[k]) for k in keys if k in scores}}
    shown = ", ".join(f"{k} {result[k]:.4f}" for k in keys if k in result)
    result["line"] = f"{shown} on {what} ({loaded.kind} {path})"
    return result


#: marks a scores file `fedlora evaluate --json` wrote (the one file --overwrite may replace)
WRITTEN_BY = "fedlora evaluate"
_SCORE_KEYS = ("model", "kind", "dataset", "split", "examples")


def check_json_out(path: str | Path, overwrite: bool) -> None:
    """Refuses ``--json PATH`` before anything is scored: a folder, a file without ``overwrite``, or (with
    it) a file that is not an earlier `fedlora evaluate --json` result: other files are never replaced."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    above = next(p for p in path.absolute().parents if p.exists())  # the folder it goes into, or a file
    if not above.is_dir():
        raise ValueError(f"--json {path}: {above} is a file, not a folder; choose another path")
    if not (path.exists() or path.is_symlink()):
        return
    earlier = _read_json(path) if path.is_file() and not path.is_symlink() else None
    ours = earlier is not None and (earlier.get("written_by") == WRITTEN_BY or set(_SCORE_KEYS) <= set(earlier))
    if not ours:
        raise ValueError(f"--json {path} exists and is not a scores file of `fedlora evaluate`; not touching it, "
                         "--overwrite or not: choose another path")
    if not overwrite:
        raise ValueError(f"--json {path} exists (scores of an earlier `fedlora evaluate`); pass --overwrite to replace "
                         "it, or choose another path")


def write_json_scores(path: str | Path, result: dict, overwrite: bool) -> None:
    """The scores as JSON at ``path``, through a new file beside it and a rename: a reader never sees half
    a file, and nothing else is touched (checked again: a file may have come while the model was scored)."""
    path = Path(path)
    check_json_out(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**result, "written_by": WRITTEN_BY}, indent=2) + "\n"
    for n in itertools.count(os.getpid()):
        temporary = path.with_name(f".{path.name}.{n}.tmp")
        try:
            with temporary.open("x") as file:  # exclusive: never an existing file
                file.write(text)
        except FileExistsError:
            continue
        break
    try:
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
