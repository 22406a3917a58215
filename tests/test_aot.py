"""The batch-1 decode step compiled ahead of time (`compile_decode(aot=True, fused=False)`, aot.py): the plain
path's logits far past the window, its package reused by a model of the same shapes (reading that
model's own weights, also after they move), an int8 cache, and the torch.compile step wherever
the ahead-of-time one does not apply or cannot be built."""

import copy

import pytest
import torch

from conftest import tiny_model
from mistral_torch import aot

TOL = 1e-5


def decode(model, tokens, prompt_len):
    """Prefill `prompt_len` columns, then one token at a time; all logits."""
    with torch.inference_mode():
        first, cache = model(tokens[:, :prompt_len])
        outs = [first]
        for t in range(prompt_len, tokens.shape[1]):
            out, cache = model(tokens[:, t:t + 1], cache=cache)
            outs.append(out)
    return torch.cat(outs, dim=1)


def tokens_for(seed, batch=1, length=40):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_aot_step_equals_the_plain_path_and_its_package_is_reused():
    model = tiny_model(seed=41, sliding_window=8)
    tokens = tokens_for(42)
    plain = decode(model, tokens, 3)
    model.compile_decode(aot=True, fused=False)
    fast = decode(model, tokens, 3)
    assert model._aot_step.runner is not None and not model._aot_step.failed
    assert model._aot_step.steps == 37  # every decode step, past the window too
    assert (fast - plain).abs().max() <= TOL  # 37 steps, the window of 8 crossed four times over
    path = aot.package_path(model, torch.float32)
    assert path.exists()

    # Same shapes, other weights: the package is loaded, not rebuilt, and reads this model's weights.
    other = tiny_model(seed=43, sliding_window=8)
    reference = copy.deepcopy(other)
    other.compile_decode(aot=True, fused=False)
    assert aot.package_path(other, torch.float32) == path
    built = path.stat().st_mtime_ns
    assert (decode(other, tokens, 3) - decode(reference, tokens, 3)).abs().max() <= TOL
    assert path.stat().st_mtime_ns == built

    # Parameters moved to new storage (`p.data = ...`) are read where they now are.
    with torch.no_grad():
        for m in (other, reference):
            m.lm_head.weight.data = m.lm_head.weight.data * 2
    assert (decode(other, tokens, 3) - decode(reference, tokens, 3)).abs().max() <= TOL

    # Another setting of a module (here the norm's eps) is another graph: another package.
    changed = tiny_model(seed=43, sliding_window=8).compile_decode(aot=True, fused=False)
    changed.model.norm.eps = 1e-3
    assert aot.package_path(changed, torch.float32) != path
    assert aot.package_path(other, torch.int8) != path


@pytest.mark.slow
def test_aot_step_reads_an_int8_cache_as_the_compiled_step_does():
    base = tiny_model(seed=44, sliding_window=8)
    base.kv_cache_dtype = torch.int8
    compiled, ahead = copy.deepcopy(base).compile_decode(fused=False), copy.deepcopy(base).compile_decode(aot=True, fused=False)
    tokens = tokens_for(45, length=30)
    expected = decode(compiled, tokens, 3)
    assert (decode(ahead, tokens, 3) - expected).abs().max() <= TOL
    assert ahead._aot_step.kv_dtype == torch.int8


def test_batches_and_failures_take_the_compiled_step(monkeypatch):
    model = tiny_model(seed=46, sliding_window=8)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cannot export this")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(aot, "package_path", lambda m, kv: aot.Path("/nonexistent/never-built.pt2"))
    two, one = tokens_for(47, batch=2, length=20), tokens_for(48, length=20)
    plain_two, plain_one = decode(model, two, 3), decode(model, one, 3)
    model.compile_decode(aot=True, fused=False)
    assert (decode(model, two, 3) - plain_two).abs().max() <= TOL
    assert calls == []  # batch 2: never tried
    with pytest.warns(UserWarning, match="ahead-of-time decode step unavailable.*cannot export this"):
        fast_one = decode(model, one, 3)
    assert (fast_one - plain_one).abs().max() <= TOL
    assert calls == [1] and model._aot_step.failed  # tried once, then the torch.compile step throughout
