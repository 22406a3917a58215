"""Parity with transformers' MistralForCausalLM on the same random weights, and input validation."""

import pytest
import torch

from conftest import hf_twin, tiny_args, tiny_model
from mistral_torch import Mistral7B, Transformer

TOL = 1e-5


def test_state_dict_keys_are_hf_keys():
    model = tiny_model()
    keys = set(model.state_dict())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert "model.layers.0.mlp.down_proj.weight" in keys
    assert "model.layers.0.post_attention_layernorm.weight" in keys and "model.norm.weight" in keys
    assert set(hf_twin(model).state_dict()) == keys
    assert Mistral7B is Transformer


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (4, 4), (4, 1), (8, 2)])  # GQA, MHA, MQA
@pytest.mark.parametrize("window", [8, 16, None])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(n_heads, n_kv_heads, window, tie):
    model = tiny_model(seed=n_heads + n_kv_heads, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       sliding_window=window, tie_embeddings=tie)
    hf = hf_twin(model)
    tokens = torch.randint(0, model.args.vocab_size, (3, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        full, none = model(tokens, use_cache=False)
        chunked, cache = model(tokens)
    assert none is None
    assert (full - ref).abs().max() <= TOL
    assert (chunked - ref).abs().max() <= TOL
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sliding_window_actually_changes_logits():
    """The parity test above could not catch a window ignored by both sides; this one can."""
    windowed = tiny_model(sliding_window=8)
    full = Transformer(tiny_args(sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = windowed(tokens)[0], full(tokens)[0]
        ref = hf_twin(windowed)(tokens).logits
    assert (a[:, :8] - b[:, :8]).abs().max() <= TOL  # inside the window: identical
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3  # past it: different
    assert (a - ref).abs().max() <= TOL


def test_batch_rows_equal_single_rows():
    model = tiny_model()
    tokens = torch.randint(0, 512, (4, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched, _ = model(tokens)
        for b in range(4):
            single, _ = model(tokens[b:b + 1])
            assert (batched[b:b + 1] - single).abs().max() <= TOL


def test_last_logits_only():
    model = tiny_model()
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        all_logits, _ = model(tokens)
        last, _ = model(tokens, last_logits_only=True)
    assert last.shape == (2, 1, 512)
    assert (last[:, 0] - all_logits[:, -1]).abs().max() <= TOL


def test_bf16_close_to_fp32():
    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = model(tokens)
        low, _ = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1


def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="integer ids.*float"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -3 is outside"):
        model(torch.tensor([[-3, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    _, cache = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch size 2.*batch size 3"):
        model(torch.tensor([[1], [2], [3]]), cache=cache)
    no_window = tiny_model(sliding_window=None, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        no_window(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        no_window(torch.zeros(1, 33, dtype=torch.long), use_cache=False)
    _, cache = no_window(torch.zeros(1, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="33 positions exceeds max_seq_len=32"):
        no_window(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_window_model_runs_past_max_seq_len():
    """With a sliding window, positions are not limited by max_seq_len (the rolling cache holds W)."""
    model = tiny_model(max_seq_len=16)
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, cache = model(tokens)
    assert out.shape == (1, 40, 512) and cache.length == 40


def test_meta_build_is_instant():
    import time
    from mistral_torch import ModelArgs
    t0 = time.perf_counter()
    with torch.device("meta"):
        Transformer(ModelArgs.from_name("mistral-7b-v0.1"))
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("window", [8, 64, None])
def test_left_padded_rows_without_cache_equal_unpadded(window):
    """use_cache=False with explicit positions (-1 = padding) masks the padding, window or not."""
    model = tiny_model(sliding_window=window)
    gen = torch.Generator().manual_seed(11)
    short, long = torch.randint(0, 512, (5,), generator=gen), torch.randint(0, 512, (12,), generator=gen)
    tokens = torch.zeros(2, 12, dtype=torch.long)
    tokens[0, 7:], tokens[1] = short, long
    positions = torch.stack([torch.cat([torch.full((7,), -1), torch.arange(5)]), torch.arange(12)])
    with torch.no_grad():
        out, _ = model(tokens, positions=positions, use_cache=False)
        ref_short, _ = model(short[None], use_cache=False)
        ref_long, _ = model(long[None], use_cache=False)
    assert (out[0, 7:] - ref_short[0]).abs().max() <= TOL
    assert (out[1] - ref_long[0]).abs().max() <= TOL
