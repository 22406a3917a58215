"""quantize.py: error bounds per method, the NF4 code book and double-quant layout, the CPU kernels
against the reference math, quantized save -> load -> identical outputs, streaming load, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_torch import ModelArgs, Transformer
from mistral_torch import quantize as Q
from mistral_torch.checkpoint import load_model, save_model

from conftest import tiny_model

# The QLoRA paper's NF4 values (Dettmers et al. 2023, appendix E), as bitsandbytes ships them.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

# A model whose every linear dimension divides by 64 (tiny's hidden 160 does not; used for errors).
ARGS64 = ModelArgs(dim=128, n_layers=2, head_dim=32, hidden_dim=256, n_heads=4, n_kv_heads=2,
                   vocab_size=512, sliding_window=16, max_seq_len=256)
CASES = [("int8", None), ("int4", 32), ("int4", 128), ("nf4", None)]


def model64(seed: int = 0) -> Transformer:
    return Transformer(ARGS64).init_weights(seed=seed).eval()


def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False)[0]


def weights(seed: int, n: int, k: int, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if outliers:  # a few large values, as real checkpoints have
        w.view(-1)[torch.randint(0, n * k, (n * k // 500,), generator=g)] *= 20
    return w


# ---------------------------------------------------------------- code books and layouts
def test_nf4_code_book_is_the_published_one():
    assert Q.NF4_CODE.tolist() == torch.tensor(PUBLISHED_NF4, dtype=torch.float32).tolist()
    # ... and it is what bitsandbytes' create_normal_map(offset=0.9677083) builds: 8 positive and
    # 7 negative normal quantiles plus 0, scaled to [-1, 1]
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    assert torch.allclose((v / v.max()).float(), Q.NF4_CODE, atol=2e-7, rtol=0)


def test_dynamic_map_for_double_quant():
    code = Q.DYNAMIC_CODE
    assert code.shape == (256,) and code.unique().numel() == 256 and torch.equal(code, code.sort().values)
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and (code < 0).sum() == 127
    # exponents 10^-6 .. 10^0, 2^e fraction steps each: the smallest magnitude is 1e-6 * 0.55
    assert code.abs()[code != 0].min().item() == pytest.approx(0.55e-6, rel=1e-5)
    assert code[0].item() == pytest.approx(-(0.98593750 + 1.0) / 2, abs=1e-6)


def test_nibble_order_is_high_first():
    codes = torch.tensor([[0, 15, 7, 8]], dtype=torch.uint8)
    packed = Q.pack_nibbles(codes)
    assert packed.tolist() == [[0x0F, 0x78]]
    assert torch.equal(Q.unpack_nibbles(packed), codes)


def test_nf4_double_quant_layout():
    """bitsandbytes' description: 64-weight blocks over the flattened weight, absmax per block
    (fp32) -> minus its mean (offset) -> 8-bit dynamic-map codes in blocks of 256, one fp32
    absmax per 256 block; codes are the nearest NF4 value of w / absmax; first value high nibble."""
    N, K = 40, 192  # 120 blocks: not a multiple of 256 (partial second-level block)
    w = weights(1, N, K)
    q = Q.quantize_nf4(w)
    assert q["weight"].shape == (N, K // 2) and q["weight"].dtype == torch.uint8
    assert q["absmax"].shape == (N * K // 64,) and q["absmax"].dtype == torch.uint8
    assert q["absmax_scale"].shape == (1,) and q["absmax_scale"].dtype == torch.float32
    assert q["absmax_offset"].shape == () and q["absmax_offset"].dtype == torch.float32
    # an independent rendering of the described steps (argmin, no shared code)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    codes = (blocks / absmax[:, None]).reshape(-1, 1).sub(torch.tensor(PUBLISHED_NF4)).abs().argmin(1)
    assert torch.equal(q["weight"].reshape(-1), ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8))
    offset = absmax.mean()
    assert q["absmax_offset"].item() == pytest.approx(offset.item(), rel=1e-6)
    centered = absmax - offset
    assert q["absmax_scale"][0].item() == pytest.approx(centered.abs().max().item(), rel=1e-6)
    dyn = Q.DYNAMIC_CODE
    qa = (centered / q["absmax_scale"][0]).reshape(-1, 1).sub(dyn).abs().argmin(1)
    assert torch.equal(q["absmax"], qa.to(torch.uint8))
    restored = Q.nf4_absmax(q["absmax"], q["absmax_scale"], q["absmax_offset"])
    assert torch.allclose(restored, dyn[qa] * q["absmax_scale"][0] + offset)


def test_nf4_layout_matches_bitsandbytes_if_installed():
    bf = pytest.importorskip("bitsandbytes.functional")
    w = weights(2, 96, 256)
    packed, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = Q.quantize_nf4(w)
    assert torch.equal(packed.view(-1), ours["weight"].view(-1))
    assert torch.equal(st.state2.code.float().cpu(), Q.DYNAMIC_CODE)
    assert torch.allclose(st.state2.absmax.cpu(), ours["absmax_scale"])
    assert float(st.offset) == pytest.approx(ours["absmax_offset"].item(), rel=1e-6)
    # bitsandbytes' native CPU kernel may round a handful of absmax codes to a neighbour
    assert (st.absmax.cpu() == ours["absmax"]).float().mean() > 0.98
    # bitsandbytes dequantizes OUR buffers to our weights: the layouts are the same
    st.absmax = ours["absmax"]
    assert torch.allclose(bf.dequantize_4bit(packed, st), Q.dequantize_nf4(**ours), atol=1e-6, rtol=0)


def test_bitsandbytes_matmul_on_our_buffers_if_installed():
    """The `use_bitsandbytes` path (meant for CUDA) hands our buffers to bnb.matmul_4bit as they are."""
    pytest.importorskip("bitsandbytes")
    lin = nn.Linear(256, 128, bias=False)
    q = Q.NF4Linear.from_linear(lin)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(q._bitsandbytes(x), q(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [(64, "avx512"), (32, "avx2"), (32, "scalar")])
def test_int4_cpu_layouts_round_trip(kind):
    codes = torch.randint(0, 16, (176, 96), dtype=torch.uint8)  # full blocks and a 48/16-row tail
    packed = Q._pack_cpu_layout(codes, *kind)
    assert packed.shape == (176, 48)
    assert torch.equal(Q._unpack_cpu_layout(packed, *kind), codes)


def test_int4_layout_of_this_torch_is_recognised():
    layout = Q._cpu_int4_layout()
    if layout is None:
        pytest.skip("this torch build has no CPU int4 kernel")
    codes = torch.randint(0, 16, (144, 64), dtype=torch.int32)
    assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(codes, 1), Q._pack_cpu_layout(codes.to(torch.uint8), *layout))


# ---------------------------------------------------------------- error bounds
def test_int8_error_bound():
    w = weights(3, 64, 96)
    q, s = Q.quantize_int8(w)
    err = (Q.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # the range is used


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bound(group_size):
    w = weights(4, 48, 256)
    codes, scales, zeros = Q.quantize_int4(w, group_size)
    assert codes.max() <= 15 and scales.shape == (48, 256 // group_size) and scales.dtype == torch.bfloat16
    err = (Q.dequantize_int4(codes, scales, zeros) - w).abs().view(48, -1, group_size)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    # half a step, plus what bf16 rounding of zero/scale can push past the range's ends
    assert (err <= s / 2 + 2 ** -8 * (z.abs() + 8 * s) + 1e-7).all()
    assert err.mean() < 0.3 * scales.float().mean()  # rounding, not clamping, dominates


def test_nf4_error_bound():
    w = weights(5, 64, 128)
    q = Q.quantize_nf4(w)
    absmax = w.reshape(-1, 64).abs().amax(1)
    restored = Q.nf4_absmax(q["absmax"], q["absmax_scale"], q["absmax_offset"])
    half_gap = (Q.NF4_CODE[1:] - Q.NF4_CODE[:-1]).max() / 2
    err = (Q.dequantize_nf4(**q) - w).reshape(-1, 64).abs()
    assert (err <= half_gap * absmax[:, None] + (restored - absmax).abs()[:, None] + 1e-7).all()
    # the double quantization itself: within one dynamic-map step of the fp32 absmax
    assert ((restored - absmax).abs() <= 0.02 * q["absmax_scale"].max()).all()


def test_zero_and_constant_weights_stay_finite():
    for method, gs in CASES:
        lin = nn.Linear(128, 32, bias=False)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[:16] = 0.5
        q = Q.LINEAR_CLASSES[method].from_linear(lin, **({"group_size": gs} if gs else {}))
        w = q.dequantize()
        assert torch.isfinite(w).all() and torch.allclose(w, lin.weight, atol=1e-3), method


# ---------------------------------------------------------------- modules: kernels vs reference
@pytest.mark.parametrize("method,group_size", CASES)
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_forward_matches_dequantized_reference(method, group_size, rows):
    lin = nn.Linear(256, 192, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights(6, 192, 256))
    q = Q.LINEAR_CLASSES[method].from_linear(lin, **({"group_size": group_size} if group_size else {}))
    x = torch.randn(rows, 256)
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x, q.dequantize(torch.float32))
    assert y.dtype == x.dtype and y.shape == (rows, 192)
    if method == "nf4":  # fp32 activations in the C kernel (and in the fallback)
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    else:  # bf16 activations and outputs
        assert (y - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8_prefill_rows_widen_the_weight_for_onednn(monkeypatch):
    """From `INT8_WIDEN_MIN_ROWS` rows on, where oneDNN runs bf16 natively, an int8 linear multiplies
    its weight widened to bf16 (exact) instead of calling `_weight_int8pack_mm` (2x faster there):
    within bf16 rounding of that kernel's result; fewer rows still take the kernel."""
    from mistral_torch.fast import packing_supported

    if not packing_supported(torch.bfloat16):
        pytest.skip("oneDNN does not run bf16 natively here: int8 keeps torch's kernel")
    lin = nn.Linear(256, 192, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights(7, 192, 256))
    q = Q.Int8Linear.from_linear(lin)
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    rows = Q.INT8_WIDEN_MIN_ROWS
    x = torch.randn(rows, 256)
    with torch.no_grad():
        wide, few = q(x), q(x[:-1])
        monkeypatch.setattr(Q, "INT8_WIDEN_MIN_ROWS", 10**9)
        by_kernel = q(x)
    assert calls == [rows - 1, rows]  # `few` and `by_kernel` only
    assert (wide - by_kernel).abs().max() <= 2 ** -7 * by_kernel.abs().max()
    assert torch.equal(few, by_kernel[:-1])


def test_gradient_flows_to_the_input():
    lin = nn.Linear(128, 64, bias=False)
    for method, gs in CASES:
        q = Q.LINEAR_CLASSES[method].from_linear(lin, **({"group_size": gs} if gs else {}))
        x = torch.randn(2, 128, requires_grad=True)
        q(x).sum().backward()
        assert torch.allclose(x.grad, q.dequantize().sum(0).expand(2, -1), atol=1e-5), method


def test_int4_state_dict_is_the_plain_layout():
    lin = nn.Linear(128, 80, bias=False)
    q = Q.Int4Linear.from_linear(lin, group_size=64)
    sd = q.state_dict()
    assert set(sd) == {"weight", "scales", "zeros"}
    codes, scales, zeros = Q.quantize_int4(lin.weight, 64)
    assert torch.equal(sd["weight"], Q.pack_nibbles(codes))
    assert torch.equal(sd["scales"], scales) and torch.equal(sd["zeros"], zeros)
    plain = Q.Int4Linear(128, 80, 64, use_kernel=False)
    plain.load_state_dict(sd)
    assert plain.layout is None and torch.equal(plain.dequantize(), q.dequantize())


def test_embedding_lookup_is_rows_of_the_dequantized_table():
    emb = nn.Embedding(100, 128)
    tokens = torch.tensor([[3, 99, 0], [7, 7, 42]])
    for method, gs in CASES:
        q = Q.EMBEDDING_CLASSES[method].from_linear(emb, **({"group_size": gs, "use_kernel": False} if gs else {}))
        out = q(tokens)
        assert out.shape == (2, 3, 128) and out.dtype == torch.float32
        assert torch.equal(out, q.dequantize()[tokens]), method


def test_model_to_bf16_keeps_quantization_buffers():
    model = Q.quantize_model(model64(), "nf4")
    model.to(torch.bfloat16)
    q = model.model.layers[0].mlp.up_proj
    assert q.absmax_scale.dtype == torch.float32 and q.weight.dtype == torch.uint8 and q.dtype == torch.bfloat16
    tokens = torch.randint(0, 512, (1, 12))
    out = logits(model, tokens)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("method,group_size", CASES)
def test_quantized_model_is_close_and_small(method, group_size):
    ref = model64()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    want = logits(ref, tokens)
    model = Q.quantize_model(model64(), method, group_size)
    assert type(model.model.layers[1].self_attn.q_proj) is Q.LINEAR_CLASSES[method]
    assert type(model.model.embed_tokens) is Q.EMBEDDING_CLASSES[method]
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # same module names
    got = logits(model, tokens)
    rel = ((got - want).norm() / want.norm()).item()
    # random N(0, 0.02) weights, 2 layers: int8 costs ~2x what bf16 does (0.6 %), 4-bit ~20 %
    assert rel < {"int8": 0.03, "int4": 0.3, "nf4": 0.3}[method]
    ratio = Q.weight_bytes(model) / Q.weight_bytes(ref)
    assert ratio < {"int8": 0.27, "int4": 0.17, "nf4": 0.15}[method]  # of fp32 (bf16: twice these)


def test_generation_on_a_quantized_model():
    from mistral_torch.generate import generate_ids

    model = Q.quantize_model(model64(), "int4", 32)
    assert model.new_cache(1).k[0].dtype == torch.float32
    out = generate_ids(model, [[1, 5, 9, 42]], max_new_tokens=20, ignore_eos=True)
    assert len(out[0]) == 20
    # one token at a time through the cache == one full forward
    full = logits(model, torch.tensor([[1, 5, 9, 42] + out[0][:-1]]))
    assert full[0, 3:].argmax(-1).tolist() == out[0]


@pytest.mark.parametrize("method,group_size", CASES)
def test_save_load_identical_outputs(tmp_path, method, group_size):
    model = Q.quantize_model(model64(), method, group_size)
    tokens = torch.randint(0, 512, (2, 20))
    before = logits(model, tokens)
    Q.save_quantized(model, tmp_path / "q", max_shard_size="200KB")  # several shards
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["method"] == method and cfg["quantization"]["group_size"] == (group_size or
                                                                                             (64 if method == "nf4" else None))
    (tmp_path / "q").rename(tmp_path / "plain-name")  # recognised from config.json, not the file name
    loaded = load_model(tmp_path / "plain-name")
    assert type(loaded.lm_head) is Q.LINEAR_CLASSES[method]
    assert torch.equal(logits(loaded, tokens), before)
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key


def test_quantized_model_keeps_its_float_dtype_and_save_model_refuses_it(tmp_path):
    model = Q.quantize_model(model64().to(torch.bfloat16), "int8")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype != torch.bfloat16
    assert model.new_cache(1).k[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="save_quantized"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keep_embeddings_and_tied_models(tmp_path):
    model = Q.quantize_model(tiny_model(tie_embeddings=True), "int8", embeddings=False)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is Q.Int8Linear
    tokens = torch.randint(0, 512, (1, 10))
    Q.save_quantized(model, tmp_path / "t")
    assert torch.equal(logits(load_model(tmp_path / "t"), tokens), logits(model, tokens))


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_streaming_load_equals_quantize_after_load(tmp_path, fmt):
    ref = model64(seed=3)
    save_model(ref, tmp_path / "f", format=fmt)
    for method, gs in [("int4", 64), ("nf4", None)]:
        streamed = Q.load_and_quantize(tmp_path / "f", method, gs)
        after = Q.quantize_model(load_model(tmp_path / "f"), method, gs)
        for key, t in after.state_dict().items():
            assert torch.equal(streamed.state_dict()[key], t), key


def test_cli_quantize(tmp_path):
    from mistral_torch.cli import main

    save_model(model64(seed=4), tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--method", "int4", "--group-size", "64"]) == 0
    m = load_model(tmp_path / "q")
    assert m.quantization["method"] == "int4" and m.lm_head.group_size == 64
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--method", "int8"]) == 2  # exists


# ---------------------------------------------------------------- errors
def test_bad_method_and_group_sizes():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        Q.quantize_model(model, "int3")
    with pytest.raises(ValueError, match="group size must be one of 32, 64, 128, 256, got 48"):
        Q.quantize_model(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="int8 is quantized per output channel"):
        Q.quantize_model(model, "int8", group_size=32)
    with pytest.raises(ValueError, match="nf4 uses blocks of 64"):
        Q.quantize_model(model, "nf4", group_size=128)
    # tiny's FFN hidden size is 160: not divisible by 64, and the error names the layer
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj .*in_features \(160\) is not divisible by 64"):
        Q.quantize_model(model, "int4", group_size=64)
    assert all(type(m) in (nn.Linear, nn.Embedding) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Embedding, Q.QuantizedLinear)))  # untouched


def test_unknown_quantization_in_config_is_refused(tmp_path):
    model = Q.quantize_model(model64(), "int8")
    Q.save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization"]["method"] = "int2"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="int2"):
        load_model(tmp_path / "q")


def test_chunked_quantization_equals_whole(monkeypatch):
    """Large matrices are quantized in row chunks (bounded temporaries): same result."""
    w = weights(8, 320, 160)
    whole = (Q.quantize_int8(w), Q.quantize_int4(w, 32), Q.quantize_nf4(w))
    chunks = Q._row_chunks
    monkeypatch.setattr(Q, "_row_chunks", lambda n, k, m=1, max_elems=0: chunks(n, k, m, max_elems=1000))
    assert len(list(Q._row_chunks(320, 160, 2))) > 10
    parts = (Q.quantize_int8(w), Q.quantize_int4(w, 32), Q.quantize_nf4(w))
    for a, b in zip(whole[:2], parts[:2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(whole[2][k], parts[2][k]) for k in whole[2])
