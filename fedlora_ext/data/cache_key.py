"""Keys of the per-run token caches, made of everything that decides the tokens: the data's content
(every text and label id of each split), the tokenizer (class, name or path, vocabulary size, pad token,
and the bytes of its files in a local folder), the settings that change tokens (seq_len, task) and the
library versions. Editing a data file, or swapping a tokenizer in place, gives another key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: bump when :func:`fedlora_ext.data.text.tokenize` changes what it writes
TOKENIZE_FORMAT = 2
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
