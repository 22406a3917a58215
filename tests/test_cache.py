"""Incremental decoding through the rolling cache equals one full forward, far past the window."""

import pytest
import torch

from conftest import tiny_model
from mistral_torch.cache import RollingKVCache, attention_mask

TOL = 1e-5


def run_in_chunks(model, tokens, sizes):
    cache, outs, s = None, [], 0
    for n in sizes:
        out, cache = model(tokens[:, s:s + n], cache=cache)
        outs.append(out)
        s += n
    assert s == tokens.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("window", [8, 16, None])
@pytest.mark.parametrize("sizes", [
    [1] * 80,                                  # one token at a time
    [3, 7, 1, 12, 2, 9, 16, 5, 1, 1, 23],      # uneven chunks, some longer than the window
    [50, 1, 1, 1, 27],                         # a chunked prefill, then decode
    [80],                                      # one long prefill (chunked inside)
])
def test_incremental_equals_full_forward(window, sizes):
    model = tiny_model(sliding_window=window)
    tokens = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, _ = model(tokens, use_cache=False)
        out, cache = run_in_chunks(model, tokens, sizes)
    assert (out - ref).abs().max() <= TOL
    assert cache.length == 80 and cache.next_pos.tolist() == [80, 80]


def test_prompt_longer_than_the_prefill_chunk():
    """One forward call of 1200 tokens with window 8: chunks of MIN_PREFILL_CHUNK (512) inside,
    each longer than the cache, the later ones reading the cache first; equal to the plain pass."""
    from mistral_torch.model import MIN_PREFILL_CHUNK

    model = tiny_model(sliding_window=8)
    tokens = torch.randint(0, 512, (1, 1200), generator=torch.Generator().manual_seed(8))
    assert tokens.shape[1] > 2 * MIN_PREFILL_CHUNK
    with torch.no_grad():
        ref, _ = model(tokens, use_cache=False)
        out, cache = model(tokens)
        last, _ = model(tokens, last_logits_only=True)
    assert (out - ref).abs().max() <= TOL and (last[:, -1] - ref[:, -1]).abs().max() <= TOL
    assert cache.length == 1200 and cache.allocated == 8


def test_cache_memory_constant_once_window_is_full():
    model = tiny_model(sliding_window=8)
    tokens = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(8))
    sizes = []
    with torch.no_grad():
        _, cache = model(tokens[:, :5])
        for t in range(5, 200):
            _, cache = model(tokens[:, t:t + 1], cache=cache)
            sizes.append(cache.nbytes())
            assert all(k.shape == (2, 2, 8, 16) for k in cache.k + cache.v)
    assert len(set(sizes)) == 1
    assert cache.slot_pos.shape == (2, 8)
    assert sorted(cache.slot_pos[0].tolist()) == list(range(192, 200))  # the last W positions


def test_ragged_left_padded_rows_equal_unpadded():
    """Per-row positions with -1 padding: each row matches running it alone, past the window."""
    model = tiny_model(sliding_window=8)
    gen = torch.Generator().manual_seed(9)
    lengths = [3, 20, 11]
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(3, T, dtype=torch.long)
    positions = torch.full((3, T), -1)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
        positions[b, T - len(p):] = torch.arange(len(p))
    with torch.no_grad():
        out, cache = model(tokens, positions=positions)
        assert cache.next_pos.tolist() == lengths
        steps = torch.randint(0, 512, (3, 15), generator=gen)
        dec = [model(steps[:, i:i + 1], cache=cache)[0] for i in range(15)]
        for b, p in enumerate(prompts):
            full = torch.cat([p, steps[b]])[None]
            ref, _ = model(full, use_cache=False)
            assert (out[b, T - len(p):] - ref[0, :len(p)]).abs().max() <= TOL
            got = torch.cat([d[b] for d in dec])
            assert (got - ref[0, len(p):]).abs().max() <= TOL


def test_attention_mask_convention():
    q = torch.tensor([[5]])
    k = torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]])
    m = attention_mask(q, k, window=3)[0, 0, 0].tolist()
    assert m == [False, False, False, True, True, True, False, False]  # sees itself and the 2 before
    assert attention_mask(q, k, window=None)[0, 0, 0].tolist() == [True] * 6 + [False, False]
    assert attention_mask(torch.tensor([[-1]]), k, window=3).all()  # padding queries stay finite


def test_cache_validation():
    with pytest.raises(ValueError, match="smaller than the sliding window"):
        RollingKVCache(2, 1, 2, 16, capacity=4, window=8)
    model = tiny_model(sliding_window=None, max_seq_len=256)
    cache = model.new_cache(1, capacity=10)
    with pytest.raises(ValueError, match="exceeds the cache capacity of 10"):
        model(torch.zeros(1, 11, dtype=torch.long), cache=cache)


def test_rows_leave_and_join_exactly():
    """select_rows / append_rows (what generation and the server do to a running batch): rows
    cut out of one cache and joined to another continue exactly as if decoded alone, also when a
    windowless cache of another capacity joins; windowed caches of different capacity are refused."""
    model = tiny_model(seed=31, sliding_window=None, max_seq_len=64)
    g = torch.Generator().manual_seed(32)
    a_tokens, b_tokens = torch.randint(0, 512, (3, 20), generator=g), torch.randint(0, 512, (1, 12), generator=g)
    with torch.no_grad():
        ref = [model(t[None], use_cache=False)[0][0] for t in (*a_tokens, *b_tokens)]
        _, a = model(a_tokens[:, :15])
        _, b = model(b_tokens[:, :7], cache=model.new_cache(1, capacity=32))
        a.select_rows(torch.tensor([2, 0]))
        a.append_rows(b)
        rows = [a_tokens[2], a_tokens[0], b_tokens[0]]
        starts = [15, 15, 7]
        for step in range(5):
            tok = torch.stack([r[s + step] for r, s in zip(rows, starts)])[:, None]
            out, a = model(tok, cache=a)
            for i, want in enumerate([ref[2], ref[0], ref[3]]):
                assert (out[i, 0] - want[starts[i] + step]).abs().max() <= 1e-5
    w8, w16 = tiny_model(seed=33, sliding_window=8).new_cache(1), tiny_model(seed=33, sliding_window=8).new_cache(1, capacity=16)
    with pytest.raises(ValueError, match="fixed capacity"):
        w8.append_rows(w16)
