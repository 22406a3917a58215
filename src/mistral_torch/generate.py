"""Text generation: sampling, batched decoding on the rolling cache, streaming text.

Three layers, each usable on its own:

    sampling      `process_logits` / `filter_probs` / `sample_next`: repetition penalty,
                  temperature, top-k, top-p, min-p, greedy, seeded sampling.
    tokens        `TokenGenerator`: prompts of token ids -> one new token per running row per
                  `step()`. Ragged prompts run as one left-padded batch (padding has position -1,
                  so it is never stored or attended to); each row decodes at its own position;
                  rows that finish are dropped from the batch.
    text          `stream_batch` / `stream` / `complete` / `generate`: prompts as text,
                  incremental detokenization, stop strings.

Greedy decoding of a row in a batch gives the same tokens as decoding that prompt alone, and the
same tokens as transformers' `generate(do_sample=False)` (tests/test_generate.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import torch

from .cache import RollingKVCache
from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]  # text (BOS is added) or token ids (used as they are)


@dataclass
class GenerationConfig:
    """How to generate. Sampling filters apply in this order: repetition penalty, temperature,
    top-k, top-p, min-p (each on the distribution left by the previous one)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept); 0: off
    top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= top_p
    min_p: float = 0.0  # keep tokens with probability >= min_p * (top probability)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL/HF rule)
    stop: Sequence[str] = ()  # stop strings: output ends before the first one
    stop_token_ids: Sequence[int] = ()  # stop when one of these is produced (besides EOS)
    seed: int | None = None  # sampling seed; every row gets its own generator with this seed
    ignore_eos: bool = False  # keep going after EOS (benchmarks, parity tests)
    prefill_chunk: int = 2048  # prompts go through the model in column chunks of at most this

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(isinstance(self.prefill_chunk, int) and self.prefill_chunk >= 1,
               f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")
        _check(all(isinstance(s, str) for s in self.stop), "stop strings must be strings")

    @classmethod
    def from_options(cls, config: "GenerationConfig | None" = None, **options: Any) -> "GenerationConfig":
        """`config` with `options` (field names) replaced; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(config or cls(), **options)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class GenerationStats:
    """Filled in by a generation run: token counts, time to first token, throughput, cache size."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # start -> first new token of every row (prefill + one sample)
    total_s: float = 0.0
    cache_bytes: int = 0  # largest key/value cache held during the run

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole run."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.generated_tokens} tokens in {self.total_s:.2f} s ({self.tokens_per_s:.1f} tokens/s), "
                f"time to first token {self.ttft_s * 1000:.0f} ms, prompt {self.prompt_tokens} tokens")


# ---------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already `seen` (B, V bool) by `penalty`."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Zero the probabilities (B, V) that top-k, then top-p, then min-p remove; renormalise.

    top_k: keep tokens at least as likely as the k-th most likely one.
    top_p: keep the smallest set of most likely tokens whose mass is >= top_p (always >= 1 token).
    min_p: keep tokens with probability >= min_p * max probability.
    """
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        keep_sorted = mass_before < top_p  # the first token always (mass before = 0 < top_p)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0.0:
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs >= threshold, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token probabilities (B, V) in fp32 after every sampling rule of `config` (temperature > 0)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    return filter_probs(probs, config.top_k, config.top_p, config.min_p)


def sample_next(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token id per row (B,) from last-position logits (B, V): argmax at temperature 0."""
    if config.temperature == 0:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = process_logits(logits, config, seen)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    # One generator per row: a row's samples do not depend on the rest of the batch.
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


# ---------------------------------------------------------------- token-level batched decoding
def context_limit(model: Transformer) -> int:
    """Most positions (prompt + new tokens) one sequence may use: the model's max_seq_len."""
    return model.args.max_seq_len


class TokenGenerator:
    """Batched decoding of token-id prompts. Each `step()` returns (row, token) for every row
    still running; `outputs[row]` collects a row's tokens and `finish_reason[row]` says why it
    ended: "stop" (EOS or a stop id, which is kept as the last output token), "length", or
    "stop_string" (set through `finish`)."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 eos_id: int | None = None, stats: GenerationStats | None = None) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        self.model, self.config = model, config
        self.prompts = [[int(t) for t in p] for p in prompts]
        vocab, limit = model.args.vocab_size, context_limit(model)
        for i, p in enumerate(self.prompts):
            where = f"prompt {i}" if len(self.prompts) > 1 else "prompt"
            if not p:
                raise ValueError(f"{where} is empty")
            if len(p) >= limit:
                raise ValueError(f"{where} is {len(p)} tokens long, but the model's context is {limit} tokens "
                                 "(prompt plus at least one new token must fit)")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{where} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")
        self.stop_ids = set(config.stop_token_ids) | (set() if eos_id is None or config.ignore_eos else {eos_id})
        # Each row may produce max_new_tokens, and no more than its room in the context.
        self.max_new = [min(config.max_new_tokens, limit - len(p)) for p in self.prompts]
        self.outputs: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reason: dict[int, str] = {}
        self.active: list[int] = list(range(len(self.prompts)))  # original index of each batch row
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.prompt_tokens = sum(len(p) for p in self.prompts)
        self.cache: RollingKVCache | None = None
        self._logits: torch.Tensor | None = None  # (rows, V) next-token logits of the active rows
        self._last: torch.Tensor | None = None  # (rows,) last sampled tokens of the active rows
        self._t0 = 0.0

    @property
    def done(self) -> bool:
        return not self.active

    def finish(self, row: int, reason: str = "stop_string") -> None:
        """End `row` early (e.g. a stop string matched); it leaves the batch at the next step."""
        self.finish_reason.setdefault(row, reason)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while not self.done:
            yield self.step()

    def step(self) -> list[tuple[int, int]]:
        """Advance every running row by one token; [(row, token), ...]."""
        with torch.inference_mode():
            if self.cache is None:
                self._t0 = time.perf_counter()
                self._prefill()
            else:
                self._drop_finished_rows()
                if self.done:
                    return []
                logits, self.cache = self.model(self._last[:, None], cache=self.cache)
                self._logits = logits[:, -1]
            tokens = sample_next(self._logits, self.config, self._seen, self._generators)
            self._last = tokens
            self._seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        out = []
        for row, token in zip(self.active, tokens.tolist()):
            self.outputs[row].append(token)
            out.append((row, token))
            if token in self.stop_ids:
                self.finish(row, "stop")
            elif len(self.outputs[row]) >= self.max_new[row]:
                self.finish(row, "length")
        now = time.perf_counter()
        if self.stats.generated_tokens == 0:
            self.stats.ttft_s = now - self._t0
        self.stats.generated_tokens += len(out)
        self.stats.total_s = now - self._t0
        self.stats.cache_bytes = max(self.stats.cache_bytes, self.cache.nbytes())
        if all(row in self.finish_reason for row in self.active):
            self.active = []
        return out

    def _prefill(self) -> None:
        """Left-pad the prompts into one batch and run them through a fresh cache."""
        model, cfg = self.model, self.config
        device = model.device
        B, T = len(self.prompts), max(len(p) for p in self.prompts)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)  # -1: padding, never stored or attended
        for b, p in enumerate(self.prompts):
            tokens[b, T - len(p):] = torch.tensor(p)
            positions[b, T - len(p):] = torch.arange(len(p))
        tokens, positions = tokens.to(device), positions.to(device)
        # Without a sliding window the cache holds every position: size it for this run only.
        capacity = None
        if model.args.sliding_window is None:
            capacity = max(len(p) + n for p, n in zip(self.prompts, self.max_new))
        self.cache = model.new_cache(B, capacity=capacity)
        for s in range(0, T, cfg.prefill_chunk):  # the model chunks further, by the window
            logits, self.cache = model(tokens[:, s:s + cfg.prefill_chunk], cache=self.cache,
                                       positions=positions[:, s:s + cfg.prefill_chunk], last_logits_only=True)
        self._logits = logits[:, -1]
        self._seen = torch.zeros(B, model.args.vocab_size, dtype=torch.bool, device=device)
        if cfg.repetition_penalty != 1.0:
            for b, p in enumerate(self.prompts):
                self._seen[b, torch.tensor(p, device=device)] = True
        self._generators = None
        if cfg.temperature > 0:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self._generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]

    def _drop_finished_rows(self) -> None:
        """Remove finished rows from the batch (cache rows, sampling state) so they cost nothing."""
        keep = [i for i, row in enumerate(self.active) if row not in self.finish_reason]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, device=self._last.device)
        self.cache.select_rows(idx)
        self._last, self._seen = self._last.index_select(0, idx), self._seen.index_select(0, idx)
        if self._generators is not None:
            self._generators = [self._generators[i] for i in keep]


def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
                 eos_id: int | None = None, stats: GenerationStats | None = None, **options: Any) -> list[list[int]]:
    """New token ids for each prompt of ids (a stopping token, if any, is the last one)."""
    gen = TokenGenerator(model, prompts, GenerationConfig.from_options(config, **options), eos_id, stats)
    for _ in gen:
        pass
    return gen.outputs


# ---------------------------------------------------------------- text
class StopStrings:
    """Finds stop strings in streamed text; holds back text that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string matched: then nothing more follows)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class Completion:
    """One prompt's result: the new text, its token ids, why it ended, and the prompt's length."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS / stop id), "stop_string", "length"
    prompt_tokens: int = 0


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A list of prompts from one prompt (text or ids) or a sequence of them."""
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _encode_prompts(tokenizer: "Tokenizer", prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, decode context) per prompt. A text prompt gets BOS, and its completion is decoded
    as its continuation (" Paris" after "The capital is"); a prompt given as ids (e.g. a chat
    template) is decoded as a fresh segment, as mistral-common decodes a reply."""
    if not prompts:
        raise ValueError("no prompts given")
    ids, contexts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError("empty prompt" if len(prompts) == 1 else f"prompt {i} is empty")
            ids.append(tokenizer.encode(p, bos=True))
            contexts.append(ids[-1])
        else:
            ids.append([int(t) for t in p])
            contexts.append([])
    return ids, contexts


def stream_batch(model: Transformer, tokenizer: "Tokenizer", prompts: Sequence[Prompt],
                 config: GenerationConfig | None = None, stats: GenerationStats | None = None,
                 completions: list[Completion] | None = None, **options: Any) -> Iterator[tuple[int, str]]:
    """(prompt index, text piece) as the batch produces them. Pieces of one prompt concatenate
    to its completion; `completions`, when given, is filled with one `Completion` per prompt."""
    config = GenerationConfig.from_options(config, **options)
    ids, contexts = _encode_prompts(tokenizer, _prompt_list(prompts))
    gen = TokenGenerator(model, ids, config, tokenizer.eos_id, stats)
    decoders = [tokenizer.stream_decoder(c) for c in contexts]
    stoppers = [StopStrings(config.stop) for _ in ids]
    texts = [[] for _ in ids]
    while not gen.done:
        for row, token in gen.step():
            reason = gen.finish_reason.get(row)
            text = "" if reason == "stop" else decoders[row].add(token)  # a stopping token adds no text
            if reason is not None:
                text += decoders[row].flush()
            piece, hit = stoppers[row].feed(text)
            if hit:
                gen.finish_reason[row] = "stop_string"
            elif reason is not None:
                piece += stoppers[row].flush()
            if piece:
                texts[row].append(piece)
                yield row, piece
    if completions is not None:
        completions[:] = [Completion("".join(t), out, gen.finish_reason.get(i, "length"), len(p))
                          for i, (t, out, p) in enumerate(zip(texts, gen.outputs, ids))]


def stream(model: Transformer, tokenizer: "Tokenizer", prompt: Prompt, config: GenerationConfig | None = None,
           stats: GenerationStats | None = None, **options: Any) -> Iterator[str]:
    """Text pieces of one prompt's completion as they are produced (no broken characters)."""
    for _, piece in stream_batch(model, tokenizer, [prompt], config, stats, **options):
        yield piece


def complete(model: Transformer, tokenizer: "Tokenizer", prompts: Prompt | Sequence[Prompt],
             config: GenerationConfig | None = None, stats: GenerationStats | None = None,
             **options: Any) -> list[Completion]:
    """One `Completion` per prompt, all prompts decoded as one batch."""
    completions: list[Completion] = []
    for _ in stream_batch(model, tokenizer, _prompt_list(prompts), config, stats, completions, **options):
        pass
    return completions


def generate(model: Transformer, tokenizer: "Tokenizer", prompts: Prompt | Sequence[Prompt],
             config: GenerationConfig | None = None, stats: GenerationStats | None = None,
             **options: Any) -> list[str]:
    """One completion string (without the prompt) per prompt; options are `GenerationConfig`
    fields, e.g. `generate(model, tok, ["Hello"], max_new_tokens=20, temperature=0.7, seed=0)`."""
    return [c.text for c in complete(model, tokenizer, prompts, config, stats, **options)]
