"""Shared fixtures: small random models and their transformers twins."""

from __future__ import annotations

import os

import pytest
import torch

from mistral_torch import ModelArgs, Transformer

# Test models are tiny: one thread is as fast, and it never thrashes on a busy 2-core machine.
torch.set_num_threads(int(os.environ.get("MISTRAL_TORCH_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Each test starts from the same global RNG state, so that what it draws without a generator
    of its own does not depend on which tests ran before it."""
    torch.manual_seed(0)


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
                vocab_size=512, sliding_window=8, max_seq_len=256)
    base.update(overrides)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(tiny_args(**overrides)).init_weights(seed=seed).eval()


def hf_twin(model: Transformer):
    """transformers' MistralForCausalLM with the same weights, loaded through identical keys (strict)."""
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    config = transformers.MistralConfig(**cfg)
    config._attn_implementation = "eager"
    hf = transformers.MistralForCausalLM(config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf
