"""Checkpoints: HF and Mistral-native round trips, transformers interop, memory, and clear errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import hf_twin, tiny_model
from mistral_torch import ModelArgs, Transformer, checkpoint
from mistral_torch.checkpoint import (
    ModelNotFoundError, hf_to_native, load_model, native_to_hf, resolve_model_path, save_model,
)
from mistral_torch.cli import main as cli_main

transformers = pytest.importorskip("transformers")


def model_for(seed: int = 0, **overrides) -> Transformer:
    """A tiny random model with non-default rope_theta / norm_eps, so config mistakes show."""
    base = dict(sliding_window=None, rope_theta=1e6, norm_eps=1e-6)
    return tiny_model(seed=seed, **{**base, **overrides})


def tokens(model: Transformer, n: int = 12) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model, toks: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Transformer):
        return model(toks, use_cache=False)[0].float()
    return model(toks).logits.float()


def same_state(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def hf_load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


# ---------------------------------------------------------------- names and paths
def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path
    shipped = tmp_path / "models"
    (shipped / "demo").mkdir(parents=True)
    monkeypatch.setattr(checkpoint, "MODELS_DIR", shipped)
    assert resolve_model_path("demo") == shipped / "demo"
    with pytest.raises(ValueError, match=r"unknown model 'nope': not a folder or file, and not a shipped "
                                         r"model \(known: demo\)"):
        resolve_model_path("nope")
    with pytest.raises(ValueError, match="unknown model 'tiny-en-fr'"):
        resolve_model_path(None)  # the default name, not shipped in this fake models/ folder
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", "demo")
    assert resolve_model_path(None) == shipped / "demo"


def test_load_model_without_shipped_default_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(ValueError, match=r"unknown model 'tiny-en-fr'.*known: none shipped yet"):
        load_model()


# ---------------------------------------------------------------- HF format
@pytest.mark.parametrize("tie", [False, True])
def test_hf_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    model = model_for(seed=1, tie_embeddings=tie)
    save_model(model, tmp_path / "hf", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is tie
    hf = hf_load(tmp_path / "hf")
    toks = tokens(model)
    assert (logits(hf, toks) - logits(model, toks)).abs().max() <= 1e-5
    back = load_model(tmp_path / "hf")
    assert same_state(model, back)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tie


def test_hf_shards_respect_max_shard_size(tmp_path):
    model = model_for()
    save_model(model, tmp_path / "hf", max_shard_size="30KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    for name in shards:
        sd = load_file(tmp_path / "hf" / name)
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        assert nbytes <= 30_000 or len(sd) == 1  # a tensor over the limit gets a shard of its own
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert set(index["weight_map"]) == set(model.state_dict())
    save_model(model, tmp_path / "one")  # default 5GB: one file
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_sharded_save_pretrained_loads_with_same_logits(tmp_path, tie):
    hf = hf_twin(model_for(seed=2, tie_embeddings=tie))
    torch.manual_seed(0)
    with torch.no_grad():  # make the norms non-trivial so a wrong mapping would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 3
    ours = load_model(tmp_path / "hf")
    toks = tokens(ours)
    assert (logits(ours, toks) - logits(hf, toks)).abs().max() <= 1e-5


def test_plain_pytorch_model_bin_loads(tmp_path):
    model = model_for()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert same_state(model, load_model(folder))


# ---------------------------------------------------------------- dtypes
def test_bf16_save_and_load(tmp_path):
    model = model_for(seed=4)
    save_model(model, tmp_path / "hf", dtype="bf16")
    save_model(model, tmp_path / "native", format="mistral", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = Transformer(model.args).to(torch.bfloat16)
    expected.load_state_dict(model.state_dict())  # copy_ casts fp32 -> bf16
    for folder in ("hf", "native"):
        back = load_model(tmp_path / folder)  # dtype=None keeps the stored bf16
        assert back.lm_head.weight.dtype == torch.bfloat16
        assert same_state(expected, back)
        assert load_model(tmp_path / folder, dtype="fp32").lm_head.weight.dtype == torch.float32
    hf = hf_load(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    toks = tokens(model)
    assert (logits(hf, toks) - logits(expected, toks)).abs().max() <= 2e-2
    assert load_model(tmp_path / "hf", dtype="float16").lm_head.weight.dtype == torch.float16


# ---------------------------------------------------------------- Mistral native format
def reference_native_logits(sd: dict[str, torch.Tensor], p: dict, toks: torch.Tensor) -> torch.Tensor:
    """An independent forward pass over native weights, with RoPE on interleaved complex pairs
    (x[2i] + i x[2i+1]) as mistral-inference does it; full causal attention."""
    B, T = toks.shape
    nh, nkv, hd, eps = p["n_heads"], p["n_kv_heads"], p["head_dim"], p["norm_eps"]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (B, T, H, hd)
        xc = torch.view_as_complex(x.reshape(B, T, x.shape[2], hd // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None]).flatten(3)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    h = sd["tok_embeddings.weight"][toks]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        L = f"layers.{i}."
        x = rms(h, sd[L + "attention_norm.weight"])
        q = rope((x @ sd[L + "attention.wq.weight"].T).view(B, T, nh, hd))
        k = rope((x @ sd[L + "attention.wk.weight"].T).view(B, T, nkv, hd))
        v = (x @ sd[L + "attention.wv.weight"].T).view(B, T, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, nh * hd)
        h = h + o @ sd[L + "attention.wo.weight"].T
        x = rms(h, sd[L + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[L + "feed_forward.w1.weight"].T) * (x @ sd[L + "feed_forward.w3.weight"].T)) \
            @ sd[L + "feed_forward.w2.weight"].T
    out = sd.get("output.weight", sd["tok_embeddings.weight"])
    return rms(h, sd["norm.weight"]) @ out.T


@pytest.mark.parametrize("tie", [False, True])
def test_native_round_trip_is_bit_exact_with_mistral_names(tmp_path, tie):
    model = model_for(seed=5, tie_embeddings=tie)
    save_model(model, tmp_path / "native", format="mistral")
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["consolidated.safetensors", "params.json"]
    sd = load_file(tmp_path / "native" / "consolidated.safetensors")
    a = model.args
    shapes = {
        "tok_embeddings.weight": (a.vocab_size, a.dim), "norm.weight": (a.dim,),
        **({} if tie else {"output.weight": (a.vocab_size, a.dim)}),
    }
    for i in range(a.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (a.n_heads * a.head_dim, a.dim),
            f"layers.{i}.attention.wk.weight": (a.n_kv_heads * a.head_dim, a.dim),
            f"layers.{i}.attention.wv.weight": (a.n_kv_heads * a.head_dim, a.dim),
            f"layers.{i}.attention.wo.weight": (a.dim, a.n_heads * a.head_dim),
            f"layers.{i}.feed_forward.w1.weight": (a.hidden_dim, a.dim),
            f"layers.{i}.feed_forward.w2.weight": (a.dim, a.hidden_dim),
            f"layers.{i}.feed_forward.w3.weight": (a.hidden_dim, a.dim),
            f"layers.{i}.attention_norm.weight": (a.dim,), f"layers.{i}.ffn_norm.weight": (a.dim,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert ModelArgs.from_params_json(params) == model.args
    back = load_model(tmp_path / "native")
    assert same_state(model, back)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tie


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(4, 2, 16), (8, 8, 8), (4, 1, 16)])
def test_native_weights_match_interleaved_rope_reference(tmp_path, n_heads, n_kv_heads, head_dim):
    model = model_for(seed=6, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    save_model(model, tmp_path / "native", format="mistral")
    sd = load_file(tmp_path / "native" / "consolidated.safetensors")
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    q_hf = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(sd["layers.0.attention.wq.weight"], q_hf)  # rows really were permuted
    toks = tokens(model, 10)
    ref = reference_native_logits(sd, params, toks)
    assert (ref - logits(model, toks)).abs().max() <= 1e-5
    # ...and a native checkpoint written by someone else (the reference's own weights) loads right.
    other = {k: torch.randn_like(v) * 0.05 if v.dim() == 2 else v for k, v in sd.items()}
    folder = tmp_path / "theirs"
    folder.mkdir()
    save_file(other, folder / "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps(params))
    assert (logits(load_model(folder), toks) - reference_native_logits(other, params, toks)).abs().max() <= 1e-5


def test_rope_permutations_are_inverse():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(hf_to_native(native_to_hf(w, 4), 4), w)
    assert torch.equal(native_to_hf(hf_to_native(w, 4), 4), w)
    # head 0, native row pairs (0, 1) = (re, im) of frequency 0 land on HF rows 0 and head_dim/2
    hf = native_to_hf(w, 4)
    assert torch.equal(hf[0], w[0]) and torch.equal(hf[8], w[1]) and torch.equal(hf[1], w[2])


# ---------------------------------------------------------------- atomic writes
def test_save_refuses_existing_folder_and_overwrites_on_request(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model_for(), dst)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    save_model(model_for(), dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(model_for(), tmp_path / "out", max_shard_size="30KB")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI
def test_cli_convert_both_ways(tmp_path, capsys):
    model = model_for(seed=7)
    save_model(model, tmp_path / "src", extra_files=[], max_shard_size="50KB")
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"tok")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "nat"), "--to", "mistral"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "nat" / "tokenizer.model").read_bytes() == b"tok"
    assert same_state(model, load_model(tmp_path / "nat"))
    assert cli_main(["convert", str(tmp_path / "nat"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert load_model(tmp_path / "hf").lm_head.weight.dtype == torch.bfloat16
    assert cli_main(["convert", str(tmp_path / "nat"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nat"), str(tmp_path / "hf"), "--to", "hf", "--force"]) == 0
    assert same_state(model, load_model(tmp_path / "hf"))
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- quantization hook
def test_unknown_quantization_is_refused_by_name(tmp_path):
    save_model(model_for(), tmp_path / "q", extra_config={"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match=r"declares 'quantization_config' \(method 'gptq'\)"):
        load_model(tmp_path / "q")


def test_registered_quantization_loader_is_used(tmp_path, monkeypatch):
    save_model(model_for(), tmp_path / "q", extra_config={"quantization": {"method": "int8"}})
    seen = {}

    def loader(folder, config, args, dtype, device):
        seen.update(folder=folder, method=config["quantization"]["method"], args=args)
        return "quantized model"

    monkeypatch.setitem(checkpoint.QUANTIZED_LOADERS, "int8", loader)
    assert load_model(tmp_path / "q") == "quantized model"
    assert seen["method"] == "int8" and seen["args"] == model_for().args


# ---------------------------------------------------------------- bad folders: one clear message each
@pytest.fixture
def good_hf(tmp_path) -> Path:
    save_model(model_for(), tmp_path / "hf", max_shard_size="40KB")
    return tmp_path / "hf"


def _single(tmp_path, mutate) -> Path:
    """An HF folder with one model.safetensors, whose state dict `mutate` edits."""
    model = model_for()
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    mutate(sd)
    save_file(sd, folder / "model.safetensors")
    return folder


def test_error_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model folder .*nowhere does not exist") as err:
        load_model(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_error_unknown_format(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown checkpoint format .*found: weights.ckpt"):
        load_model(tmp_path)


def test_error_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(model_for().args.to_hf_config()))
    with pytest.raises(FileNotFoundError, match="has config.json but no weights"):
        load_model(tmp_path)


def test_error_missing_keys(tmp_path):
    folder = _single(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing key\(s\): model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_error_unexpected_keys(tmp_path):
    folder = _single(tmp_path, lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected key\(s\): model.extra.weight"):
        load_model(folder)


def test_error_missing_keys_are_listed_a_few_at_a_time(tmp_path):
    def drop(sd):
        for k in [k for k in sd if k.startswith("model.layers.0.")]:
            sd.pop(k)
    with pytest.raises(ValueError, match=r"missing key\(s\): (model\.layers\.0\.\S+, ){4}\S+ \(and 4 more\)"):
        load_model(_single(tmp_path, drop))


def test_error_shape_mismatch(tmp_path):
    folder = _single(tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.norm.weight' .*expected \(64,\) .*got \(32,\)"):
        load_model(folder)


def test_error_config_disagrees_with_weights(good_hf):
    config = json.loads((good_hf / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (good_hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json disagrees with the weights: it says 3 layers "
                                         r"\(num_hidden_layers\), the weights .* hold 2"):
        load_model(good_hf)


def test_error_truncated_safetensors(good_hf):
    shard = sorted(good_hf.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard.name}: corrupt or truncated safetensors file"):
        load_model(good_hf)


def test_error_corrupt_safetensors(good_hf):
    shard = sorted(good_hf.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=rf"{shard.name}: corrupt or truncated safetensors file"):
        load_model(good_hf)


def test_error_missing_shard(good_hf):
    shard = sorted(good_hf.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {shard.name} listed in .*index.json is missing"):
        load_model(good_hf)


def test_shards_without_index_load_and_a_gap_is_named(good_hf):
    expected = load_model(good_hf)
    (good_hf / "model.safetensors.index.json").unlink()
    assert same_state(expected, load_model(good_hf))
    shard = sorted(good_hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {shard.name} is missing from"):
        load_model(good_hf)


def test_error_invalid_config_json(good_hf):
    (good_hf / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_model(good_hf)


def test_error_unsafe_pickle_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(model_for().args.to_hf_config()))
    torch.save({"model.norm.weight": torch.ones(64), "payload": argparse.Namespace(x=1)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model.bin: it is not a plain-tensor "
                                         r"checkpoint.*weights_only=True"):
        load_model(tmp_path)


def test_error_bad_arguments(tmp_path, good_hf):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        load_model(good_hf, dtype="int4")
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        save_model(model_for(), tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="cannot read size 'lots'"):
        save_model(model_for(), tmp_path / "x", max_shard_size="lots")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- peak memory
CHILD = textwrap.dedent("""
    import json, os, sys
    import torch
    from mistral_torch import ModelArgs, Transformer
    from mistral_torch.checkpoint import load_model

    # The first meta-device module pulls in torch's Python meta kernels (~70 MB of imports, once
    # per process, independent of the checkpoint): pay that before measuring.
    with torch.device("meta"):
        Transformer(ModelArgs.from_name("tiny"))

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    try:  # reset the high-water mark, so the peak is that of loading alone
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    before = rss()
    model = load_model(sys.argv[1], dtype=sys.argv[2])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak() - before, "weights": weights}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("fmt, dtype", [("hf", "float32"), ("mistral", "bfloat16")])
def test_peak_memory_of_loading_is_about_one_copy(tmp_path, fmt, dtype):
    # ~200 MB of fp32 weights in 40 MB shards; the largest single tensor is ~4% of the total.
    args = ModelArgs(dim=512, n_layers=16, head_dim=64, hidden_dim=1536, n_heads=8, n_kv_heads=2,
                     vocab_size=4000, sliding_window=None, max_seq_len=256)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, tmp_path / "ckpt", format=fmt, max_shard_size="40MB")
    del model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(checkpoint.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), dtype], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = r["growth"] / r["weights"]
    assert r["weights"] > 90e6
    assert ratio <= 1.3, f"peak RSS growth {r['growth'] / 1e6:.0f} MB = {ratio:.2f}x weights"
