"""``fedlora predict``: the label a classification run (or its export) gives each text of a file.

The model is loaded as ``fedlora evaluate`` loads it (:func:`fedlora_ext.app.evaluation.load_for_evaluation`).
The file is read by the run's own readers (CSV, JSONL, Parquet, .gz / .zst, a saved ``datasets`` folder; the
text column found by the same rules as in training, or ``--set text_column=...``); no label column is
needed and none is read. Texts are tokenised as training tokenised them (:func:`fedlora_ext.data.tokenise.
tokenize`, at the run's ``seq_len``) and scored in batches; the answer is one label name per row, in the
file's order (the model's argmax; a model without label names gives ``LABEL_<id>``, as transformers names
them). A row whose text is empty or not text is refused with its row number, not skipped: the n-th name is
always the n-th row's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora_ext.app.evaluation import load_for_evaluation
from fedlora_ext.app.output_file import check_output_file, write_through_rename
from fedlora_ext.app.run_models import quiet_progress
from fedlora_ext.core.device import autocast, model_device, to_device
from fedlora_ext.data.tiny_models import check_seq_len

#: the FedConfig keys (``--set``) that change what predict reads or how it tokenises
SETTINGS = ("text_column", "seq_len", "encoding", "batch_size")


def _label_names(loaded) -> list[str]:
    """The model's label names, in id order (``LABEL_<id>`` where it has none)."""
    classes = int(getattr(loaded.model.config, "num_labels", 0) or 0)
    names = list(loaded.label_names)
    if len(names) != classes:
        names = [f"LABEL_{i}" for i in range(classes)]
    return names


def read_texts(dataset: str, config) -> tuple[list[str], str]:
    """(every text of ``dataset`` in its order, what was read), through the pipeline's read and clean
    stages for plain documents: the text column only, bad texts refused with their row numbers."""
    from fedlora_ext.data.pipeline import unlabelled_documents

    raw, rows = unlabelled_documents(dataset, text_column=config.text_column, encoding=config.encoding)
    texts = [text for part in rows.parts.values() for text in part]
    if not texts:
        raise ValueError(f"--dataset {dataset!r} holds no rows to label")
    splits = [s for s in rows.parts if s != "data"]
    column = raw.columns.get("text")
    what = f"{len(texts)} rows of {dataset!r}" + (f" (column {column!r})" if column else "") + (
        f" (splits {', '.join(splits)}, in that order)" if len(splits) > 1 else "")
    return texts, what


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[int]:
    """The model's class id (argmax of its logits) for each text, tokenised as training tokenises."""
    import datasets

    from fedlora_ext.data.tokenise import tokenize

    table = datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)})
    rows = tokenize(table, tokenizer, seq_len, "classification")
    model.eval()
    ids = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs = to_device({k: batch[k] for k in ("input_ids", "attention_mask")}, model_device(model))
        with autocast(model):
            ids += model(**inputs).logits.argmax(-1).tolist()
    return ids


def predict_path(path: str | Path, dataset: str, *, changes: dict | None = None, client: int | None = None,
                 device: str = "auto") -> dict:
    """The label names the model of ``path`` (a run folder, client ``client``'s model, or an export) gives
    the rows of ``dataset``: ``labels`` (one per row, in order), ``names`` (the model's), and ``line`` saying
    what was labelled. ``changes``: FedConfig keys of :data:`SETTINGS` over the run's.

    Raises:
        ValueError: one line: not a classification model (use ``fedlora generate``), no tokenizer, a key
            predict does not read, the file's problems (no text column: the columns found; bad rows).
    """
    path, changes = Path(path), dict(changes or {})
    unused = [k for k in changes if k not in SETTINGS]
    if unused:
        raise ValueError(f"--set {', '.join(unused)}: predict reads only {', '.join(SETTINGS)} (it labels every "
                         "row of the file, as the run tokenised)")
    with quiet_progress():
        loaded = load_for_evaluation(path, client=client, device=device)
        if loaded.config.task != "classification":
            raise ValueError(f"{path} is a language model ({loaded.kind}, task {loaded.config.task}); it continues "
                             f"text, it has no labels: use `fedlora generate {path} --prompt TEXT`")
        if loaded.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer (its run trained on synthetic token ids, not text), so it "
                             "cannot read a file's texts")
        config = loaded.config.replace(**changes)
        check_seq_len(loaded.base, config.seq_len)
        texts, what = read_texts(dataset, config)
        names = _label_names(loaded)
        ids = predict_texts(loaded.model, loaded.tokenizer, texts, config.seq_len, config.batch_size * 4)
    return {"labels": [names[i] for i in ids], "names": names,
            "line": f"labelled {what} with {loaded.kind} {path} (seq_len {config.seq_len})"}


def check_labels_out(path: str | Path, names: list[str] | None, overwrite: bool) -> None:
    """Refuses ``--out PATH`` unless it is new or (with ``overwrite``) an earlier prediction: every line one of
    ``names`` (None before the model is loaded: any non-empty file of lines passes this first check)."""
    def earlier(file: Path) -> bool:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        return bool(lines) and (names is None or all(line in names for line in lines))

    check_output_file(path, "--out", overwrite, earlier, "the labels of an earlier `fedlora predict`")


def write_labels(path: str | Path, labels: list[str], names: list[str], overwrite: bool) -> None:
    check_labels_out(path, names, overwrite)
    write_through_rename(path, "".join(f"{label}\n" for label in labels))
