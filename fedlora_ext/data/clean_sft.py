"""Part of stage 2 (cleaning) for instruction records: each row of an SFT format becomes (prompt,
response, category value), and nothing is dropped silently. An empty or missing response or prompt (or
category) is refused with the row numbers, or dropped and counted under ``drop_invalid_rows``; malformed
chat messages and non-text ``input`` cells are always refused. Integer cells (a CSV column of numbers) are
read as their decimal text, with a note.

The ``prompt`` kept is the prompt as given, not yet templated: the text itself (``prompt_response``,
``question_answer``), the JSON object ``{"instruction", "input"}`` (``alpaca``; ``input`` ``""`` when
absent) or the JSON list of the prompt messages, each ``{"role", "content"}`` (``chat``)."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping

from fedlora_ext.data.labels import label_missing, rows_where, refuse_unless, valid
from fedlora_ext.data.prompts import CHAT_ROLES, FORMAT_COLUMNS


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


def sft_rows(raw_parts: dict[str, dict[str, list]], fmt: str, what: str, category_column: str | None,
             class_names, drop: bool) -> tuple[dict[str, list], list[str]]:
    """split -> [(prompt, response, category value)] of the raw columns, checked, and notes.

    Raises:
        ValueError: malformed chat messages, a non-text ``input``, or rows with an empty or missing response,
            prompt or category (unless ``drop``), in one line with the row numbers.
    """
    several = len(raw_parts) > 1
    prompt_column, response_column = {"chat": ("messages", "messages"), "alpaca": ("instruction", "output"),
                                      "prompt_response": ("prompt", "response"),
                                      "question_answer": ("question", "answer")}[fmt]
    no_response, no_prompt, no_category, non_text_input, malformed, integers = [], [], [], [], [], set()
    parts: dict[str, list] = {}
    for split, columns in raw_parts.items():
        size = len(columns[FORMAT_COLUMNS[fmt][0]])
        categories = columns[category_column] if category_column is not None else [None] * size
        rows = []
        for i in range(size):
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
            if category_column is not None and label_missing(categories[i], class_names):
                no_category.append(where)
            rows.append((prompt, response, categories[i]))
        parts[split] = rows
    if malformed:
        (split, i), why = malformed[0]
        first = f"{split}:{i + 1}" if several else str(i + 1)
        raise ValueError(f"{what}: {len(malformed)} row(s) have malformed chat messages in column 'messages' "
                         f"({rows_where([w for w, _ in malformed], several)}); row {first}: {why}; each row must be a "
                         "list of {role, content} with roles system/user/assistant, the last one the assistant's")
    if non_text_input:
        raise ValueError(f"{what}: {len(non_text_input)} row(s) have a non-text value in column 'input' "
                         f"({rows_where(non_text_input, several)}); expected text (or an empty cell)")
    notes = [f"column {c!r} holds integers; read as their decimal text" for c in sorted(integers)]
    if not (no_response or no_prompt or no_category):
        return parts, notes
    kind = "prompt messages" if fmt == "chat" else "prompt"
    refuse_unless(drop, what, [
        (no_response, f"an empty, missing or non-text response in column {response_column!r}"),
        (no_prompt, f"an empty, missing or non-text {kind} in column {prompt_column!r}"),
        (no_category, f"an empty or missing category in category_column {category_column!r}")], several)
    bad = set(no_response) | set(no_prompt) | set(no_category)
    total = sum(len(rows) for rows in parts.values())
    kept = {split: valid(split, rows, bad) for split, rows in parts.items()}
    notes.append(f"dropped {len(bad)} of {total} rows with an empty or missing response, prompt or category "
                 f"(drop_invalid_rows): {len(no_response)} without a response, {len(no_prompt)} without a prompt, "
                 f"{len(no_category)} without a category")
    return kept, notes

