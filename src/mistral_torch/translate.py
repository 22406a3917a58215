"""Translation with a model trained on the `translate-*` prompt templates (the shipped model).

    translate(model, tokenizer, ["Hello, how are you?"])  ->  ["Bonjour, comment allez-vous ?"]

Each sentence is rendered through the template the model was trained on, decoded greedily in
batches (ragged prompts in one batch are exact, see generate.py), and cut at the first newline.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from .data import get_template
from .generate import generate
from .model import Transformer
from .tokenizer import Tokenizer

DIRECTIONS = {"fr": "translate-en-fr", "en": "translate-fr-en"}  # target language -> template


def translate(model: Transformer, tokenizer: Tokenizer, sentences: Sequence[str], to: str = "fr",
              batch_size: int = 32, max_new_tokens: int = 96, **options: Any) -> list[str]:
    """Translate each sentence into `to` ("fr" or "en"); greedy unless options say otherwise."""
    return list(iter_translations(model, tokenizer, sentences, to, batch_size, max_new_tokens, **options))


def iter_translations(model: Transformer, tokenizer: Tokenizer, sentences: Iterable[str], to: str = "fr",
                      batch_size: int = 32, max_new_tokens: int = 96, **options: Any) -> Iterator[str]:
    """Like `translate`, yielding translations in order as each batch finishes."""
    if to not in DIRECTIONS:
        raise ValueError(f"unknown target language {to!r}; choose one of: {', '.join(DIRECTIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    template = get_template(DIRECTIONS[to])
    options.setdefault("temperature", 0.0)
    options["stop"] = list(options.get("stop") or []) + ["\n"]
    batch: list[str] = []
    for sentence in sentences:
        batch.append(sentence.strip())
        if len(batch) == batch_size:
            yield from _translate_batch(model, tokenizer, batch, template.prompt, max_new_tokens, options)
            batch = []
    if batch:
        yield from _translate_batch(model, tokenizer, batch, template.prompt, max_new_tokens, options)


def _translate_batch(model: Transformer, tokenizer: Tokenizer, batch: list[str], prompt: str,
                     max_new_tokens: int, options: dict[str, Any]) -> list[str]:
    empty = [i for i, s in enumerate(batch) if not s]
    if empty:
        raise ValueError(f"cannot translate an empty sentence (item {empty[0] + 1} of the batch)")
    prompts = [prompt.format(source=s) for s in batch]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **options)
    return [o.split("\n", 1)[0].strip() for o in outs]
