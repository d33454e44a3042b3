"""``fedlora export``: a run's model as a folder that peft / transformers load.

Export rebuilds the run's model without reading its data: the :class:`FedConfig` of ``config.json``, the
base model (the run's ``base_model/`` for the built-in tiny models, else the model folder of its config;
the head sized by ``labels.json``), a :class:`ModelBench`, the strategy, and the state of the run's last
checkpoint. The global model is then exactly what the run evaluated
(:func:`fedlora_ext.federated.simulation.global_model`), and client K's own model what the run evaluated
for K after its last round (:func:`fedlora_ext.federated.simulation.client_model`). A Flower run's
checkpoint holds the server's state (its clients' state lives on the nodes): its global model only; a run
without a checkpoint has its global model rebuilt from ``adapter.safetensors`` (global tensors and FLoRA /
FedEx-LoRA's ``base_delta.<module>``).

Formats:

* ``peft``: ``save_pretrained`` of the peft model (``adapter_config.json`` + ``adapter_model.safetensors``
  in peft's own names; a classification head rides in ``modules_to_save``), with ``base_model_name_or_path``
  naming the base folder. Refused for FLoRA / FedEx-LoRA: their global model includes updates merged
  into the base weights, which no adapter carries.
  Fed-SB's update s B R A is carried exactly as an ordinary adapter with B' = B R (``adapters.fold_latent``).
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

import copy
import itertools
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fedlora_ext.app.run_models import (
    ADAPTER_FILE,
    LABELS,
    RunModels,
    check_client,
    load_run,
    quiet_progress,
    read_json,
    read_run_config,
)
from fedlora_ext.core import adapters
from fedlora_ext.core.device import base_dtype
from fedlora_ext.federated.checkpoint import INDEX
from fedlora_ext.federated.simulation import BASE_MODEL, label_maps, save_base_model
from fedlora_ext.strategies.base import make_strategy

FORMATS = ("peft", "merged")
#: what an export says about itself: format, run, method, client, base, notes, the run's config
EXPORT_INFO = "fedlora_export.json"
#: the ids generation needs (eos: the token training ended answers with; pad), as transformers reads them
GENERATION = "generation_config.json"
#: how training built an SFT prompt (format, template, special ids, end token)
PROMPT = "prompt_template.json"


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
    info = read_json(out / EXPORT_INFO)
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
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "peft" and strategy.merges_base:
        raise ValueError(f"method {config.method!r} merges client updates into the base weights, so its model is "
                         "a new base, not an adapter over the original one; export it with --format merged")
    check_client(run_dir, config, strategy, client)
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

    from fedlora_ext.data.prompts import end_token_id, leading_special_ids

    ids = {"eos_token_id": end_token_id(run.tokenizer), "pad_token_id": run.tokenizer.pad_token_id}
    lead = leading_special_ids(run.tokenizer)
    if len(lead) == 1:
        ids["bos_token_id"] = lead[0]
    own = getattr(model, "generation_config", None)  # the base's sampling defaults stay
    generation = copy.deepcopy(own) if own is not None else GenerationConfig()
    generation.update(**ids)
    generation._from_model_config = False  # ours, not derived from config.json: generate() keeps it as is
    return generation


def sft_format(config, run_dir: Path) -> str | None:
    """An SFT run's format, from the note its data.json keeps ("<format> format; ..."); None if unknown."""
    from fedlora_ext.data.prompts import FORMATS, PACKAGED_INSTRUCTIONS

    if config.dataset in PACKAGED_INSTRUCTIONS:
        return "prompt_response"
    notes = (read_json(Path(run_dir) / "data.json") or {}).get("notes") or [""]
    first = str(notes[0]).split(" ", 1)[0]
    return first if first in FORMATS and str(notes[0]).startswith(f"{first} format") else None


def _write(run: RunModels, model: nn.Module, fmt: str, client: int | None, folder: Path, out: Path) -> dict:
    config = run.config
    notes = list(run.notes)
    base_source = run.base_source
    generation = _generation(run, model)
    adapters.fold_latent(model)  # Fed-SB's s B R A as an ordinary adapter, B' = B R (no-op for other methods)
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
        from fedlora_ext.data.prompts import prompt_template

        info["prompt_template"] = prompt_template(sft_format(config, run.run_dir), run.tokenizer, config.dataset)
        (folder / PROMPT).write_text(json.dumps(info["prompt_template"], indent=2))
        files.append(PROMPT)
    return {**info, "notes": notes, "config": config.to_dict()}

