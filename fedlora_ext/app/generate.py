"""``fedlora generate``: what a causal LM run (SFT or plain text), or its export, says to prompts.

The model is loaded as ``fedlora evaluate`` loads it (:func:`fedlora_ext.app.evaluation.load_for_evaluation`:
a run folder's global model or client K's, a peft export over its base, a merged export). Each prompt is
built as training built its prompts: an SFT run's prompt goes through the run's template
(:func:`fedlora_ext.data.prompts.render_prompt` with the run's format; a run on a packaged corpus puts its
instruction before the text), after the special ids training put first; a plain-text run's prompt is the
text itself after those ids. Generation stops at the token training ended answers with
(:func:`fedlora_ext.data.prompts.end_token_id`, what an export's ``generation_config.json`` holds) or after
``max_new_tokens``; the completion is the new tokens only, decoded without special tokens.

Decoding is plain: greedy (temperature 0, the default), or sampling from softmax(logits / temperature) cut
to the top-p nucleus. The base's own generation settings (top-k, repetition penalty, ...) are not applied.
Each prompt is generated alone and, when sampling, right after ``torch.manual_seed(seed)``: its completion
depends on its prompt and the seed only, not on the other prompts of the file.
"""

from __future__ import annotations

import json
import math
import secrets
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedlora_ext.app.evaluation import Loaded, load_for_evaluation
from fedlora_ext.app.export import PROMPT, sft_format
from fedlora_ext.app.output_file import check_output_file, write_through_rename
from fedlora_ext.app.run_models import quiet_progress, read_json
from fedlora_ext.core.device import autocast, model_device
from fedlora_ext.data.prompts import end_token_id, leading_special_ids, prompt_template, render_prompt, split_prefix

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Sampling:
    """How to decode: ``temperature`` 0 is greedy; above 0 samples, from the ``top_p`` nucleus (None: all
    tokens), seeded with ``seed`` (None: drawn, see :meth:`seeded`)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def check(self) -> None:
        """Refuses, in one line naming the flag, settings that mean nothing or could not be kept."""
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {self.temperature:g}")
        if self.top_p is not None:
            if not self.sampled:
                raise ValueError("--top-p applies to sampling; greedy decoding (--temperature 0, the default) takes "
                                 "the most likely token: give --temperature > 0 with it")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"--top-p must be in (0, 1], got {self.top_p:g}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2^63), got {self.seed}")

    def seeded(self) -> Sampling:
        """These settings with a seed: a sampled run without one gets a fresh seed, reported with the output
        so that it can be repeated."""
        if self.sampled and self.seed is None:
            return replace(self, seed=secrets.randbelow(2**31))
        return self


@dataclass(frozen=True)
class Prompter:
    """How the run turned a prompt into token ids: the SFT ``format`` (None: plain text, a causal_lm run),
    a packaged corpus's ``instruction`` template (``"...\\n\\n{text}"``), the special ``lead`` ids and the
    ``end`` id that ended every training answer."""

    tokenizer: object
    format: str | None
    instruction: str | None
    lead: list[int]
    end: int

    def ids(self, prompt) -> list[int]:
        if self.format is None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt: a plain-text (causal_lm) run continues text; got {type(prompt).__name__}")
            prefix, text = list(self.lead), prompt
        else:
            rendered = render_prompt(self._record(prompt), self.tokenizer, self.format)
            prefix, text = split_prefix(rendered, self.tokenizer, self.lead)
        return prefix + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _record(self, prompt):
        """A prompt as the format's rows hold it: text fills a packaged corpus's instruction; for ``alpaca``
        text is the instruction (a JSON object keeps its ``input``), for ``chat`` one user message (a JSON
        list is the messages)."""
        if self.instruction and isinstance(prompt, str):
            prompt = self.instruction.format(text=prompt)
        if self.format in ("alpaca", "chat") and isinstance(prompt, str):
            parsed = _json_or_none(prompt)
            if self.format == "alpaca":
                return parsed if isinstance(parsed, dict) and "instruction" in parsed else {"instruction": prompt}
            return parsed if isinstance(parsed, list) else [{"role": "user", "content": prompt}]
        return prompt


def _json_or_none(text: str):
    try:
        return json.loads(text) if text.lstrip()[:1] in ("{", "[") else None
    except ValueError:
        return None


def _prompter(path: Path, loaded: Loaded) -> Prompter:
    """The run's way of building prompts (its SFT template from the run folder or the export's
    ``prompt_template.json``)."""
    tokenizer, task = loaded.tokenizer, loaded.config.task
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (its run trained on synthetic token ids, not text), so it "
                         "cannot read a prompt")
    fmt = instruction = None
    if task == "sft":
        template = read_json(path / PROMPT)
        if template is None and loaded.kind.startswith("run folder"):
            template = prompt_template(sft_format(loaded.config, path), tokenizer, loaded.config.dataset)
        if template is None or template.get("format") is None:
            raise ValueError(f"{path}: the SFT format the run trained with is not recorded (no {PROMPT}, no "
                             "'<format> format' note in data.json), so its prompts cannot be rebuilt")
        fmt, instruction = template["format"], template.get("prompt")
    return Prompter(tokenizer, fmt, instruction, leading_special_ids(tokenizer), end_token_id(tokenizer))


def load_generator(path: str | Path, *, client: int | None = None, device: str = "auto") -> tuple[Loaded, Prompter]:
    """The model of a causal LM run folder or export (client ``client``'s own with ``client``), and how its
    run built prompts. A classifier is refused in one line pointing to ``fedlora predict``."""
    path = Path(path)
    loaded = load_for_evaluation(path, client=client, device=device)
    if loaded.config.task == "classification":
        raise ValueError(f"{path} is a classification model ({loaded.kind}); it labels texts, it does not "
                         f"continue them: use `fedlora predict {path} --dataset FILE`")
    return loaded, _prompter(path, loaded)


def _limit(loaded: Loaded) -> int | None:
    config = loaded.model.config
    return next((int(getattr(config, a)) for a in ("max_position_embeddings", "n_positions")
                 if getattr(config, a, None)), None)


def _generation_config(sampling: Sampling, prompter: Prompter, pad: int):
    """Every decoding setting given (generate() fills the ones left None from the base's own config)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.sampled, num_beams=1,
                            temperature=sampling.temperature if sampling.sampled else 1.0,
                            top_p=sampling.top_p if sampling.top_p is not None else 1.0, top_k=0, typical_p=1.0,
                            min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1,
                            eos_token_id=prompter.end, pad_token_id=pad)


@torch.no_grad()
def complete(loaded: Loaded, prompter: Prompter, prompts: list, sampling: Sampling) -> list[dict]:
    """One record per prompt: the ``prompt`` as given, its ``completion`` (new tokens up to the end token,
    decoded), ``finish_reason`` (``end``: the end token came; ``length``: ``max_new_tokens`` did), the number
    of new ``tokens`` (the end token not counted) and, when sampled, the ``seed``."""
    sampling.check()
    model, limit = loaded.model, _limit(loaded)
    pad = prompter.tokenizer.pad_token_id if prompter.tokenizer.pad_token_id is not None else prompter.end
    generation = _generation_config(sampling, prompter, pad)
    records = []
    for number, prompt in enumerate(prompts, 1):
        try:
            ids = prompter.ids(prompt)
        except ValueError as error:  # render_prompt's own line, said of this prompt
            raise ValueError(f"prompt {number}: {str(error).removeprefix('prompt: ')}") from None
        if not ids:
            raise ValueError(f"prompt {number} is empty (no tokens to continue)")
        if limit is not None and len(ids) + sampling.max_new_tokens > limit:
            raise ValueError(f"prompt {number} is {len(ids)} tokens; with --max-new-tokens {sampling.max_new_tokens} "
                             f"that is more than the model's {limit} positions: shorten it or lower --max-new-tokens")
        inputs = torch.tensor([ids], device=model_device(model))
        if sampling.sampled:
            torch.manual_seed(sampling.seed)  # each prompt's sample depends on its seed only
        with autocast(model):
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                 generation_config=generation)
        new = out[0, len(ids):].tolist()
        ended = prompter.end in new
        new = new[:new.index(prompter.end)] if ended else new
        record = {"prompt": prompt, "completion": prompter.tokenizer.decode(new, skip_special_tokens=True),
                  "finish_reason": "end" if ended else "length", "tokens": len(new)}
        if sampling.sampled:
            record["seed"] = sampling.seed
        records.append(record)
    return records


def generate_path(path: str | Path, prompts: list, sampling: Sampling, *, client: int | None = None,
                  device: str = "auto") -> list[dict]:
    """:func:`complete` with the model of ``path`` (a run folder or an export; client ``client``'s model)."""
    sampling.check()
    with quiet_progress():
        loaded, prompter = load_generator(path, client=client, device=device)
        return complete(loaded, prompter, prompts, sampling)


def read_prompts(path: str | Path) -> list:
    """The ``prompt`` of each line of a JSON lines file (``.jsonl``, also ``.gz`` / ``.zst``): text, or for
    alpaca / chat runs an ``{instruction, input}`` object / a list of messages. Blank lines are skipped.

    Raises:
        FileNotFoundError, ValueError: one line naming the file and the line.
    """
    from fedlora_ext.data.compressed import decompress, split_suffix

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    suffix, compression = split_suffix(path)
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"--prompts {path}: expected a JSON lines file (.jsonl: one {{\"prompt\": ...}} object a "
                         f"line), got a {suffix or 'suffix-less'} file")
    try:
        if compression is None:
            text = path.read_text(encoding="utf-8")
        else:
            with tempfile.TemporaryDirectory() as folder:
                text = decompress(path, compression, Path(folder) / f"prompts{suffix}", f"--prompts {path}").read_text(
                    encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path} is not UTF-8 text (byte {error.start})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"--prompts {path} line {number} is not JSON ({error})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            found = f"fields {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ValueError(f"--prompts {path} line {number} has no \"prompt\" field ({found}); each line must be a "
                             "JSON object with one, e.g. {\"prompt\": \"...\"}")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts (no non-blank lines)")
    return prompts


def _earlier_completions(path: Path) -> bool:
    """Whether ``path`` holds the JSON lines an earlier ``fedlora generate --json`` wrote."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return False
    return bool(rows) and all(isinstance(r, dict) and {"prompt", "completion"} <= set(r) for r in rows)


def check_json_out(path: str | Path, overwrite: bool) -> None:
    check_output_file(path, "--json", overwrite, _earlier_completions, "completions of an earlier `fedlora generate`")


def write_completions(path: str | Path, records: list[dict], overwrite: bool) -> None:
    """One JSON line per record at ``path`` (checked again: a file may have come while generating)."""
    check_json_out(path, overwrite)
    write_through_rename(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
