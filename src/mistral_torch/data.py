"""Training data: supervised pairs through prompt templates, packed text corpora, batching.

Two kinds of data feed the trainer:
- supervised pairs (TSV `source<TAB>target` or JSONL `prompt`/`target`), rendered through a named
  template; the loss covers the target tokens only (labels -100 on the prompt);
- plain text (files, or JSONL with a `text` field), tokenized once into a memory-mapped uint16/uint32
  `.bin`, documents separated by EOS and cut into fixed-length sequences with no padding waste.
Batch order is a deterministic function of (seed, epoch), so a run resumes at an exact batch.
Under torch.distributed every rank takes its own contiguous slice of each global batch
(`shard_batch`): the ranks together see exactly the batches one process would.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


class TextTokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


# ---------------------------------------------------------------- prompt templates
@dataclass(frozen=True)
class Template:
    """`prompt` is what the model is given; `target` what it learns to continue with."""

    prompt: str
    target: str = " {target}"

    def render(self, source: str, target: str) -> tuple[str, str]:
        return self.prompt.format(source=source), self.target.format(target=target)


TEMPLATES: dict[str, Template] = {
    "translate-en-fr": Template("Translate: English → French\nEnglish: {source}\nFrench:"),
    "translate-fr-en": Template("Translate: French → English\nFrench: {source}\nEnglish:"),
    "plain": Template("{source}", "{target}"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


# ---------------------------------------------------------------- a tokenizer of our own
def train_sentencepiece(texts: Sequence[str], out_path: str | Path, vocab_size: int = 8000) -> Path:
    """Train a SentencePiece unigram model on `texts` (Mistral's id layout: unk 0, bos 1, eos 2).

    Identity normalisation and byte fallback make decode(encode(s)) == s for any text; the
    template's newline and arrow are single pieces."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=["\n", "→", "Translate:", "English:", "French:"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    out_path = Path(out_path)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------- supervised pairs
def read_pairs(path: str | Path, reverse: bool = False) -> list[tuple[str, str]]:
    """(source, target) pairs from a TSV (`a<TAB>b` per line) or JSONL (`prompt`, `target`) file,
    optionally gzipped; `reverse` swaps the two sides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    pairs = []
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if is_jsonl:
                obj = json.loads(line)
                if "prompt" not in obj or "target" not in obj:
                    raise ValueError(f"{path}:{lineno}: JSONL pairs need 'prompt' and 'target' fields")
                a, b = obj["prompt"], obj["target"]
            else:
                parts = line.split("\t")
                if len(parts) < 2:
                    raise ValueError(f"{path}:{lineno}: expected 'source<TAB>target', got {line[:60]!r}")
                a, b = parts[0], parts[1]
            pairs.append((b, a) if reverse else (a, b))
    if not pairs:
        raise ValueError(f"no pairs in {path}")
    return pairs


def encode_pair(tok: TextTokenizer, template: Template, source: str, target: str,
                max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are -100 on the prompt. Truncated to max_len."""
    prompt, answer = template.render(source, target)
    p = tok.encode(prompt, bos=True, eos=False)
    t = tok.encode(answer.lstrip(" ") if answer.startswith(" ") else answer, bos=False, eos=True)
    ids = (p + t)[:max_len]
    labels = ([IGNORE_INDEX] * len(p) + t)[:max_len]
    return ids, labels


class PairDataset:
    """Tokenized supervised examples, batched by similar length (little padding)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    @classmethod
    def from_pairs(cls, tok: TextTokenizer, pairs: Sequence[tuple[str, str]], template: Template,
                   max_len: int, progress: bool = True) -> "PairDataset":
        from tqdm import tqdm

        it = tqdm(pairs, desc="tokenizing", unit="pair", disable=not progress, mininterval=1.0)
        return cls([encode_pair(tok, template, a, b, max_len) for a, b in it], pad_id=tok.eos_id)

    def __len__(self) -> int:
        return len(self.examples)

    def num_batches(self, batch_size: int) -> int:
        return (len(self.examples) + batch_size - 1) // batch_size

    def batch_order(self, batch_size: int, seed: int, epoch: int, bucket: bool = True) -> list[list[int]]:
        """Deterministic batches of example indices for (seed, epoch): shuffled, then grouped by
        length within windows of 50 batches (length bucketing), then the batches shuffled.
        `bucket=False`: plain shuffled batches (each padded to its longest example)."""
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        if not bucket:
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        chunk = batch_size * 50
        batches = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s:s + chunk], key=lambda i: len(self.examples[i][0]))
            batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        return batches

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (inputs, targets), both (B, T): targets[t] is the label of the token
        after inputs[t] (already shifted); prompt and padding targets are -100."""
        T = max(len(self.examples[i][0]) for i in indices) - 1
        inputs = torch.full((len(indices), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(indices), T), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(indices):
            x, y = self.examples[i]
            inputs[row, :len(x) - 1] = torch.tensor(x[:-1])
            targets[row, :len(y) - 1] = torch.tensor(y[1:])
        return inputs, targets


def split_train_val(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split; validation = `val_fraction` of the items (at least 1 when > 0)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(len(items) * val_fraction)) if val_fraction > 0 else 0
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


# ---------------------------------------------------------------- packed text corpora
PIECE_CHARS = 1 << 22  # plain-text files are read and tokenized in pieces of ~4M characters


def _text_files(paths: Iterable[str | Path]) -> list[Path]:
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"corpus file not found: {f}")
    return files


def iter_text_pieces(paths: Iterable[str | Path], piece_chars: int = PIECE_CHARS,
                     on_bytes=None) -> Iterator[tuple[str, bool, bool]]:
    """(text, starts_document, ends_document) pieces of a corpus, streamed: no file is ever held
    in memory whole. A plain-text file is one document, cut into pieces of about `piece_chars`
    at line ends; a JSONL file holds one document per line (its `text` field).
    `on_bytes(n)` is told how many bytes of input each piece consumed (for a progress bar)."""
    for path in _text_files(paths):
        with path.open("rb") as f:
            if path.suffix == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if on_bytes:
                        on_bytes(len(line))
                    if line.strip():
                        obj = json.loads(line)
                        if "text" not in obj:
                            raise ValueError(f"{path}:{lineno}: JSONL corpus lines need a 'text' field")
                        yield obj["text"], True, True
                continue
            buf: list[bytes] = []
            size, first, pending = 0, True, None
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= piece_chars:
                    if pending is not None:
                        yield pending[0], pending[1], False
                    pending, first = (b"".join(buf).decode("utf-8"), first), False
                    if on_bytes:
                        on_bytes(size)
                    buf, size = [], 0
            tail = b"".join(buf).decode("utf-8")
            if on_bytes:
                on_bytes(size)
            if pending is not None and tail:
                yield pending[0], pending[1], False
                yield tail, False, True
            elif pending is not None:
                yield pending[0], pending[1], True
            else:
                yield tail, True, True


def read_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Whole documents: plain-text files (one document per file) or JSONL files (`text` field).
    For corpora of any size prefer `iter_text_pieces`, which never holds a file whole."""
    doc: list[str] = []
    for text, _, last in iter_text_pieces(paths):
        doc.append(text)
        if last:
            yield "".join(doc)
            doc = []


def sample_lines(paths: Iterable[str | Path], max_chars: int = 50_000_000) -> Iterator[str]:
    """Non-empty lines from the start of a corpus, up to `max_chars` in all (tokenizer training:
    SentencePiece wants sentences, not documents, and a sample is enough)."""
    total = 0
    for text, _, _ in iter_text_pieces(paths):
        for line in text.splitlines():
            if line.strip():
                yield line
                total += len(line)
                if total >= max_chars:
                    return


def corpus_signature(paths: Iterable[str | Path]) -> list[list]:
    """[path, size, mtime] of each file: a cached `.bin` is rebuilt when its sources change."""
    return [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in _text_files(paths)]


def tokenize_to_bin(tok: TextTokenizer, documents: Iterable[str] | Iterable[tuple[str, bool, bool]],
                    out_path: str | Path, progress: bool = True, total_bytes: int | None = None,
                    meta: dict | None = None) -> Path:
    """Tokenize a corpus once into a flat `.bin` (uint16 if the vocabulary fits, else uint32),
    each document between BOS and EOS. `documents` are strings (whole documents) or the
    (text, starts, ends) pieces of `iter_text_pieces`, so a corpus larger than RAM streams
    through. Written to a temp file and renamed (never half-written); the token count, dtype and
    `meta` go to a `.json` beside it."""
    from tqdm import tqdm

    out_path = Path(out_path)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    n = 0
    bar = tqdm(total=total_bytes, desc=f"tokenizing → {out_path.name}", unit="B" if total_bytes else "doc",
               unit_scale=True, disable=not progress, mininterval=1.0)
    with tmp.open("wb") as f:
        for doc in documents:
            text, first, last = (doc, True, True) if isinstance(doc, str) else doc
            ids = tok.encode(text, bos=first, eos=last)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
            bar.update(len(text.encode("utf-8")) if total_bytes else int(last))
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    info = {"dtype": np.dtype(dtype).name, "tokens": n, "vocab_size": tok.vocab_size, **(meta or {})}
    out_path.with_suffix(".json").write_text(json.dumps(info))
    os.replace(tmp, out_path)
    return out_path


def bin_meta(bin_path: str | Path) -> dict | None:
    """The `.json` written beside a token `.bin` (None when the pair is incomplete)."""
    bin_path = Path(bin_path)
    meta = bin_path.with_suffix(".json")
    if not (bin_path.is_file() and meta.is_file()):
        return None
    return json.loads(meta.read_text())


class PackedDataset:
    """Fixed-length sequences cut from a memory-mapped token `.bin` (inputs and shifted labels)."""

    def __init__(self, bin_path: str | Path, seq_len: int, start: float = 0.0, end: float = 1.0) -> None:
        bin_path = Path(bin_path)
        meta = json.loads(bin_path.with_suffix(".json").read_text())
        self.tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
        lo, hi = int(len(self.tokens) * start), int(len(self.tokens) * end)
        self.offset = lo
        self.seq_len = seq_len
        self.n_seq = (hi - lo - 1) // seq_len
        if self.n_seq < 1:
            raise ValueError(f"{bin_path} holds {hi - lo} tokens in this split, fewer than one sequence of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n_seq

    def num_batches(self, batch_size: int) -> int:
        return len(self) // batch_size

    def batch_order(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        order = list(range(self.n_seq))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both (B, seq_len), targets shifted by one."""
        rows = [np.asarray(self.tokens[self.offset + i * self.seq_len: self.offset + (i + 1) * self.seq_len + 1],
                           dtype=np.int64) for i in indices]
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()


# ---------------------------------------------------------------- distributed sampling
def shard_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous slice of a global batch (the distributed sampler): the slices of
    all ranks are disjoint and together are exactly the batch one process would take. A batch
    that does not divide evenly gives the first ranks one example fewer."""
    if len(indices) < world_size:
        raise ValueError(f"a batch of {len(indices)} cannot be split over {world_size} processes")
    n = len(indices)
    return list(indices[rank * n // world_size:(rank + 1) * n // world_size])
