"""Stage 4 of the data pipeline, fingerprinting: SHA-256 digests of the split rows, by which a resumed run
knows its data is unchanged, and the key of the per-run token caches.

* ``data``: the content (every text and label id, or prompt, response and category id, of each split, and
  the names of the ids; length-prefixed, so no two contents hash alike by concatenation);
* ``content`` (``Task.fingerprint``): ``data`` with what else decides the tokens' meaning (the label names
  in the model's order; for SFT the tokenizer's chat template and the SFT token format);
* ``cache_key``: ``content`` with the tokenizer (class, name or path, vocabulary size, pad token, and the
  bytes of its files in a local folder), seq_len, task, token format and library versions. Editing a data
  file, or swapping a tokenizer in place, gives another key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

#: bump when :func:`fedlora_ext.data.tokenise.tokenize` changes what it writes
TOKENIZE_FORMAT = 2
#: bump when :func:`fedlora_ext.data.tokenise.tokenize_sft` changes what it writes (SFT runs' content)
SFT_TOKENIZE_FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def content_digest(splits: dict[str, tuple[list[str], list[int]]], label_names: list[str]) -> str:
    """SHA-256 of the label names and of each split's texts and label ids, in order (length-prefixed, so
    no two different contents hash alike by concatenation)."""
    digest = hashlib.sha256()

    def put(text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    put(json.dumps(label_names))
    for split in sorted(splits):
        texts, labels = splits[split]
        put(f"split {split} {len(texts)}")
        for text in texts:
            put(text)
        put(json.dumps([int(v) for v in labels]))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer, source: str) -> dict:
    """What identifies a tokenizer's output: its class, name or path, size, pad token, sides, limits, and
    a hash of its files when ``source`` is a local folder."""
    files = {}
    folder = Path(source)
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                files[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return {
        "class": type(tokenizer).__qualname__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", source)),
        "size": len(tokenizer),
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
        "files": files,
    }


def token_cache_key(data_digest: str, tokenizer, source: str, *, seq_len: int, task: str) -> str:
    """A short hex key for the token cache of one data content, tokenizer and setting."""
    import datasets
    import transformers

    key = json.dumps({"data": data_digest, "tokenizer": tokenizer_fingerprint(tokenizer, source), "seq_len": seq_len,
                      "task": task, "format": TOKENIZE_FORMAT,
                      "versions": [transformers.__version__, datasets.__version__]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Fingerprint(NamedTuple):
    """The digests of one prepared dataset (see the module docstring); ``cache_key`` is None without a
    tokenizer."""

    data: str
    content: str
    cache_key: str | None


def fingerprint(rows, train: list, test: list, tokens=None) -> Fingerprint:
    """The digests of cleaned ``rows`` (:class:`fedlora_ext.data.clean.Rows`) split into ``train`` and
    ``test``; ``tokens`` (:class:`fedlora_ext.data.tokenise.Tokens`, or None) adds the token cache key."""
    if rows.kind == "sft":
        data = sft_fingerprint({"train": train, "test": test}, rows.format, rows.data_names)
        template = (getattr(tokens.tokenizer, "chat_template", None) or "") if tokens is not None else ""
        content = hashlib.sha256(json.dumps([data, template, SFT_TOKENIZE_FORMAT]).encode()).hexdigest()
    else:
        data = content_digest({"train": _in_data_order(rows, train), "test": _in_data_order(rows, test)},
                              rows.data_names)
        content = hashlib.sha256(json.dumps([data, rows.names]).encode()).hexdigest()
    key = None if tokens is None else token_cache_key(content, tokens.tokenizer, tokens.source,
                                                      seq_len=tokens.seq_len, task=tokens.task)
    return Fingerprint(data, content, key)


def _in_data_order(rows, split: list) -> tuple[list[str], list[int]]:
    """(texts, label ids in the data's own name order) of classification rows or plain documents (ids 0)."""
    if rows.kind == "documents":
        return list(split), [0] * len(split)
    back = {i: rows.data_names.index(n) for i, n in enumerate(rows.names) if n in rows.data_names}  # model -> data
    return [t for t, _ in split], [back[i] for _, i in split]


def sft_fingerprint(splits: dict[str, list[tuple[str, str, int]]], fmt: str, category_names: list[str]) -> str:
    """SHA-256 (:func:`content_digest`) of the format, the category names and each split's (prompt,
    response) pairs (each as the JSON pair, so no two contents hash alike) and category ids."""
    return content_digest({split: ([json.dumps([p, r], ensure_ascii=False) for p, r, _ in rows],
                                   [c for _, _, c in rows]) for split, rows in splits.items()},
                          [f"sft format {fmt}", *category_names])
