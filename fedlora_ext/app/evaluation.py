"""``fedlora evaluate``: the scores of an export (peft or merged), a transformers model folder or a run
folder's model on any dataset a run accepts, tokenised as a run tokenises it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlora_ext.app.export import EXPORT_INFO
from fedlora_ext.app.output_file import check_output_file, write_through_rename
from fedlora_ext.app.run_models import (
    ADAPTER_FILE,
    check_client,
    label_names_of,
    load_run,
    quiet_progress,
    read_json,
    read_run_config,
    tokenizer_for,
)
from fedlora_ext.core.config import FedConfig
from fedlora_ext.data.tiny_models import build_model, check_seq_len
from fedlora_ext.federated.checkpoint import INDEX
from fedlora_ext.federated.evaluate import evaluate
from fedlora_ext.strategies.base import make_strategy


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
    return tokenizer_for(config, folder)


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
    info = read_json(path / EXPORT_INFO) or {}
    is_peft = (path / "adapter_config.json").is_file()
    is_model = "model_type" in (read_json(path / "config.json") or {})
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
        names = label_names_of(path) or _config_labels(model.config)
        return Loaded(model, "merged export" if info else "model folder", names, tokenizer,
                      start.replace(task=task), str(path), run_dataset)
    config = read_run_config(path)
    strategy = make_strategy(config)
    if "task" in changes and (changes["task"] == "classification") != (config.task == "classification"):
        raise ValueError(f"task {changes['task']!r} does not fit the run's model (task {config.task!r})")
    if not (path / INDEX).is_file() and not (path / ADAPTER_FILE).is_file():
        raise ValueError(f"{path} holds no trained model yet (no {INDEX} or {ADAPTER_FILE}: no round has finished)")
    check_client(path, config, strategy, client)
    run = load_run(path, device=device)
    model = run.global_model() if client is None else run.client_model(client)
    from fedlora_ext.data.models import resolve_model

    base = run.base_source or resolve_model(config.model)
    return Loaded(model, "run folder" if client is None else f"run folder, client {client}", run.label_names,
                  run.tokenizer, run.config.replace(out_dir=None), base, config.dataset)


def _load_peft(path: Path, start: FedConfig, wanted: str | None, device: str, run_dataset: str | None) -> Loaded:
    import transformers as tf
    from peft import PeftConfig, PeftModel

    from fedlora_ext.core.device import resolve_device, resolve_dtype
    from fedlora_ext.data.quantized import peft_without_bitsandbytes
    from fedlora_ext.data.tiny_models import dequantized_model

    peft_config = PeftConfig.from_pretrained(str(path))
    base = peft_config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(f"{path}: its base_model_name_or_path {base!r} is not a model folder here (a peft adapter "
                         "needs its base model)")
    model_config = tf.AutoConfig.from_pretrained(base)
    classifier = str(getattr(peft_config, "task_type", "") or "").endswith("SEQ_CLS")
    task = _task_of(classifier, wanted, f"adapter {str(path)!r}")
    names = label_names_of(path)
    num_labels = len(names) if names else getattr(model_config, "num_labels", 2)
    if start.quantization != "none":  # adapters trained over a quantised base: over its weights, dequantised
        model = dequantized_model(base, task, num_labels, start.quantization, resolve_dtype(start.model_dtype))
    else:
        model = build_model(base, task, num_labels, dtype=None)
    tokenizer = _folder_tokenizer(start, str(path)) or _folder_tokenizer(start, base)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # the base is a float one: peft must not import bitsandbytes for it (fedlora_ext.data.quantized)
    with warnings.catch_warnings(), peft_without_bitsandbytes():  # and transformers 5 deprecates what peft calls
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(path))
    model.to(resolve_device(device)).eval()
    return Loaded(model, "peft export", names or _config_labels(model.config), tokenizer, start.replace(task=task),
                  base, run_dataset)


def evaluation_data(config: FedConfig, tokenizer, label_names: list[str], num_labels: int | None, *,
                    held_by: str | None = None):
    """(tokenised rows, what they are, naming the dataset): its own test split when it has one; else, with
    ``held_by`` (the run's own dataset: who held the rows out, "the run"), exactly the rows a run of
    ``config`` holds out (its seeded ``eval_fraction`` split: the run's data pipeline with the run's split
    settings), else all its rows; for ``synthetic`` the test set a run of ``config`` evaluates on. Class ids
    follow the model's labels."""
    from fedlora_ext.data.pipeline import DataSpec, Tokens, prepare
    from fedlora_ext.data.synthetic import synthetic_dataset

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
    source = getattr(tokenizer, "name_or_path", "") or ""
    tokens = Tokens(tokenizer, source, config.seq_len, task, splits=("test",) if held_by else ("train", "test"))
    labels = (lambda names: _follow_labels(names, label_names, num_labels, name)) if task == "classification" else None
    data = prepare(DataSpec.of(config), tokens, labels=labels)
    rows, dropped, what = _rows_to_score(data, name, config, held_by)
    if task != "sft":
        return rows, what
    if dropped:
        what += f"; {dropped} whose response does not fit seq_len {config.seq_len} left out"
    if not len(rows):
        raise ValueError(f"dataset {name!r}: no example fits seq_len {config.seq_len}; raise it with --set seq_len=N")
    return rows, what


def _rows_to_score(data, name: str, config: FedConfig, held_by: str | None):
    """(tokenised rows, how many tokenising dropped, what they are) of prepared data: its own test split, the
    run's held-out rows, or all rows."""
    import datasets

    if data.eval_split.startswith("the dataset's own"):
        return data.test, data.dropped["test"], f"{data.eval_split} of {name!r} ({data.counts['test']} examples)"
    if held_by:
        return data.test, data.dropped["test"], (f"the {data.counts['test']} rows {held_by} held out of {name!r} "
                                                 f"(eval_fraction {config.eval_fraction}, seed {config.seed}; it has "
                                                 "no test split)")
    rows = datasets.concatenate_datasets([data.train, data.test]).with_format(
        "torch", columns=data.test.format["columns"])
    kept = "" if config.max_examples is None else f" kept by max_examples {config.max_examples}"
    total, dropped = (sum(counts.values()) for counts in (data.counts, data.dropped))
    return rows, dropped, f"all {total} rows of {name!r}{kept} (it has no test split)"


def _follow_labels(data_names: list[str], model_names: list[str], num_labels: int | None, name: str):
    """(the names the class ids follow, notes): the model's labels (by name) when it has named labels, else
    the data's own."""
    if model_names:
        unknown = [n for n in data_names if n not in model_names]
        if unknown:
            raise ValueError(f"dataset {name!r} has label(s) {unknown[:5]} the model does not know (its labels: "
                             f"{model_names[:10]})")
        return list(model_names), []
    if num_labels is not None and len(data_names) > num_labels:
        raise ValueError(f"dataset {name!r} has {len(data_names)} labels, the model {num_labels}")
    return data_names, []


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
    def ours(file: Path) -> bool:
        earlier = read_json(file)
        return earlier is not None and (earlier.get("written_by") == WRITTEN_BY or set(_SCORE_KEYS) <= set(earlier))

    check_output_file(path, "--json", overwrite, ours, "a scores file of `fedlora evaluate`")


def write_json_scores(path: str | Path, result: dict, overwrite: bool) -> None:
    """The scores as JSON at ``path``, through a new file beside it and a rename: a reader never sees half
    a file, and nothing else is touched (checked again: a file may have come while the model was scored)."""
    path = Path(path)
    check_json_out(path, overwrite)
    write_through_rename(path, json.dumps({**result, "written_by": WRITTEN_BY}, indent=2) + "\n")

