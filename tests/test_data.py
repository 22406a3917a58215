"""Data pipeline: packed corpora in a memory-mapped .bin, supervised pairs with masked prompts,
deterministic batching, train/validation split, the distributed sampler."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from mistral_torch.data import (IGNORE_INDEX, PackedDataset, PairDataset, bin_meta, encode_pair, get_template,
                                iter_text_pieces, read_documents, read_pairs, shard_batch, split_train_val,
                                tokenize_to_bin)
from mistral_torch.train import loss_fn


class CharTok:
    """One id per character (BOS 1, EOS 2): token counts are easy to predict by hand."""

    bos_id, eos_id = 1, 2

    def __init__(self, vocab_size: int = 512) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [3 + ord(c) % (self.vocab_size - 3) for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


# ---------------------------------------------------------------- packed text corpora
def test_tokenize_to_bin_packs_documents_between_bos_and_eos(tmp_path):
    tok = CharTok()
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    assert list(read_documents(files)) == ["hello\nworld\n", "ab", "c"]
    out = tokenize_to_bin(tok, iter_text_pieces(files), tmp_path / "t.bin", progress=False, meta={"k": 1})
    data = np.fromfile(out, dtype=np.uint16)
    expected = tok.encode("hello\nworld\n", True, True) + tok.encode("ab", True, True) + tok.encode("c", True, True)
    assert data.tolist() == expected
    assert bin_meta(out) == {"dtype": "uint16", "tokens": len(expected), "vocab_size": 512, "k": 1}
    assert not list(tmp_path.glob("*.tmp"))
    # a vocabulary past 65536 ids needs uint32
    big = tokenize_to_bin(CharTok(70_000), ["x"], tmp_path / "u.bin", progress=False)
    assert bin_meta(big)["dtype"] == "uint32" and np.fromfile(big, dtype=np.uint32).tolist() == [1, 3 + ord("x"), 2]


def test_large_files_stream_in_pieces_cut_at_line_ends(tmp_path):
    """A plain-text file is read in pieces (never whole); the pieces rebuild it exactly and only
    the first/last carry BOS/EOS, so the tokens equal those of the whole document."""
    lines = [f"line {i} " + "x" * (i % 7) + "\n" for i in range(200)]
    (tmp_path / "big.txt").write_text("".join(lines))
    seen = []
    pieces = list(iter_text_pieces([tmp_path / "big.txt"], piece_chars=100, on_bytes=seen.append))
    assert len(pieces) > 10
    assert "".join(t for t, _, _ in pieces) == "".join(lines)
    assert all(t.endswith("\n") for t, _, _ in pieces)
    assert [f for _, f, _ in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [l for _, _, l in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(seen) == (tmp_path / "big.txt").stat().st_size
    tok = CharTok()
    out = tokenize_to_bin(tok, pieces, tmp_path / "t.bin", progress=False)
    assert np.fromfile(out, dtype=np.uint16).tolist() == tok.encode("".join(lines), True, True)
    with pytest.raises(ValueError, match="'text' field"):
        (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
        list(iter_text_pieces([tmp_path / "bad.jsonl"]))
    with pytest.raises(FileNotFoundError):
        list(iter_text_pieces([tmp_path / "missing.txt"]))


def test_packed_dataset_has_no_padding_and_shifted_targets(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 500
    tokens.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "tokens": 1000, "vocab_size": 512}))
    train = PackedDataset(tmp_path / "t.bin", seq_len=16, start=0.0, end=0.9)
    val = PackedDataset(tmp_path / "t.bin", seq_len=16, start=0.9, end=1.0)
    assert isinstance(train.tokens, np.memmap)  # read from disk on demand, not loaded
    assert len(train) == (900 - 1) // 16 and len(val) == (100 - 1) // 16
    inputs, targets = train.collate([0, 3])
    assert inputs.shape == targets.shape == (2, 16)
    assert inputs[1].tolist() == list(range(48, 64)) and targets[1].tolist() == list(range(49, 65))
    vi, _ = val.collate([0])
    assert vi[0, 0].item() == 900 % 500  # the validation split starts where training ends
    # every sequence once per epoch, deterministic by (seed, epoch)
    order = train.batch_order(4, seed=1, epoch=0)
    flat = [i for b in order for i in b]
    assert len(set(flat)) == len(flat) == len(train) // 4 * 4 and all(len(b) == 4 for b in order)
    assert order == train.batch_order(4, seed=1, epoch=0)
    assert order != train.batch_order(4, seed=1, epoch=1) and order != train.batch_order(4, seed=2, epoch=0)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedDataset(tmp_path / "t.bin", seq_len=2000)


# ---------------------------------------------------------------- supervised pairs
def test_read_pairs_tsv_jsonl_gzip_and_errors(tmp_path):
    (tmp_path / "p.tsv").write_text("Hi.\tSalut.\n\nBye.\tAu revoir.\n")
    with gzip.open(tmp_path / "p.tsv.gz", "wt") as f:
        f.write("Hi.\tSalut.\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "2+2", "target": "4"}) + "\n")
    assert read_pairs(tmp_path / "p.tsv") == [("Hi.", "Salut."), ("Bye.", "Au revoir.")]
    assert read_pairs(tmp_path / "p.tsv", reverse=True)[0] == ("Salut.", "Hi.")
    assert read_pairs(tmp_path / "p.tsv.gz") == [("Hi.", "Salut.")]
    assert read_pairs(tmp_path / "p.jsonl") == [("2+2", "4")]
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        read_pairs(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="'prompt' and 'target'"):
        read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_pairs_mask_the_prompt_and_the_loss_ignores_it():
    """Handcrafted batch: labels are -100 on the prompt and the padding, and the loss is the mean
    over the target tokens only: prompt logits get no gradient and can change freely."""
    tok = CharTok()
    template = get_template("plain")  # prompt = source, target = target
    ex_a = encode_pair(tok, template, "abc", "XY", max_len=64)  # BOS a b c | X Y EOS
    ex_b = encode_pair(tok, template, "d", "Z", max_len=64)  # BOS d | Z EOS
    assert ex_a[0] == [1, *tok.encode("abc", False), *tok.encode("XY", False), 2]
    assert ex_a[1] == [IGNORE_INDEX] * 4 + tok.encode("XY", False) + [2]
    ds = PairDataset([ex_a, ex_b], pad_id=tok.eos_id)
    inputs, targets = ds.collate([0, 1])
    assert inputs.tolist() == [ex_a[0][:-1], ex_b[0][:-1] + [2, 2, 2]]  # right-padded with pad_id
    assert targets.tolist() == [[IGNORE_INDEX] * 3 + tok.encode("XY", False) + [2],
                                [IGNORE_INDEX] + tok.encode("Z", False) + [2] + [IGNORE_INDEX] * 3]
    logits = torch.randn(2, 6, tok.vocab_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = loss_fn(logits, targets)
    # by hand: mean cross-entropy at the 5 target positions (3 of row 0, 2 of row 1)
    logp = logits.log_softmax(-1)
    picks = [(0, 3), (0, 4), (0, 5), (1, 1), (1, 2)]
    manual = -sum(logp[r, t, targets[r, t]] for r, t in picks) / len(picks)
    torch.testing.assert_close(loss, manual)
    loss.backward()
    prompt_or_pad = targets == IGNORE_INDEX
    assert prompt_or_pad.sum() == 7
    assert logits.grad[prompt_or_pad].abs().max() == 0
    assert logits.grad[~prompt_or_pad].abs().min() > 0
    with torch.no_grad():  # whatever the model predicts on the prompt, the loss is the same
        other = logits.detach().clone()
        other[prompt_or_pad] = torch.randn(int(prompt_or_pad.sum()), tok.vocab_size)
        torch.testing.assert_close(loss_fn(other, targets), loss.detach())


def test_pair_batches_bucketed_deterministic_and_complete():
    rng = np.random.default_rng(0)
    examples = [([1] * n, [IGNORE_INDEX] * n) for n in rng.integers(3, 60, size=403)]
    ds = PairDataset(examples, pad_id=2)

    def padding(order):
        return sum(len(b) * max(len(examples[i][0]) for i in b) - sum(len(examples[i][0]) for i in b) for b in order)

    for bucket in (True, False):
        order = ds.batch_order(8, seed=3, epoch=0, bucket=bucket)
        flat = sorted(i for b in order for i in b)
        assert flat == list(range(403)) and len(order) == ds.num_batches(8)
        assert order == ds.batch_order(8, seed=3, epoch=0, bucket=bucket)
        assert order != ds.batch_order(8, seed=3, epoch=1, bucket=bucket)
    assert padding(ds.batch_order(8, 3, 0, bucket=True)) < padding(ds.batch_order(8, 3, 0, bucket=False)) / 4


def test_split_train_val_is_deterministic_and_disjoint():
    items = list(range(1000))
    train, val = split_train_val(items, 0.05, seed=7)
    assert len(val) == 50 and sorted(train + val) == items
    assert (train, val) == split_train_val(items, 0.05, seed=7)
    assert val != split_train_val(items, 0.05, seed=8)[1]
    assert split_train_val(items[:3], 0.01, seed=0)[1] != []  # at least one validation item


def test_shard_batch_slices_are_disjoint_and_complete():
    batch = list(range(100, 110))
    for world in (1, 2, 3, 4):
        parts = [shard_batch(batch, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        shard_batch([1], 0, 2)
