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


# ---------------------------------------------------------------- int8 cache
def test_quantize_int8_round_trip():
    """Each vector's largest magnitude maps to ±127, every value within half a step of its original,
    an all-zero vector to zeros with scale 0."""
    from mistral_torch.cache import dequantize_int8, quantize_int8

    x = torch.randn(3, 4, 5, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 5)[:, None]
    x[0, 0, 0] = 0.0
    values, scale = quantize_int8(x)
    assert values.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(scale, x.abs().amax(-1) / 127)
    assert torch.equal(values.abs().amax(-1)[scale > 0], torch.full_like(scale[scale > 0], 127, dtype=torch.int8))
    assert (dequantize_int8(values, scale, torch.float32) - x).abs().le(scale[..., None] * 0.5001).all()
    assert scale[0, 0, 0] == 0 and not values[0, 0, 0].any()
    assert dequantize_int8(values, scale, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("window", [8, None])
def test_int8_cache_decoding_is_chunking_invariant_and_close_to_full(window):
    """Through an int8 cache every query attends to the keys and values as stored (rounded), also
    those of its own chunk, so any split of the sequence gives the same logits, far past the window;
    they stay close to the unquantized forward. In float64: in fp32, a key projected by a one-row
    and by a many-row matmul can differ in its last bit and round to neighbouring int8 steps."""
    model = tiny_model(sliding_window=window).double()
    model.kv_cache_dtype = torch.int8
    tokens = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, _ = model(tokens, use_cache=False)
        outs = [run_in_chunks(model, tokens, sizes) for sizes in
                ([1] * 80, [3, 7, 1, 12, 2, 9, 16, 5, 1, 1, 23], [50, 1, 1, 1, 27], [80])]
    first, cache = outs[0]
    assert cache.k[0].dtype == torch.int8 and cache.k_scale[0].shape == cache.k[0].shape[:3]
    for out, _ in outs[1:]:
        assert (out - first).abs().max() <= TOL
    err = (first - ref).abs().max() / ref.abs().max()
    assert 1e-4 < err < 0.01  # rounded (not exact), and close


def test_int8_cache_memory_and_validation():
    model = tiny_model(sliding_window=8)
    f32, q8 = model.new_cache(2), model.new_cache(2, kv_dtype=torch.int8)
    with torch.no_grad():
        for c in (f32, q8):
            model(torch.ones(2, 20, dtype=torch.long), cache=c)
    hd = model.args.head_dim
    kv_bytes = lambda c: c.nbytes() - c.slot_pos.numel() * 8
    assert kv_bytes(q8) / kv_bytes(f32) == pytest.approx((hd + 4) / (4 * hd))  # int8 values + an fp32 scale per vector
    with pytest.raises(ValueError, match="kv_dtype must be the model's dtype"):
        model.new_cache(1, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="cannot join"):
        f32.append_rows(q8)


def test_int8_cache_rows_leave_and_join_exactly():
    """A running batch on int8 caches (what generation and the server do): rows cut out and joined
    continue exactly as each row decoded alone through an int8 cache."""
    model = tiny_model(seed=31, sliding_window=8)
    model.kv_cache_dtype = torch.int8
    g = torch.Generator().manual_seed(32)
    a_tokens, b_tokens = torch.randint(0, 512, (3, 20), generator=g), torch.randint(0, 512, (1, 12), generator=g)
    with torch.no_grad():
        ref = [run_in_chunks(model, t[None], [1] * len(t))[0][0] for t in (*a_tokens, *b_tokens)]
        _, a = model(a_tokens[:, :15])
        _, b = model(b_tokens[:, :7])
        a.select_rows(torch.tensor([2, 0]))
        a.append_rows(b)
        rows, starts = [a_tokens[2], a_tokens[0], b_tokens[0]], [15, 15, 7]
        for step in range(5):
            tok = torch.stack([r[s + step] for r, s in zip(rows, starts)])[:, None]
            out, a = model(tok, cache=a)
            for i, want in enumerate([ref[2], ref[0], ref[3]]):
                assert (out[i, 0] - want[starts[i] + step]).abs().max() <= TOL


def test_next_token_plan_equals_the_general_plan():
    """`plan_next_token` (batch-1 decode, host arithmetic) plans what `plan` plans for the same
    token, through growth and past the wrap, and its commit leaves the cache in the same state."""
    fast = RollingKVCache(1, 1, 2, 4, capacity=300, window=300)
    slow = RollingKVCache(1, 1, 2, 4, capacity=300, window=300)
    for pos in range(700):  # grows at 256, wraps at 300
        steps = []
        for c, host in ((fast, True), (slow, False)):
            c.reserve(pos + 1)
            step = c.plan_next_token(int(c.next_pos.item())) if host else c.plan(c.next_pos[:, None], max(pos + 1, c.allocated))
            steps.append(step)
            c.commit(step, max(c.length, pos + 1))
        a, b = steps
        assert a.write_first and b.write_first and a.used == b.used
        assert torch.equal(a.q_pos, b.q_pos) and torch.equal(a.k_pos, b.k_pos)
        assert all(torch.equal(x, y) for x, y in zip(a.index, b.index))
        assert torch.equal(fast.slot_pos, slow.slot_pos) and torch.equal(fast.next_pos, slow.next_pos)
        assert fast.length == slow.length == pos + 1
