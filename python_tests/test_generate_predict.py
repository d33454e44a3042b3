"""`fedlora generate` and `fedlora predict`: what a trained run (or its export) says.

Tiny runs made once per module (tiny-gpt2 SFT and plain text, tiny-bert classification, FedSA-LoRA),
read with the packaged MiniLM tokenizer. The oracles are independent of fedlora's loaders: the merged
export loaded with transformers' ``AutoModel...from_pretrained``, the prompt written out literally as the
run's template, ``model.generate`` / the logits' argmax. Command lines run ``python -m fedlora_ext`` from
tmp_path (the checkout's fedlora_ext/ without _C would shadow the installed one), or ``cli.main`` in-process
where only the error line is checked.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from fedtools import fedlora
from fedtools import one_thread  # noqa: F401 (autouse: one intra-op thread on the shared cores)

from fedlora_ext.app import cli
from fedlora_ext.app.export import export_run
from fedlora_ext.app.generate import Sampling, complete, generate_path, load_generator
from fedlora_ext.app.predict import predict_path
from fedlora_ext.federated import FedConfig, Simulation

WORDS = ["red", "blue", "green", "cat", "dog", "sun"]
TOPICS = {"sport": "match goal team win", "tech": "chip code data model", "food": "bread soup salt cake"}
TARGETS = {"tiny-bert": ("query", "value"), "tiny-gpt2": ("c_attn",)}
NEW = 8  # new tokens per prompt in these tests


def run(folder: Path, model: str, task: str, dataset: str, method: str = "fedit", **changes) -> Path:
    values = {"method": method, "model": model, "task": task, "dataset": dataset, "target_modules": TARGETS[model],
              "rank": 4, "alpha": 8.0, "num_clients": 2, "rounds": 1, "local_steps": 2, "batch_size": 8, "lr": 3e-2,
              "seq_len": 24, "dirichlet_alpha": None, "seed": 0, "device": "cpu", "out_dir": str(folder)}
    values.update(changes)
    torch.manual_seed(0)
    Simulation(FedConfig(**values)).run(progress=False)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate-predict")


@pytest.fixture(scope="module")
def sft(root) -> dict[str, Path]:
    """A tiny-gpt2 SFT run on prompt/response rows and its merged and peft exports."""
    data = root / "words.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Repeat the word: {WORDS[i % 6]}.", "response": WORDS[i % 6]})
                              for i in range(40)))
    folder = run(root / "sft", "tiny-gpt2", "sft", str(data))
    export_run(folder, "merged", root / "sft-merged")
    export_run(folder, "peft", root / "sft-peft")
    return {"run": folder, "merged": root / "sft-merged", "peft": root / "sft-peft"}


@pytest.fixture(scope="module")
def plain(root) -> dict[str, Path]:
    """A tiny-gpt2 plain-text (causal_lm) run and its merged export."""
    data = root / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the {WORDS[i % 6]} {WORDS[(i + 1) % 6]} is here"})
                              for i in range(40)))
    folder = run(root / "plain", "tiny-gpt2", "causal_lm", str(data))
    export_run(folder, "merged", root / "plain-merged")
    return {"run": folder, "merged": root / "plain-merged"}


def topic_rows(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    names = sorted(TOPICS)
    rows = []
    for _ in range(n):
        label = names[int(torch.randint(3, (1,), generator=generator))]
        words = TOPICS[label].split()
        rows.append({"text": " ".join(words[int(i)] for i in torch.randint(4, (6,), generator=generator)),
                     "label": label})
    return rows


@pytest.fixture(scope="module")
def classifier(root) -> dict[str, Path]:
    """A tiny-bert classification run on labelled topics, its exports, and a file of texts to label (no
    label column, the text in column 'body')."""
    data = root / "topics.csv"
    with data.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["text", "label"])
        writer.writeheader()
        writer.writerows(topic_rows(48, 0))
    folder = run(root / "bert", "tiny-bert", "classification", str(data), seq_len=12, rounds=2, local_steps=6,
                 lr=5e-2, batch_size=16)  # enough to give more than one label
    export_run(folder, "merged", root / "bert-merged")
    export_run(folder, "peft", root / "bert-peft")
    unlabelled = root / "unlabelled.csv"
    with unlabelled.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["id", "body"])
        writer.writeheader()
        writer.writerows({"id": i, "body": r["text"] + " extra words" * (i % 3)} for i, r in enumerate(topic_rows(20, 1)))
    return {"run": folder, "merged": root / "bert-merged", "peft": root / "bert-peft", "data": data,
            "unlabelled": unlabelled}


@pytest.fixture(scope="module")
def fedsa(root, classifier) -> Path:
    return run(root / "fedsa", "tiny-bert", "classification", str(classifier["data"]), method="fedsa_lora",
               seq_len=12, local_steps=3)


def unlabelled_texts(path: Path) -> list[str]:
    with path.open(newline="") as file:
        return [row["body"] for row in csv.DictReader(file)]


# ---- oracles: transformers alone, on the merged export ---------------------------------------------------
def manual_generate(merged: Path, prompt_text: str, new: int = NEW) -> str:
    """Greedy generation with transformers on the merged export: [CLS] (the MiniLM tokenizer's leading
    special token, which training put first), the prompt text, stopped at [SEP] (the end token training
    appended to every answer), decoded without special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = [tokenizer.cls_token_id] + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                             do_sample=False, eos_token_id=tokenizer.sep_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, len(ids):].tolist()
    if tokenizer.sep_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.sep_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def manual_labels(merged: Path, texts: list[str], seq_len: int) -> list[str]:
    """The merged export's argmax label names, with transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    batch = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ids = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    return [model.config.id2label[int(i)] for i in ids]


# ---- the command line in-process -----------------------------------------------------------------------------------------
def main_ok(capsys, *args) -> tuple[str, str]:
    """``fedlora ARGS`` in-process, exit status 0: (stdout, stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out, err


def main_error(capsys, *args) -> str:
    """``fedlora ARGS`` in-process: exit status 2 and one ``fedlora: error:`` line, nothing on stdout."""
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert not out and len(lines) == 1 and lines[0].startswith("fedlora: error: "), err
    return lines[0]


# ---- generate ------------------------------------------------------------------------------------------------
def test_greedy_sft_equals_transformers_generate_with_the_template(sft):
    prompts = ["Repeat the word: red.", "Repeat the word: {dog}!", "what"]
    ours = generate_path(sft["run"], prompts, Sampling(NEW), device="cpu")
    again = generate_path(sft["run"], prompts, Sampling(NEW), device="cpu")
    assert ours == again  # greedy is deterministic
    for prompt, record in zip(prompts, ours):
        assert record["prompt"] == prompt
        assert record["completion"] == manual_generate(sft["merged"], f"### Instruction:\n{prompt}\n\n### Response:\n")
        assert record["completion"].strip() and prompt not in record["completion"]  # the prompt is stripped
    for export in ("merged", "peft"):  # an export generates what its run folder generates
        assert generate_path(sft[export], prompts, Sampling(NEW), device="cpu") == ours


def test_greedy_plain_text_continues_the_text(plain):
    prompts = ["the red blue", "sun dog"]
    ours = generate_path(plain["run"], prompts, Sampling(NEW), device="cpu")
    assert [r["completion"] for r in ours] == [manual_generate(plain["merged"], p) for p in prompts]
    assert generate_path(plain["merged"], prompts, Sampling(NEW), device="cpu") == ours


def test_sampling_with_a_seed_is_reproducible(sft):
    prompts = ["Repeat the word: red.", "Repeat the word: sun."]
    sampled = Sampling(16, temperature=1.0, top_p=0.95, seed=5)
    first = generate_path(sft["run"], prompts, sampled, device="cpu")
    assert first == generate_path(sft["run"], prompts, sampled, device="cpu")
    assert all(r["seed"] == 5 for r in first)
    # each prompt is seeded alone: the second prompt's sample does not depend on the first prompt
    assert generate_path(sft["run"], prompts[1:], sampled, device="cpu") == first[1:]
    other = generate_path(sft["run"], prompts, Sampling(16, temperature=1.0, top_p=0.95, seed=6), device="cpu")
    greedy = generate_path(sft["run"], prompts, Sampling(16), device="cpu")
    assert [r["completion"] for r in other] != [r["completion"] for r in first]
    assert [r["completion"] for r in greedy] != [r["completion"] for r in first]


def test_the_end_token_stops_generation(sft):
    """The untrained tiny model never picks [SEP] by itself; forced to at the third new token, generation
    stops there and the completion is the two tokens before it."""
    loaded, prompter = load_generator(sft["run"], device="cpu")
    prompts = ["Repeat the word: cat."]
    free = complete(loaded, prompter, prompts, Sampling(NEW))[0]
    assert free["finish_reason"] == "length" and free["tokens"] == NEW
    calls = []

    def end_third(module, args, kwargs, out):
        calls.append(kwargs["input_ids"].shape[1])
        if len(calls) == 3:  # the prompt's pass, then one pass per new token
            out.logits[:, -1, :] = -float("inf")
            out.logits[:, -1, prompter.end] = 0.0
        return out

    handle = loaded.model.get_base_model().register_forward_hook(end_third, with_kwargs=True)
    try:
        stopped = complete(loaded, prompter, prompts, Sampling(NEW))[0]
    finally:
        handle.remove()
    assert len(calls) == 3 and stopped["finish_reason"] == "end" and stopped["tokens"] == 2
    assert stopped["completion"] and free["completion"].startswith(stopped["completion"])  # the same first two
    assert prompter.end == prompter.tokenizer.sep_token_id  # the token training ended answers with


@pytest.mark.parametrize("fmt,prompt,row_prompt", [
    ("prompt_response", "Repeat the word: red.", "Repeat the word: red."),
    ("alpaca", "Is snow real?", json.dumps({"instruction": "Is snow real?", "input": ""})),
    ("alpaca", json.dumps({"instruction": "Is snow real?", "input": "in May"}),
     json.dumps({"instruction": "Is snow real?", "input": "in May"})),
    ("chat", "hello there", json.dumps([{"role": "user", "content": "hello there"}])),
    ("chat", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
     json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])),
])
def test_prompts_are_the_ids_training_built(sft, fmt, prompt, row_prompt):
    """A prompt's ids are exactly the prompt ids tokenize_sft gave a training row of that format."""
    import datasets
    from transformers import AutoTokenizer

    from fedlora_ext.app.generate import Prompter
    from fedlora_ext.data.prompts import end_token_id, leading_special_ids
    from fedlora_ext.data.tokenise import tokenize_sft

    tokenizer = AutoTokenizer.from_pretrained(sft["merged"])
    row = datasets.Dataset.from_dict({"prompt": [row_prompt], "response": ["ok"], "category": [0], "format": [fmt]})
    trained, _ = tokenize_sft(row, tokenizer, 64)
    prompter = Prompter(tokenizer, fmt, None, leading_special_ids(tokenizer), end_token_id(tokenizer))
    assert prompter.ids(prompt) == trained[0]["input_ids"][:int(trained[0]["prompt_len"])].tolist()


def test_a_packaged_corpus_run_puts_its_instruction_first(sft):
    from transformers import AutoTokenizer

    from fedlora_ext.app.generate import Prompter
    from fedlora_ext.data.prompts import prompt_template

    tokenizer = AutoTokenizer.from_pretrained(sft["merged"])
    template = prompt_template("prompt_response", tokenizer, "bbc_news")
    prompter = Prompter(tokenizer, "prompt_response", template["prompt"], [tokenizer.cls_token_id],
                        tokenizer.sep_token_id)
    text = "### Instruction:\nWhich topic is this article about? Answer with one word.\n\nShares rose.\n\n### Response:\n"
    assert prompter.ids("Shares rose.") == [tokenizer.cls_token_id] + tokenizer(text, add_special_tokens=False)[
        "input_ids"]


def test_generate_client_k_of_a_personalised_sft_run(sft, root, tmp_path):
    data = root / "words.jsonl"  # written by the sft fixture
    folder = run(root / "fedsa-sft", "tiny-gpt2", "sft", str(data), method="fedsa_lora", local_steps=1)
    prompts = ["Repeat the word: dog."]
    for k in (0, 1):
        export_run(folder, "merged", tmp_path / f"client{k}", client=k)
        (record,) = generate_path(folder, prompts, Sampling(NEW), client=k, device="cpu")
        assert record["completion"] == manual_generate(tmp_path / f"client{k}",
                                                       f"### Instruction:\n{prompts[0]}\n\n### Response:\n")


def test_cli_prompt_prompts_file_and_json(sft, tmp_path, capsys, monkeypatch):
    prompts = ["Repeat the word: blue.", "a \"quoted\" prompt\nwith a newline"]
    expected = generate_path(sft["run"], prompts, Sampling(NEW), device="cpu")
    done = fedlora("generate", sft["run"], "--prompt", prompts[0], "--max-new-tokens", str(NEW), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected[0]["completion"] + "\n"
    monkeypatch.chdir(tmp_path)  # the rest in-process
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n\n"
                                                    for i, p in enumerate(prompts)))
    out, _ = main_ok(capsys, "generate", sft["peft"], "--prompts", "prompts.jsonl", "--max-new-tokens", NEW,
                     "--json", "out/completions.jsonl")
    assert out.strip() == "wrote 2 completion(s) to out/completions.jsonl"
    lines = (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == expected
    # an existing result: refused without --overwrite, replaced with it; another file is never replaced
    line = main_error(capsys, "generate", sft["run"], "--prompt", "x", "--json", "out/completions.jsonl")
    assert "exists" in line and "--overwrite" in line
    (tmp_path / "mine.jsonl").write_text('{"a": 1}\n')
    line = main_error(capsys, "generate", sft["run"], "--prompt", "x", "--json", "mine.jsonl", "--overwrite")
    assert "not completions of an earlier" in line
    assert (tmp_path / "mine.jsonl").read_text() == '{"a": 1}\n'
    main_ok(capsys, "generate", sft["run"], "--prompts", "prompts.jsonl", "--max-new-tokens", 3, "--temperature",
            0.7, "--seed", 1, "--json", "out/completions.jsonl", "--overwrite")
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [1, 1] and all(r["tokens"] <= 3 for r in rows)


def test_cli_prompts_without_json_prints_json_lines(sft, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Repeat the word: red."}) + "\n")
    out, err = main_ok(capsys, "generate", sft["merged"], "--prompts", tmp_path / "p.jsonl", "--max-new-tokens", 4,
                       "--temperature", 1)
    (record,) = [json.loads(line) for line in out.splitlines()]
    seed = record["seed"]  # drawn, and said on stderr so that the sample can be repeated
    assert err.strip() == f"fedlora: sampled with seed {seed}; pass --seed {seed} to repeat"
    again = generate_path(sft["merged"], ["Repeat the word: red."], Sampling(4, temperature=1.0, seed=seed),
                          device="cpu")
    assert again == [record]


# ---- predict -------------------------------------------------------------------------------------------------
def test_predict_equals_the_argmax_of_the_models_logits(classifier):
    texts = unlabelled_texts(classifier["unlabelled"])
    expected = manual_labels(classifier["merged"], texts, seq_len=12)
    assert len(set(expected)) > 1  # the test can tell labels apart
    result = predict_path(classifier["run"], str(classifier["unlabelled"]), changes={"text_column": "body"},
                          device="cpu")
    assert result["labels"] == expected
    assert "20 rows" in result["line"] and "'body'" in result["line"]
    for export in ("merged", "peft"):
        assert predict_path(classifier[export], str(classifier["unlabelled"]), changes={"text_column": "body"},
                            device="cpu")["labels"] == expected


def test_cli_predict_prints_and_writes_one_name_per_row(classifier, tmp_path, capsys, monkeypatch):
    texts = unlabelled_texts(classifier["unlabelled"])
    expected = manual_labels(classifier["merged"], texts, seq_len=12)
    done = fedlora("predict", classifier["peft"], "--dataset", classifier["unlabelled"], "--set", "text_column=body",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == expected
    monkeypatch.chdir(tmp_path)  # the rest in-process: a JSONL file with the default text column, and --out
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out, _ = main_ok(capsys, "predict", classifier["run"], "--dataset", "texts.jsonl", "--out", "labels.txt")
    assert (tmp_path / "labels.txt").read_text().splitlines() == manual_labels(classifier["merged"], texts, 12)
    assert "labels.txt" in out and len(out.strip().splitlines()) == 1
    line = main_error(capsys, "predict", classifier["run"], "--dataset", "texts.jsonl", "--out", "labels.txt")
    assert "exists" in line and "--overwrite" in line
    main_ok(capsys, "predict", classifier["run"], "--dataset", "texts.jsonl", "--out", "labels.txt", "--overwrite")
    (tmp_path / "notes.txt").write_text("my notes\n")
    line = main_error(capsys, "predict", classifier["run"], "--dataset", "texts.jsonl", "--out", "notes.txt",
                      "--overwrite")
    assert "not the labels of an earlier" in line
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_predict_client_k_of_a_personalised_run(fedsa, classifier, tmp_path):
    texts = unlabelled_texts(classifier["unlabelled"])
    for k in (0, 1):
        export_run(fedsa, "merged", tmp_path / f"client{k}", client=k)
        result = predict_path(fedsa, str(classifier["unlabelled"]), changes={"text_column": "body"}, client=k,
                              device="cpu")
        assert result["labels"] == manual_labels(tmp_path / f"client{k}", texts, seq_len=12)
        assert f"client {k}" in result["line"]


# ---- one-line errors -----------------------------------------------------------------------------------------
def test_errors_are_one_line(sft, classifier, fedsa, tmp_path, capsys):
    unlabelled = classifier["unlabelled"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "number.jsonl").write_text(json.dumps({"prompt": 7}) + "\n")
    cases = [
        (("generate", classifier["run"], "--prompt", "x"), ("classification", "fedlora predict")),
        (("generate", classifier["merged"], "--prompt", "x"), ("classification", "fedlora predict")),
        (("predict", sft["run"], "--dataset", unlabelled), ("language model", "fedlora generate")),
        (("predict", sft["peft"], "--dataset", unlabelled), ("language model", "fedlora generate")),
        (("generate", sft["run"], "--prompts", tmp_path / "bad.jsonl"), ("line 2", '"prompt"', "['text']")),
        (("generate", sft["run"], "--prompts", tmp_path / "broken.jsonl"), ("line 1", "not JSON")),
        (("generate", sft["run"], "--prompts", tmp_path / "number.jsonl"), ("prompt 1", "expected text", "int")),
        (("generate", sft["run"], "--prompts", tmp_path / "none.jsonl"), ("none.jsonl", "no such file")),
        (("generate", sft["run"], "--prompt", "x", "--top-p", "0.9"), ("--top-p", "--temperature > 0")),
        (("generate", sft["run"], "--prompt", "x", "--temperature", "-1"), ("--temperature", ">= 0")),
        (("generate", sft["run"], "--prompt", "x", "--max-new-tokens", "0"), ("--max-new-tokens", ">= 1")),
        (("generate", sft["run"], "--prompt", "x", "--max-new-tokens", "5000"), ("positions", "--max-new-tokens")),
        (("generate", sft["run"], "--prompt", "x", "--client", "0"), ("global model", "leave out --client")),
        (("generate", sft["merged"], "--prompt", "x", "--client", "0"), ("--client", "run folder only")),
        (("predict", classifier["run"], "--dataset", unlabelled), ("no text column", "'body'", "'id'")),
        (("predict", classifier["run"], "--dataset", unlabelled, "--set", "text_column=title"),
         ("'title'", "'body'")),
        (("predict", classifier["run"], "--dataset", unlabelled, "--set", "max_examples=3"),
         ("max_examples", "text_column")),
        (("predict", fedsa, "--dataset", unlabelled, "--set", "text_column=body"), ("--client K",)),
        (("predict", fedsa, "--dataset", unlabelled, "--set", "text_column=body", "--client", "7"),
         ("--client 7", "out of range", "0..1")),
        (("predict", classifier["run"], "--dataset", tmp_path / "missing.csv"), ("missing.csv",)),
    ]
    for args, needles in cases:
        line = main_error(capsys, *args)
        for needle in needles:
            assert needle in line, (args, line)
