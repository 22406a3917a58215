"""The decode fast path: compiled one-token steps, growing cache buffers and the additive mask
give the same logits as the plain path and as transformers (tiny configs, CPU)."""

import pytest
import torch

from conftest import hf_twin, tiny_model
from mistral_torch.cache import GROW
from mistral_torch.generate import generate_ids

TOL = 1e-5


def decode(model, tokens, prompt_len, positions=None):
    """Prefill `prompt_len` columns, then feed the rest one token at a time; all logits."""
    with torch.inference_mode():
        first, cache = model(tokens[:, :prompt_len], positions=None if positions is None else positions[:, :prompt_len])
        outs = [first]
        for t in range(prompt_len, tokens.shape[1]):
            out, cache = model(tokens[:, t:t + 1], cache=cache)
            outs.append(out)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])  # dynamic length / whole buffer
@pytest.mark.parametrize("window", [8, None])
def test_compiled_decode_equals_plain_and_transformers(mode, window):
    model = tiny_model(seed=11, sliding_window=window)
    tokens = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(12))
    plain, _ = decode(model, tokens, 5)
    with torch.no_grad():
        ref = hf_twin(model)(tokens).logits
    model.compile_decode(mode=mode, backend="aot_eager")
    fast, cache = decode(model, tokens, 5)
    assert (fast - plain).abs().max() <= TOL
    assert (fast - ref).abs().max() <= TOL
    assert cache.length == 60 and cache.next_pos.tolist() == [60, 60]


def test_inductor_compiled_decode_far_past_the_window():
    """The real CPU inductor compilation, one graph for every position (no recompilation)."""
    torch._dynamo.reset()
    model = tiny_model(seed=13, sliding_window=8)
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(14))
    plain, _ = decode(model, tokens, 3)
    model.compile_decode()
    from torch._dynamo.utils import counters
    counters.clear()
    fast, _ = decode(model, tokens, 3)
    assert (fast - plain).abs().max() <= TOL
    # The first length, then one graph for every length, then the full buffer (which the
    # compiler specialises as contiguous): not one compilation per position.
    assert counters["stats"]["unique_graphs"] <= 3


def test_compiled_generation_equals_plain_with_ragged_batch():
    model = tiny_model(seed=15, sliding_window=8)
    prompts = [[5, 9, 42], list(range(3, 23)), [7] * 11]
    plain = generate_ids(model, prompts, max_new_tokens=30, ignore_eos=True)
    model.compile_decode(backend="aot_eager")
    assert generate_ids(model, prompts, max_new_tokens=30, ignore_eos=True) == plain


def test_cache_buffers_grow_without_moving_slots():
    """Past GROW positions the buffers are re-allocated (doubling); logits stay exact."""
    model = tiny_model(seed=16, sliding_window=None, max_seq_len=4 * GROW)
    n = GROW + 40
    tokens = torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        ref, _ = model(tokens, use_cache=False)
    fast, cache = decode(model, tokens, GROW - 20)
    assert cache.allocated == 2 * GROW and cache.capacity == 4 * GROW
    assert (fast - ref).abs().max() <= TOL
    fresh = model.new_cache(1)
    assert fresh.allocated == GROW  # a short prompt does not pay for the whole capacity


def test_window_cache_stops_at_the_window():
    model = tiny_model(seed=18, sliding_window=8)
    cache = model.new_cache(3)
    assert cache.allocated == 8
    cache.reserve(10_000)
    assert cache.allocated == 8


def test_bf16_compiled_decode_close_to_fp32():
    model = tiny_model(seed=19)
    tokens = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(20))
    ref, _ = decode(model, tokens, 4)
    model = model.to(torch.bfloat16).compile_decode(backend="aot_eager")
    low, _ = decode(model, tokens, 4)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1
