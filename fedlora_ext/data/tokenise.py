"""Stage 5 of the data pipeline, tokenising: the split rows as ``datasets`` tables, tokenised for the
model when a tokenizer is given (once per run: cached in the run folder under the fingerprint's key).

* classification and plain documents (:func:`tokenize`): the text, truncated and padded to ``seq_len``;
  the target is the class, or (causal LM) the tokens themselves;
* SFT (:func:`tokenize_sft`): the rendered prompt (:func:`fedlora_ext.data.prompts.render_prompt`), then
  the response and an end token, the loss on the response only; too long responses are dropped, counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora_ext.data.prompts import end_token_id, leading_special_ids, render_prompt, split_prefix


@dataclass
class Tokens:
    """How to tokenise: the tokenizer and where it was loaded from, ``seq_len``, the task (``classification``,
    ``causal_lm`` or ``sft``), the folder of the token caches (None: none) and the splits to tokenise."""

    tokenizer: object
    source: str
    seq_len: int
    task: str
    cache_dir: str | Path | None = None
    splits: tuple[str, ...] = ("train", "test")


def tokenise(rows, train: list, test: list, tokens: Tokens | None = None, cache_key: str | None = None) -> dict:
    """split -> (table, rows dropped) for ``train`` and ``test`` rows of cleaned ``rows``
    (:class:`fedlora_ext.data.clean.Rows`): untokenised tables (``text``, ``label``; SFT: ``prompt``,
    ``response``, ``category``, ``format``) without ``tokens``, else the splits ``tokens.splits`` tokenised."""
    out = {}
    for split, part in (("train", train), ("test", test)):
        table = _table(rows, part)
        if tokens is None:
            out[split] = (table, 0)
        elif split in tokens.splits:
            cache = _cache_file(tokens.cache_dir, split, cache_key)
            if rows.kind == "sft":
                out[split] = tokenize_sft(table, tokens.tokenizer, tokens.seq_len, cache)
            else:
                out[split] = (tokenize(table, tokens.tokenizer, tokens.seq_len, tokens.task, cache), 0)
    return out


def _cache_file(folder, split: str, key: str | None) -> Path | None:
    """A per-run token cache, named by the key of everything that decides its content."""
    if folder is None or key is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{split}-{key}.arrow"


def _table(rows, part: list):
    """A ``datasets.Dataset`` of split rows."""
    import datasets

    if rows.kind == "sft":
        return datasets.Dataset.from_dict(
            {"prompt": [r[0] for r in part], "response": [r[1] for r in part], "category": [int(r[2]) for r in part],
             "format": [rows.format] * len(part)},
            features=datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                        "category": datasets.Value("int64"), "format": datasets.Value("string")}))
    if rows.kind == "documents":
        return datasets.Dataset.from_dict({"text": list(part), "label": [0] * len(part)},
                                          features=datasets.Features({"text": datasets.Value("string"),
                                                                      "label": datasets.Value("int64")}))
    return datasets.Dataset.from_dict({"text": [t for t, _ in part], "label": [i for _, i in part]})


def tokenize(data, tokenizer, seq_len: int, task: str, cache_file: str | Path | None = None):
    """``input_ids``, ``attention_mask``, ``labels`` (the class; for a causal LM the tokens, padding
    ignored) and ``label`` as torch tensors, padded to ``seq_len``; cached in ``cache_file`` if given."""

    def encode(batch):
        # plenty for seq_len tokens; long articles tokenise slowly
        heads = [text[: seq_len * 16] for text in batch["text"]]
        out = tokenizer(heads, truncation=True, max_length=seq_len, padding="max_length")
        if task == "causal_lm":
            out["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                             for ids, mask in zip(out["input_ids"], out["attention_mask"])]
        else:
            out["labels"] = batch["label"]
        return out

    kwargs = {"cache_file_name": str(cache_file)} if cache_file is not None else {"keep_in_memory": True}
    encoded = data.map(encode, batched=True, remove_columns=["text"], desc="tokenising", **kwargs)
    columns = ["input_ids", "attention_mask", "labels", "label"]
    return encoded.with_format("torch", columns=columns)


def tokenize_sft(data, tokenizer, seq_len: int, cache_file: str | Path | None = None):
    """A split of :class:`SFTData` tokenised for a causal LM, and the number of examples dropped.

    Columns (torch format): ``input_ids`` (prompt tokens then response tokens then one end token, right-padded
    to ``seq_len`` with the pad token, or the end token when there is none), ``attention_mask``, ``labels``
    (-100 on the prompt and the padding; the response tokens and the end token are the targets, at their own
    positions: the model shifts them), ``label`` (the category id, for partitioning), ``prompt_len`` (prompt
    tokens kept: the response starts at that position) and ``response_len`` (targets, the end token included).

    The prompt is :func:`render_prompt`'s text, tokenised with the tokenizer's leading special tokens (its BOS,
    or BERT's ``[CLS]``; not its trailing ones such as ``[SEP]``) unless the text already starts with the BOS
    (as chat templates write it: then it is that BOS). The response is tokenised separately with
    ``add_special_tokens=False`` and ends with :func:`end_token_id`. Truncation keeps the response: the prompt
    is cut from the LEFT (its last tokens are kept; the leading special tokens stay while at least one prompt
    token fits beside them; prompts longer than ``16 * seq_len`` characters are first cut to their last
    ``16 * seq_len`` characters, which is plenty for ``seq_len`` tokens). An example whose response with its
    end token is longer than ``seq_len - 1`` tokens (at least one prompt token is kept) is dropped and counted.
    Cached in ``cache_file`` if given (``datasets``' ``cache_file_name``).

    Raises:
        ValueError: ``seq_len`` below 2, ``data`` without the columns of an :class:`SFTData` split, or a
            tokenizer without an eos or sep token.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}: SFT needs at least 2 positions (a prompt token and a response "
                         "token)")
    missing = [c for c in ("prompt", "response", "category", "format") if c not in data.column_names]
    if missing:
        raise ValueError(f"data: column(s) {missing} missing (columns {data.column_names}); expected a split of "
                         "load_sft's SFTData (prompt, response, category, format)")
    end = end_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    lead = leading_special_ids(tokenizer)
    chars = seq_len * 16

    def encode(batch):
        prefixes, bodies = [], []
        for prompt, fmt in zip(batch["prompt"], batch["format"]):
            prefix, text = split_prefix(render_prompt(prompt, tokenizer, fmt), tokenizer, lead)
            prefixes.append(prefix)
            bodies.append(text[-chars:] if len(text) > chars else text)
        body_ids = tokenizer(bodies, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(list(batch["response"]), add_special_tokens=False)["input_ids"]
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", "label", "prompt_len", "response_len")}
        for prefix, body, response, category in zip(prefixes, body_ids, response_ids, batch["category"]):
            target = list(response) + [end]
            if len(target) > seq_len - 1:
                continue  # dropped: counted by the caller from the row counts
            budget = seq_len - len(target)
            prompt = list(prefix) + list(body)
            if len(prompt) > budget:
                prompt = (list(prefix) + list(body[len(body) - (budget - len(prefix)):])
                          if len(prefix) < budget else prompt[len(prompt) - budget:])
            padding = seq_len - len(prompt) - len(target)
            out["input_ids"].append(prompt + target + [pad] * padding)
            out["attention_mask"].append([1] * (len(prompt) + len(target)) + [0] * padding)
            out["labels"].append([-100] * len(prompt) + target + [-100] * padding)
            out["label"].append(int(category))
            out["prompt_len"].append(len(prompt))
            out["response_len"].append(len(target))
        return out

    import datasets

    ids = datasets.List(datasets.Value("int64"))
    columns = ["input_ids", "attention_mask", "labels", "label", "prompt_len", "response_len"]
    features = datasets.Features({c: ids if c in columns[:3] else datasets.Value("int64") for c in columns})
    kwargs = {"cache_file_name": str(cache_file)} if cache_file is not None else {"keep_in_memory": True}
    encoded = data.map(encode, batched=True, remove_columns=data.column_names, features=features,
                       desc="tokenising", **kwargs)
    return encoded.with_format("torch", columns=columns), len(data) - len(encoded)
