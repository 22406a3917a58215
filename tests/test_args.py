import pytest
import torch

from mistral_torch import ModelArgs, Transformer
from mistral_torch.args import PRESETS

EXPECTED = {
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-instruct-v0.1": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,
    "mistral-7b-instruct-v0.2": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "mistral-7b-instruct-v0.3": 7_248_023_552,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_on_meta(name):
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    assert n == args.n_params
    if name in EXPECTED:
        assert n == EXPECTED[name]


def test_7b_shapes_and_versions():
    v1, v2, v3 = (ModelArgs.from_name(f"mistral-7b-v0.{i}") for i in (1, 2, 3))
    assert (v1.sliding_window, v1.rope_theta, v1.vocab_size) == (4096, 1e4, 32000)
    assert (v2.sliding_window, v2.rope_theta) == (None, 1e6)
    assert v3.vocab_size == 32768
    with torch.device("meta"):
        m = Transformer(v1)
    sd = m.state_dict()
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 4096)
    assert sd["model.layers.31.mlp.gate_proj.weight"].shape == (14336, 4096)
    assert sd["lm_head.weight"].shape == (32000, 4096)


@pytest.mark.parametrize("bad, field", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(dim=0), "dim"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_validation_names_the_field(bad, field):
    base = ModelArgs.from_name("tiny").to_dict()
    base.update(bad)
    with pytest.raises(ValueError, match=field):
        ModelArgs(**base)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*mistral-7b-v0.1"):
        ModelArgs.from_name("nope")
    with pytest.raises(ValueError, match="bogus"):
        ModelArgs.from_dict({**ModelArgs().to_dict(), "bogus": 1})


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "mistral-7b-v0.3", "tiny", "tiny-full"])
def test_config_round_trips(name):
    args = ModelArgs.from_name(name)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    assert ModelArgs.from_params_json(args.to_params_json()) == args
    assert ModelArgs.from_dict(args.to_dict()) == args
