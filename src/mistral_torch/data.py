"""Training data: supervised pairs through prompt templates, packed text corpora, batching.

Two kinds of data feed the trainer:
- supervised pairs (TSV `source<TAB>target` or JSONL `prompt`/`target`), rendered through a named
  template; the loss covers the target tokens only (labels -100 on the prompt);
- plain text (files, or JSONL with a `text` field), tokenized once into a memory-mapped uint16/uint32
  `.bin`, documents separated by EOS and cut into fixed-length sequences with no padding waste.
Batch order is a deterministic function of (seed, epoch), so a run resumes at an exact batch.
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

    def batch_order(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """Deterministic batches of example indices for (seed, epoch): shuffled, then grouped by
        length within windows of 50 batches (length bucketing), then the batches shuffled."""
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
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
def read_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents from plain-text files (one document per file) or JSONL files (`text` field)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        obj = json.loads(line)
                        if "text" not in obj:
                            raise ValueError(f"{path}:{lineno}: JSONL corpus lines need a 'text' field")
                        yield obj["text"]
        else:
            yield path.read_text(encoding="utf-8")


def tokenize_to_bin(tok: TextTokenizer, documents: Iterable[str], out_path: str | Path,
                    progress: bool = True) -> Path:
    """Tokenize documents once into a flat `.bin` (uint16 if the vocabulary fits, else uint32),
    each document followed by EOS. Written to a temp file and renamed (never half-written)."""
    from tqdm import tqdm

    out_path = Path(out_path)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    n = 0
    with tmp.open("wb") as f:
        for doc in tqdm(documents, desc=f"tokenizing → {out_path.name}", unit="doc", disable=not progress):
            ids = tok.encode(doc, bos=True, eos=True)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    meta = {"dtype": np.dtype(dtype).name, "tokens": n, "vocab_size": tok.vocab_size}
    out_path.with_suffix(".json").write_text(json.dumps(meta))
    os.replace(tmp, out_path)
    return out_path


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
