"""The decode fast path: compiled one-token steps, growing cache buffers and the additive mask
give the same logits as the plain path and as transformers (tiny configs, CPU)."""

import os
import platform
import shutil

import pytest
import torch

from conftest import hf_twin, tiny_model
from mistral_torch.cache import GROW
from mistral_torch import fused
from mistral_torch.fused import FusedDecoder
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
    model.compile_decode(fused=False)
    from torch._dynamo.utils import counters
    counters.clear()
    fast, _ = decode(model, tokens, 3)
    assert (fast - plain).abs().max() <= TOL
    # One graph for every position: the short cache, the full window, and after it wraps.
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("window", [None, 2 * GROW])
def test_inductor_compiled_decode_while_buffers_grow(window):
    """The buffers grow (GROW slots, then doubling) as the sequence lengthens: still one graph.
    Without a window the cache keeps only what the sequence needs (no full-capacity buffers); with
    one, a single row's buffers grow until they hold the whole window, and its slot positions keep
    one layout at every size (else a second compilation there: a 20-35 s stall)."""
    torch._dynamo.reset()
    model = tiny_model(seed=18, sliding_window=window, max_seq_len=4 * GROW)
    tokens = torch.randint(0, 512, (1, GROW + 30), generator=torch.Generator().manual_seed(19))
    plain, _ = decode(model, tokens, GROW - 30)
    model.compile_decode(fused=False)
    from torch._dynamo.utils import counters
    counters.clear()
    fast, cache = decode(model, tokens, GROW - 30)
    assert (fast - plain).abs().max() <= TOL
    assert counters["stats"]["unique_graphs"] == 1
    if window is None:
        assert cache.allocated == 2 * GROW < cache.capacity
    else:
        assert cache.allocated == cache.capacity == window


@pytest.mark.skipif(os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1", reason="inductor caches disabled")
def test_compiled_step_is_served_from_inductor_caches():
    """The compiled step is stock inductor over plain torch ops, so its on-disk caches work: a second
    compilation (a new process, here a reset) loads the code instead of generating it again."""
    from torch._dynamo.utils import counters
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(26))
    outs = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(seed=25, sliding_window=8).compile_decode(fused=False)
        outs.append(decode(model, tokens, 4)[0])
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert torch.equal(outs[0], outs[1])


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


# ---------------------------------------------------------------- packed linears (oneDNN)
from mistral_torch import fast  # noqa: E402

needs_onednn = pytest.mark.skipif(not fast.packing_supported(torch.float32), reason="oneDNN not available")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_packed_linear_equals_linear(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    packed = fast.PackedLinear.from_linear(linear)
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed.weight is linear.weight and list(packed.state_dict()) == ["weight"]


@needs_onednn
def test_packed_linear_follows_weight_updates_and_autograd():
    """A changed weight is repacked (no stale copy); with autograd on, the plain weight is used."""
    torch.manual_seed(1)
    packed = fast.PackedLinear.from_linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = packed(x)
        packed.load_state_dict({"weight": 2 * packed.weight.detach().clone()})
        after = packed(x)
    assert torch.allclose(after, 2 * before, atol=1e-5)
    packed(x).sum().backward()
    assert torch.allclose(packed.weight.grad, x.sum(0).expand(16, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_linear_equals_fp32_matmul_block_by_block(dtype, monkeypatch):
    """bf16/fp16 weights multiplied in fp32, in one piece or in row blocks (a small block here):
    the blocks may round a sum differently, by at most one unit of the low precision."""
    torch.manual_seed(2)
    w = (torch.randn(40, 96) * 0.1).to(dtype)
    x = torch.randn(2, 17, 96).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    whole = fast.upcast_linear(x, w)
    monkeypatch.setattr(fast, "UPCAST_BLOCK", 96 * 7)  # 7 rows a block: 6 blocks, the last short
    blocks = fast.upcast_linear(x, w)
    assert whole.shape == blocks.shape == (2, 17, 40) and whole.dtype == dtype
    assert torch.equal(whole, want)
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    assert torch.allclose(blocks.float(), want.float(), rtol=ulp, atol=1e-6)


@pytest.mark.skipif(fast.multi_row_kernel(torch.bfloat16) != "upcast", reason="this CPU runs bf16 natively")
def test_packed_bf16_linear_upcasts_from_min_rows():
    """Without bf16 hardware, 16+ rows go through the fp32 upcast; fewer rows stay bf16 (F.linear)."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    packed = fast.PackedLinear.from_linear(linear)
    with torch.no_grad():
        for rows in (fast.UPCAST_MIN_ROWS - 1, fast.UPCAST_MIN_ROWS, 100):
            x = torch.randn(rows, 64).to(torch.bfloat16)
            upcast = torch.nn.functional.linear(x.float(), linear.weight.float()).to(torch.bfloat16)
            want = upcast if rows >= fast.UPCAST_MIN_ROWS else torch.nn.functional.linear(x, linear.weight)
            assert torch.equal(packed(x), want), rows
    assert "upcast" in repr(packed)


@pytest.mark.skipif(fast.multi_row_kernel(torch.bfloat16) != "upcast", reason="this CPU runs bf16 natively")
def test_plain_bf16_model_upcasts_linears_of_inference_forwards(monkeypatch):
    """The plain (unpacked) bf16 model: an inference forward of 16+ rows multiplies every linear in
    fp32 (`fast.upcast_linears`), with the logits of the packed model; fewer rows, or autograd, do not."""
    model = tiny_model(seed=23, sliding_window=8).to(torch.bfloat16)
    packed = tiny_model(seed=23, sliding_window=8).to(torch.bfloat16)
    fast.pack_linears(packed)
    calls = []
    upcast = fast.upcast_linear
    monkeypatch.setattr(fast, "upcast_linear", lambda x, w: calls.append(w.shape) or upcast(x, w))
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(24))  # 24 rows
    linears = 7 * model.args.n_layers + 1
    with torch.inference_mode():
        for use_cache in (True, False):
            calls.clear()
            got, _ = model(tokens, use_cache=use_cache)
            assert len(calls) == linears, use_cache
            calls.clear()
            want, _ = packed(tokens, use_cache=use_cache)
            assert len(calls) == linears and torch.equal(got, want)
        calls.clear()
        model(tokens[:1, :fast.UPCAST_MIN_ROWS - 1])
        assert calls == []
    model(tokens)  # autograd on: the plain bf16 matmul, which has a backward
    assert calls == []


@needs_onednn
def test_pack_linears_keeps_state_dict_and_logits():
    model = tiny_model(seed=21, sliding_window=8)
    tokens = torch.randint(0, 512, (3, 30), generator=torch.Generator().manual_seed(22))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = decode(model, tokens, 5)
    assert fast.pack_linears(model) == 4 * model.args.n_layers + 3 * model.args.n_layers + 1
    packed, _ = decode(model, tokens, 5)
    assert (packed - plain).abs().max() <= TOL
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    assert fast.unpack_linears(model) == 7 * model.args.n_layers + 1
    assert not any(isinstance(m, fast.PackedLinear) for m in model.modules())


@needs_onednn
def test_two_compiled_models_keep_their_own_weights():
    """Module guards are skipped for speed: each model must still run its own graph and weights,
    batch 1 (fused reductions) and batch 3 (packed oneDNN linears inside the graph)."""
    torch._dynamo.reset()
    a, b = tiny_model(seed=23, sliding_window=8), tiny_model(seed=24, sliding_window=8)
    tokens = torch.randint(0, 512, (3, 14), generator=torch.Generator().manual_seed(25))
    want = {(name, n): decode(m, tokens[:n], 4)[0] for name, m in (("a", a), ("b", b)) for n in (1, 3)}
    a.compile_decode(fused=False)
    b.compile_decode(fused=False)
    for n in (1, 3):
        for name, m in (("a", a), ("b", b)):
            got, _ = decode(m, tokens[:n], 4)
            assert (got - want[name, n]).abs().max() <= TOL, (name, n)


def test_compile_decode_accepts_every_mode():
    """torch.compile refuses a mode together with options: the guard filter goes only where no mode is given."""
    model = tiny_model(seed=28)
    for mode in (None, "reduce-overhead", "max-autotune-no-cudagraphs"):
        model.compile_decode(mode=mode)
        assert model._decode_step is not None


@needs_onednn
def test_quantize_after_compile_decode_reaches_the_packed_linears():
    """compile_decode swaps the linears for `PackedLinear`s (nn.Linear subclasses); quantizing after
    it still finds every one (it once looked for exact nn.Linear and quantized nothing)."""
    from mistral_torch.quantize import Int8Linear, quantize_model

    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(29))
    compiled = tiny_model(seed=28, sliding_window=8).compile_decode()
    assert sum(isinstance(m, fast.PackedLinear) for m in compiled.modules()) == 7 * compiled.args.n_layers + 1
    compiled = quantize_model(compiled, "int8") or compiled
    plain = tiny_model(seed=28, sliding_window=8)
    plain = quantize_model(plain, "int8") or plain
    assert sum(type(m) is Int8Linear for m in compiled.modules()) == 7 * compiled.args.n_layers + 1
    assert not any(isinstance(m, fast.PackedLinear) for m in compiled.modules())
    with torch.inference_mode():
        assert torch.equal(compiled(tokens)[0], plain(tokens)[0])


def test_compiled_step_follows_module_swaps():
    """Swapping modules after compile_decode (here: LoRA) recompiles instead of running a stale graph."""
    from mistral_torch.lora import apply_lora

    model = tiny_model(seed=26, sliding_window=8)
    model.compile_decode(backend="aot_eager")
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(27))
    decode(model, tokens, 4)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    compiled, _ = decode(model, tokens, 4)
    step, model._decode_step = model._decode_step, None
    plain, _ = decode(model, tokens, 4)
    model._decode_step = step
    assert (compiled - plain).abs().max() <= TOL


# ---------------------------------------------------------------- C++ few-row kernel (AVX2)
def test_other_compiled_code_that_registers_modules_compiles_once():
    """The module-registration hook this package installs (it tells the compiled step that LoRA or
    quantization swapped modules) runs for every module in the process. Code that registers modules
    inside a compiled forward (transformers slices its ModuleList) must not see it as a changed
    global: before, each call recompiled, and under fullgraph=True the recompile limit was an error."""
    from torch._dynamo.utils import counters

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[:2]:  # a new ModuleList: registers its modules
                x = layer(x)
            return x

    torch._dynamo.reset()
    counters.clear()
    net = Net()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    x = torch.randn(2, 4)
    for _ in range(12):
        assert torch.allclose(compiled(x), net.layers[1](net.layers[0](x)))
    assert counters["stats"]["unique_graphs"] == 1


needs_kernels = pytest.mark.skipif(not fast.cpp_kernels(), reason="C++ kernels unavailable here (not x86 AVX2/AVX-512, or no compiler)")
ULP = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11])
@pytest.mark.parametrize("features", [96, 208])
def test_small_linear_equals_fp32_matmul(dtype, rows, features):
    """Every row count (in passes of up to 8 rows; on AVX512-BF16 CPUs bf16 passes of 2-8 rows take
    16 / rows weight rows at a time, with weight rows left over: 37 and 5 outputs), odd output
    sizes, 3-D inputs, features not a multiple of 32 (208: the AVX512-BF16 path's masked tail, on
    CPUs that have it); fp32 accumulation, rounded once to x's dtype: within one unit of that dtype of the fp32 product."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(37, features, generator=g).to(dtype)
    x = torch.randn(1, rows, features, generator=g).to(dtype)
    want = (x.float() @ w.float().t())
    got = fast.small_linear(x, w)
    assert got.shape == (1, rows, 37) and got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=ULP[dtype], atol=1e-5)
    mixed = fast.small_linear(x.float(), w)  # fp32 activations, low-precision weight
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, want, rtol=1e-5, atol=1e-5)
    w2, w3 = torch.randn(5, features, generator=g).to(dtype), torch.randn(64, features, generator=g).to(dtype)
    stacked = fast.small_linear(x, w, w2, w3)  # several weights: their outputs side by side
    assert stacked.shape == (1, rows, 37 + 5 + 64)
    assert torch.equal(stacked, torch.cat([got, fast.small_linear(x, w2), fast.small_linear(x, w3)], dim=-1))


@needs_kernels
@pytest.mark.parametrize("threads", [2, 3])
def test_small_linear_splits_rows_between_threads_exactly(threads):
    """With several threads, 16-bit weights are taken in 64 KB blocks, each thread its own share
    first and then what is left of the others' (fp32: one share each): every output row is
    computed once, as on one thread, bit for bit, also for outputs stacked from several weights."""
    g = torch.Generator().manual_seed(threads)
    old = torch.get_num_threads()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ws = [torch.randn(n, 32, generator=g).to(dtype) for n in (5000, 77, 3001)]  # 1024-row blocks
        x = torch.randn(2, 32, generator=g).to(dtype)
        torch.set_num_threads(threads)
        try:
            fast.small_linear(x + 1, *ws)  # its freed output becomes `got`'s: a skipped row would show
            got = fast.small_linear(x, *ws)
            torch.set_num_threads(1)
            want = fast.small_linear(x, *ws)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(got, want), dtype
        assert torch.allclose(got.float(), x.float() @ torch.cat(ws).float().t(), rtol=ULP[dtype], atol=1e-4)


@needs_kernels
def test_small_linear_refuses_what_it_cannot_multiply():
    w = torch.randn(8, 40)  # 40 features: not a multiple of 16
    assert not fast.small_linear_fits(w) and not fast.small_linear_fits(torch.randn(8, 48).t())
    assert fast.small_linear_fits(torch.randn(8, 48)) and not fast.small_linear_fits(torch.randn(8, 48).double())
    with pytest.raises(RuntimeError, match="multiple of 16"):
        fast.small_linear(torch.randn(1, 40), w)
    with pytest.raises(RuntimeError, match="x has 32 features, the weight 48"):
        fast.small_linear(torch.randn(1, 32), torch.randn(8, 48))
    with pytest.raises(RuntimeError, match="weights of 48 and 32 features cannot be stacked"):
        fast.small_linear(torch.randn(1, 48), torch.randn(8, 48), torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="weights of dtypes Float and BFloat16 cannot be stacked"):
        fast.small_linear(torch.randn(1, 48), torch.randn(8, 48), torch.randn(8, 48).bfloat16())


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or torch.backends.cpu.get_cpu_capability() not in fast.KERNEL_CPUS
                    or shutil.which(os.environ.get("CXX", "c++")) is None
                    or os.environ.get("MISTRAL_TORCH_CPP_KERNELS", "1") == "0",
                    reason="the C++ kernels are for x86 AVX2/AVX-512 CPUs with a C++ compiler (and not switched off)")
def test_cpp_kernels_build_where_they_should():
    """Where the kernels are meant to run, they build: a compile error in `decode_kernels.cpp` must
    fail here, not skip every test marked `needs_kernels`."""
    assert fast.cpp_kernels(), "csrc/decode_kernels.cpp did not build (see the warning)"
    # built in a folder named after the source, flags and versions: `kernels_ready` trusts what it finds there
    assert (fast._kernel_build_dir() / "mistral_torch_cpu.so").exists() and fast.kernels_ready()


def test_kernel_build_folder_follows_torch_extensions_dir(monkeypatch, tmp_path):
    """$TORCH_EXTENSIONS_DIR moves the build (as it moves torch's own): an empty one has nothing
    built, so the command line would decode eagerly and print its tip rather than wait ~20 s."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert fast._kernel_build_dir().parent == tmp_path
    monkeypatch.setattr(fast, "_kernels_loaded", False)
    monkeypatch.setattr(fast, "kernels_supported", lambda: True)
    assert not fast.kernels_ready()


def test_kernel_build_failure_falls_back_with_a_warning(monkeypatch):
    """No compiler (or ninja): a warning that says why, and the compiled step keeps torch's kernels."""
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(fast.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match=r"C\+\+ decode kernels unavailable.*Ninja is required"):
        assert fast.cpp_kernels.__wrapped__() is False
    monkeypatch.setenv("MISTRAL_TORCH_CPP_KERNELS", "0")
    assert fast.cpp_kernels.__wrapped__() is False


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_attention_equals_sdpa(dtype, group):
    """The C++ decode attention against SDPA in fp32: grouped query heads, keys read from a slice of
    longer cache buffers (as the decode step does), masked keys (-inf), batch rows with their own masks."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(group)
    B, nkv, S, hd = 2, 2, 45, 32
    kbuf, vbuf = (torch.randn(B, nkv, S + 19, hd, generator=g).to(dtype) for _ in range(2))
    k, v = kbuf[:, :, :S], vbuf[:, :, :S]
    q = torch.randn(B, nkv * group, 1, hd, generator=g).to(dtype)
    masked = torch.rand(B, 1, 1, S, generator=g) < 0.4
    masked[..., -1] = False  # a query always sees itself
    bias = torch.zeros(B, 1, 1, S).masked_fill(masked, float("-inf")).to(dtype)
    assert fast.decode_attention_fits(q, k, v)
    got = fast.decode_attention(q, k, v, bias)
    qg = q.float().reshape(B, nkv, group, hd)
    want = F.scaled_dot_product_attention(qg, k.float(), v.float(), attn_mask=bias.float()).reshape(B, -1, 1, hd)
    assert got.shape == q.shape and got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=ULP[dtype] if dtype != torch.float32 else 1e-5, atol=1e-5 if dtype == torch.float32 else ULP[dtype])
    assert not fast.decode_attention_fits(q.float(), k, v) or dtype == torch.float32  # one dtype for q, k, v
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)  # values laid out as a fresh projection's
    assert torch.equal(fast.decode_attention(q, k, vt, bias), got)


@needs_kernels
@pytest.mark.parametrize("dtype,cache", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float32, "int8")])
def test_decode_attention_stops_at_each_rows_last_unmasked_slot(dtype, cache):
    """Slots after a row's last unmasked one, rounded up to a multiple of 8 (the empty tail of grown
    cache buffers), are not read: NaN keys and values there leave the result bit for bit that over
    the row's prefix of zero-filled buffers."""
    from mistral_torch.cache import quantize_int8

    g = torch.Generator().manual_seed(7)
    B, nkv, S, hd, lengths = 3, 2, 40, 64, [40, 17, 1]
    k, v = (torch.randn(B, nkv, S, hd, generator=g) for _ in range(2))
    q = torch.randn(B, nkv * 3, 1, hd, generator=g).to(dtype)
    bias = torch.zeros(B, 1, 1, S)
    bias[..., 5] = float("-inf")  # a masked slot inside the prefix stays masked
    for b, n in enumerate(lengths):
        bias[b, ..., n:] = float("-inf")
        k[b, :, n:], v[b, :, n:] = 0.0, 0.0  # empty slots of a cache
        k[b, :, -(-n // 8) * 8:], v[b, :, -(-n // 8) * 8:] = float("nan"), float("nan")
    bias = bias.to(dtype)

    def attend(q, k, v, bias):
        if cache == "int8":
            (k8, ks), (v8, vs) = quantize_int8(k), quantize_int8(v)  # NaN rows: NaN scales
            return fast.decode_attention(q, k8, v8, bias, ks, vs)
        return fast.decode_attention(q, k.to(dtype), v.to(dtype), bias)

    got = attend(q, k, v, bias)
    assert not got.isnan().any()
    for b, n in enumerate(lengths):
        one, m = slice(b, b + 1), -(-n // 8) * 8
        assert torch.equal(got[one], attend(q[one], k[one, :, :m], v[one, :, :m], bias[one, ..., :m]))


@needs_kernels
def test_fused_decode_step_reads_no_empty_slot():
    """The fused step attends to the slots up to the last one it sees: NaN in the empty tail of the
    cache buffers (grown 256 slots at a time) leaves its logits equal to a clean cache's."""
    model = tiny_model(seed=53, sliding_window=None)
    tokens = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(54))
    model.compile_decode()
    with torch.inference_mode():
        _, clean = model(tokens[:, :6])
        _, dirty = model(tokens[:, :6])
        for t in dirty.buffers():
            t[:, :, 8:] = float("nan")  # slot 6 takes the next token; slot 7 is read, as zeros
        want, _ = model(tokens[:, 6:], cache=clean)
        got, _ = model(tokens[:, 6:], cache=dirty)
    assert model._fused_step.steps == 2 and dirty.allocated > 7
    assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("dtype,kernels", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_inductor_compiled_decode_runs_the_cpp_kernels(dtype, kernels):
    """The compiled step calls `small_linear` for every linear, q/k/v and gate/up each in one call
    (but fp32 batch 1: inductor's fused reductions) and `decode_attention` in every layer, at
    batch 1 and batch 3 (none with kernels=False), with the plain path's logits (fp32: within
    1e-5; bf16: the same greedy tokens and close logits)."""
    from torch.profiler import profile

    torch._dynamo.reset()
    model = tiny_model(seed=31, sliding_window=8).to(dtype)
    tokens = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(32))
    want = {n: decode(model, tokens[:n], 4)[0] for n in (1, 3)}
    want_short = decode(model, tokens[:, :6], 1)[0]  # a one-token prompt: fresh k, v (no cache yet)
    model.compile_decode(kernels=kernels, fused=False)
    for n in (1, 3):
        decode(model, tokens[:n], 4)  # compile
        with profile() as prof:
            got, _ = decode(model, tokens[:n], 20)
        calls = {e.key: e.count for e in prof.key_averages()}
        # 4 decode steps after a 20-token prompt, each: one call for q/k/v, one for gate/up, one each
        # for o_proj, down_proj and lm_head (fp32 batch 1: none, inductor's reductions)
        linears = 0 if dtype == torch.float32 and n == 1 else 4 * (4 * model.args.n_layers + 1)
        assert calls.get("mistral_torch_cpu::small_linear", 0) == kernels * linears, n
        assert calls.get("mistral_torch_cpu::decode_attention", 0) == kernels * 4 * model.args.n_layers, n
        if dtype == torch.float32:
            assert (got - want[n]).abs().max() <= TOL
            assert (decode(model, tokens[:, :6], 1)[0] - want_short).abs().max() <= TOL
        else:
            assert (got.float() - want[n].float()).abs().max() < 0.05
            assert torch.equal(got[:, 20:].argmax(-1), want[n][:, 20:].argmax(-1))
    # 10 rows, more than small_linear takes: the same (dynamic) graph, each linear's multi-row kernel
    many = torch.randint(0, 512, (10, 22), generator=torch.Generator().manual_seed(33))
    want_many = decode(tiny_model(seed=31, sliding_window=8).to(dtype), many, 19)[0]
    got_many = decode(model, many, 19)[0]
    assert (got_many.float() - want_many.float()).abs().max() <= (TOL if dtype == torch.float32 else 0.05)


def test_compile_decode_puts_linear_weights_on_one_huge_page_block(tmp_path):
    """On Linux, compile_decode moves the linear weights into one block (2 MB-aligned, madvised for
    huge pages), in module order; values, tying, saving and the compiled step are unchanged."""
    import platform

    from mistral_torch import load_model, save_model

    model = tiny_model(seed=41, tie_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(42))
    want = decode(model, tokens, 4)[0]
    model.compile_decode()
    weights = list(dict.fromkeys(m.weight for m in model.modules() if isinstance(m, fast.PackedLinear)))
    if platform.system() == "Linux":
        ptrs = [w.data_ptr() for w in weights]
        assert ptrs[0] % fast.HUGE_PAGE == 0 and ptrs == sorted(ptrs)
        span = ptrs[-1] + weights[-1].numel() * weights[-1].element_size() - ptrs[0]
        assert span < sum(w.numel() * w.element_size() for w in weights) + 64 * len(weights)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one (tied) parameter
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    assert (decode(model, tokens, 4)[0] - want).abs().max() <= TOL
    save_model(model, tmp_path / "saved")  # separate storages: safetensors writes them
    reloaded = load_model(tmp_path / "saved")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())


def test_huge_page_weights_leaves_weights_alone_where_the_kernel_refuses(monkeypatch):
    """A kernel without transparent huge pages refuses the advice: the weights stay where they are."""
    import mmap

    model = tiny_model(seed=43)
    fast.pack_linears(model)
    ptrs = [m.weight.data_ptr() for m in model.modules() if isinstance(m, fast.PackedLinear)]

    class NoAdvice(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", NoAdvice)
    assert fast.huge_page_weights(model) == 0
    assert ptrs == [m.weight.data_ptr() for m in model.modules() if isinstance(m, fast.PackedLinear)]


@needs_kernels
def test_bench_small_linear_runs(tmp_path):
    """The kernel benchmark's plumbing (weight groups, both page layouts, JSON) on the tiny preset."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_small_linear.py"
    out = tmp_path / "sl.json"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--dtypes", "bf16", "--rows", "1,3",
                          "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rows"], r["weights"].split(" (")[0]) for r in rows] == [
        (1, "4 KB pages"), (1, "2 MB pages"), (3, "4 KB pages"), (3, "2 MB pages")]
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)


@needs_kernels
def test_bench_decode_attention_runs(tmp_path):
    """The attention benchmark's plumbing (every cache kind, speeds relative to the model dtype's,
    JSON) on the tiny preset."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_attention.py"
    out = tmp_path / "att.json"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--keys", "40", "--rounds", "1",
                          "--avx2-int8", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["query"], r["cache"]) for r in rows] == [("fp32", "fp32"), ("fp32", "int8"), ("bf16", "bf16"), ("bf16", "int8"),
                                                         ("fp32", "int8 AVX2"), ("bf16", "int8 AVX2")]
    assert all(r["ms"] > 0 for r in rows) and [r["speed"] for r in rows][:4:2] == [1.0, 1.0]


@needs_kernels
def test_bench_decode_runs_int8_weights(tmp_path):
    """bench_decode's `--int8` plumbing on the tiny preset: the int8 model runs in the fused step,
    its roofline counted on its own (about a quarter of fp32's) bytes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--dtypes", "fp32", "--batches", "1",
                          "--prompt", "8", "--new", "6", "--repeats", "1", "--no-hf", "--no-llama", "--no-aot",
                          "--int8", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"mistral-torch eager b1", "mistral-torch fused b1", "mistral-torch int8 fused b1"}
    int8, fp32 = rows["mistral-torch int8 fused b1"], rows["mistral-torch fused b1"]
    assert int8["weights"] == "int8" and int8["tok_s"] > 0
    assert 0.25 < int8["weight_MB"] / fp32["weight_MB"] < 0.3  # 1 byte a weight + fp32 scales, norms in fp32


def test_bench_prefill_runs(tmp_path):
    """bench_prefill's plumbing on the tiny preset: ours and transformers against the matmul peak
    measured between rounds (fp32 on a CPU), JSON rows that say which peak."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefill.py"
    out = tmp_path / "prefill.json"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--dtypes", "fp32", "--prompt", "32",
                          "--repeats", "1", "--no-llama", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"mistral-torch", "transformers"} <= set(rows)
    assert all(r["matmul_peak_dtype"] == "fp32" and r["matmul_GFLOPs"] > 0 and 0 < r["pct_matmul_peak"]
               for r in rows.values())


@needs_kernels
def test_bench_long_runs(tmp_path):
    """bench_long's plumbing on the tiny preset past a window of 16 with an int8 cache in the fused
    step: both positions timed, the paired ratio per round, and the ratio the bytes allow (< 1: the
    far step reads the window's keys and values besides the weights)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long.py"
    out = tmp_path / "long.json"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--window", "16", "--short", "4",
                          "--long", "80", "--burst", "3", "--repeats", "2", "--compile", "--kv-cache", "int8",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["position_far"] > 80 > 16 > r["position_near"] and r["fused_steps"] == r["decode_steps"]
    assert len(r["ratio_far_near_rounds"]) == 2 and r["ratio_far_near_paired"] > 0
    assert 0.5 < r["ratio_bytes_bound"] < 1 and r["cache_read_far_MB"] > 0


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


@needs_kernels
@pytest.mark.skipif(not {"avx512bw", "avx512_vnni"} <= _cpu_flags(), reason="no AVX512-VNNI: one form only")
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_int8_decode_attention_vnni_equals_avx2(head_dim):
    """The int8 cache's attention with AVX512-VNNI (`vpdpbusd` scores, `vpdpwssd` weighted sums)
    gives the AVX2 kernel's results bit for bit: both sums are exact integers, added to the output in
    the same blocks of 128 keys. Every group size, key counts around the kernels' steps and blocks
    (1, 5, 16, 127-129, 300), masked keys, rows with different numbers of unmasked slots."""
    from mistral_torch.cache import quantize_int8

    g = torch.Generator().manual_seed(head_dim)
    for group in range(1, 9):
        for S in (1, 5, 16, 127, 128, 129, 300):
            B, nkv = 2, 2
            (k, ks), (v, vs) = (quantize_int8(torch.randn(B, nkv, S + 3, head_dim, generator=g) * 3) for _ in range(2))
            k, v, ks, vs = k[:, :, :S], v[:, :, :S], ks[:, :, :S], vs[:, :, :S]
            q = torch.randn(B, nkv * group, 1, head_dim, generator=g)
            bias = torch.zeros(B, 1, 1, S).masked_fill(torch.rand(B, 1, 1, S, generator=g) < 0.3, float("-inf"))
            bias[0, ..., -1] = 0.0
            bias[1, ..., S // 2:] = float("-inf")  # the second row stops halfway
            bias[1, ..., 0] = 0.0
            got = fast.decode_attention(q, k, v, bias, ks, vs)
            with fast.int8_vnni(False):
                want = fast.decode_attention(q, k, v, bias, ks, vs)
            assert torch.equal(got, want), (group, S)
            assert got.abs().sum() > 0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_attention_reads_an_int8_cache(dtype, group):
    """The C++ decode attention over int8 keys and values with their scales equals SDPA (fp32) over
    the dequantized ones; scales read from a slice of longer buffers, masked keys; bad scales refused.
    With head_dim 64 the kernel also rounds the query to int8 (integer dot products): exact here for
    queries on an int8 grid, within the rounding for any other. The softmax weights (times the value
    scales) are rounded to int16 for the weighted sum: at most half a unit (the largest / 32767) each."""
    import torch.nn.functional as F

    from mistral_torch.cache import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(group)
    B, nkv, S, hd = 2, 2, 45, 64
    (kbuf, ks_buf), (vbuf, vs_buf) = (quantize_int8(torch.randn(B, nkv, S + 19, hd, generator=g) * 3) for _ in range(2))
    k, v, ks, vs = kbuf[:, :, :S], vbuf[:, :, :S], ks_buf[:, :, :S], vs_buf[:, :, :S]
    q = torch.randint(-127, 128, (B, nkv * group, 1, hd), generator=g) / 64  # x 1/sqrt(64): still on the grid
    q[..., 0] = 127 / 64  # each head's largest magnitude: its int8 scale is exact
    masked = torch.rand(B, 1, 1, S, generator=g) < 0.4
    masked[..., -1] = False
    bias = torch.zeros(B, 1, 1, S).masked_fill(masked, float("-inf")).to(dtype)
    kf, vf = dequantize_int8(k, ks, torch.float32), dequantize_int8(v, vs, torch.float32)

    def sdpa(q):
        return F.scaled_dot_product_attention(q.float().reshape(B, nkv, group, hd), kf, vf,
                                              attn_mask=bias.float()).reshape(B, -1, 1, hd)

    q = q.to(dtype)
    assert fast.decode_attention_fits(q, k, v)
    got = fast.decode_attention(q, k, v, bias, ks, vs)
    want = sdpa(q)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else ULP[dtype]
    p = torch.softmax(q.double().reshape(B, nkv, group, hd) @ kf.double().transpose(-1, -2) / hd**0.5
                      + bias.double(), -1) * vs.double()[:, :, None, :]  # what each int8 value is weighted by
    weight_rounding = 0.5 * p.amax(-1, keepdim=True) / 32767 * (p > 0).double() @ v.double().abs()
    assert ((got.double() - want.double()).abs() <= tol * want.abs().max() + weight_rounding.reshape(got.shape)).all()
    q_any = torch.randn(q.shape, generator=g).to(dtype)  # off the grid: rounded to int8 inside
    err = (fast.decode_attention(q_any, k, v, bias, ks, vs).float() - sdpa(q_any)).abs().max() / sdpa(q_any).abs().max()
    assert err < 0.02
    with pytest.raises(RuntimeError, match="k_scale and v_scale go with int8"):
        fast.decode_attention(q, k, v, bias)
    with pytest.raises(RuntimeError, match="float32 \\(B, Hkv, S\\)"):
        fast.decode_attention(q, k, v, bias, ks[:, :, :-1], vs[:, :, :-1])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiled_decode_reads_an_int8_cache(dtype):
    """The compiled step over an int8 cache: the C++ attention reads int8 in every layer, one graph
    for every position far past the window, the eager int8 path's logits. fp32: the kernel's own
    rounding (softmax weights to int16) adds at most a tenth of what the int8 cache itself
    changes against an fp32 cache."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    torch._dynamo.reset()
    model = tiny_model(seed=41, sliding_window=8).to(dtype)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(42))
    exact, _ = decode(model, tokens, 4)  # an fp32 cache
    model.kv_cache_dtype = torch.int8
    want, _ = decode(model, tokens, 4)
    model.compile_decode(fused=False)  # the compiled step (batches would run fused)
    decode(model, tokens[:, :8], 4)  # compile
    counters.clear()
    with profile() as prof:
        got, cache = decode(model, tokens, 4)
    assert cache.k[0].dtype == torch.int8
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("mistral_torch_cpu::decode_attention", 0) == 36 * model.args.n_layers
    assert counters["stats"]["unique_graphs"] == 0  # no recompilation at any length
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 0.1 * (want - exact).abs().max()
    else:
        assert (got.float() - want.float()).abs().max() < 0.05


# ---------------------------------------------------------------- the batch-1 step in one C++ call (fused.py)
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv", [None, torch.int8])
@pytest.mark.parametrize("window", [8, None])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_decode_step_equals_the_plain_path(dtype, kv, window, rows):
    """compile_decode()'s steps of up to 8 rows go through `decode_step`, one C++ call, with nothing
    compiled, every step of 43 (far past a window of 8), also for a ragged batch (rows 2 and 3 padded
    on the left by 2 and 3, so each row is at its own position): the plain path's logits (fp32:
    within 1e-5 of the largest logit; over an int8 cache, within a tenth of what the int8 cache
    itself changes, as for the compiled step; bf16/fp16: close, the same token where one clearly
    leads) and the same cache afterwards (slot positions, keys, values). Weights from the test's own
    generator, so that the result does not depend on which tests ran before."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model(seed=51, sliding_window=window).to(dtype)
    g = torch.Generator().manual_seed(51)
    with torch.no_grad():  # larger weights than the default init: logits of a few units, real softmaxes
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tokens = torch.randint(0, 512, (rows, 48), generator=torch.Generator().manual_seed(52))
    positions = torch.stack([torch.arange(48) - pad for pad in (0, 2, 3)[:rows]]).clamp(min=-1)
    exact, _ = decode(model, tokens, 5, positions)
    model.kv_cache_dtype = kv
    want, want_cache = decode(model, tokens, 5, positions)
    model.compile_decode()
    counters.clear()
    got, cache = decode(model, tokens, 5, positions)
    assert model._fused_step.steps == 43
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled
    assert torch.equal(cache.slot_pos, want_cache.slot_pos) and torch.equal(cache.next_pos, want_cache.next_pos)
    assert cache.next_pos.tolist() == [48, 46, 45][:rows] and cache.length == want_cache.length == 48
    if dtype == torch.float32 and kv is None:  # logits up to ~10 here: TOL relative to the largest
        assert (got - want).abs().max() <= TOL * want.abs().max()
        assert all((a - b).abs().max() <= TOL for a, b in zip(cache.buffers(), want_cache.buffers()))
    elif dtype == torch.float32:
        assert (got - want).abs().max() <= 0.1 * (want - exact).abs().max()
    else:  # 16-bit: within 5 % of the logits' range, and the same token wherever the lead is clear
        tol = 0.05 * want.float().abs().max()
        assert (got.float() - want.float()).abs().max() < tol
        top2 = want.float().topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * tol
        assert clear.sum() >= 5 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@needs_kernels
def test_compile_decode_without_a_compiler_fuses_what_it_can_and_runs_the_rest_eagerly():
    """`compile_decode(backend=None)` (the CLI's default once the kernels are built): one-row steps
    through the fused C++ step, a batch larger than it takes through the eager `_run`, nothing
    compiled; logits those of the plain path, far past a window of 8."""
    from torch._dynamo.utils import counters

    model = tiny_model(seed=53, sliding_window=8)
    tokens = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(53))
    rows = FusedDecoder(model).max_rows + 1
    batch = torch.randint(0, 512, (rows, 30), generator=torch.Generator().manual_seed(54))
    want_one, _ = decode(model, tokens, 5)
    want_batch, _ = decode(model, batch, 5)
    model.compile_decode(backend=None)
    counters.clear()
    got_one, _ = decode(model, tokens, 5)
    assert model._fused_step.steps == 25
    got_batch, _ = decode(model, batch, 5)
    assert model._fused_step.steps == 25  # the batch went to the eager step
    assert counters["stats"]["unique_graphs"] == 0
    assert (got_one - want_one).abs().max() <= TOL * want_one.abs().max()
    assert (got_batch - want_batch).abs().max() <= TOL * want_batch.abs().max()


@needs_kernels
def test_fused_decode_step_takes_only_what_it_can_run(monkeypatch):
    """The fused step reads the model's parameters in place (a load_state_dict is seen) and tied
    embeddings; LoRA-wrapped or quantized linears, batches of more than `max_rows` and explicit
    positions go to the compiled step, with the plain path's logits. `max_rows` is 16 for this
    small fp32 model (its weights stay in the CPU's caches between passes), 8 for a large one,
    16 for a large bf16 one where the CPU has AVX512_BF16."""
    from mistral_torch.lora import apply_lora
    from mistral_torch.quantize import quantize_model

    tokens = torch.randint(0, 512, (17, 20), generator=torch.Generator().manual_seed(53))
    model = tiny_model(seed=54, sliding_window=8).compile_decode()
    other = tiny_model(seed=55, sliding_window=8)
    model.load_state_dict(other.state_dict())
    assert (decode(model, tokens[:1], 6)[0] - decode(other, tokens[:1], 6)[0]).abs().max() <= TOL
    assert model._fused_step.steps == 14
    assert model._fused_step.max_rows == 16
    assert (decode(model, tokens[:16], 6)[0] - decode(other, tokens[:16], 6)[0]).abs().max() <= TOL  # two passes of 8
    assert model._fused_step.steps == 28
    assert (decode(model, tokens, 6)[0] - decode(other, tokens, 6)[0]).abs().max() <= TOL  # 17: compiled
    with torch.inference_mode():  # explicit positions: the compiled step
        _, cache = model(tokens[:1, :6])
        model(tokens[:1, 6:7], cache=cache, positions=torch.tensor([[6]]))
    assert model._fused_step.steps == 28

    monkeypatch.setattr(fused, "CACHE_RESIDENT_BYTES", 0)  # as if its weights did not fit the caches
    assert tiny_model(seed=54).compile_decode()._fused_step.max_rows == 8
    bf16_rows = 16 if fused.bf16_dot_products(torch.bfloat16) else 8  # measured on AVX512_BF16 CPUs only
    assert tiny_model(seed=54).to(torch.bfloat16).compile_decode()._fused_step.max_rows == bf16_rows
    assert tiny_model(seed=54).to(torch.float16).compile_decode()._fused_step.max_rows == 8

    tied = tiny_model(seed=56, sliding_window=8, tie_embeddings=True)
    want = decode(tied, tokens[:1], 6)[0]
    tied.compile_decode()
    assert (decode(tied, tokens[:1], 6)[0] - want).abs().max() <= TOL and tied._fused_step.steps == 14

    assert tiny_model(seed=57).compile_decode(backend="aot_eager")._fused_step is None  # no C++ kernels there
    lora = tiny_model(seed=57, sliding_window=8).compile_decode()
    assert lora._fused_step is not None
    apply_lora(lora, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    decode(lora, tokens[:1], 18)  # new modules: the step is set up again, without the fused step
    assert lora._fused_step is None and not FusedDecoder.fits(lora)
    assert FusedDecoder.fits(quantize_model(tiny_model(seed=58, sliding_window=8), "int8"))
    assert not FusedDecoder.fits(quantize_model(tiny_model(seed=58, sliding_window=8), "int4", group_size=32))
    assert not FusedDecoder.fits(tiny_model(seed=58, hidden_dim=168))  # the kernels step 16 features at a time
    mixed = tiny_model(seed=58, sliding_window=8)  # q int8, k and v not: they are multiplied side by side
    mixed.model.layers[0].self_attn.q_proj = quantize_model(tiny_model(seed=58), "int8").model.layers[0].self_attn.q_proj
    assert not FusedDecoder.fits(mixed)


@needs_kernels
def test_small_linear_int8_multiplies_in_integers():
    """`small_linear_int8`: x rounded to int16 per row (max |x| / 32767 a unit) times int8 weights
    with their per-row scales, several weights side by side: within the rounding of x (half a unit
    per element) of the exact product with the dequantized weights, for 1-17 rows, in_features not
    a multiple of 32 (the masked tail) and over one 4096-element segment; bf16 x gives bf16 out.
    Where the CPU has AVX512-VNNI its kernel equals the AVX2 one bit for bit. Bad weights or scales
    are named."""
    from mistral_torch.quantize import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(8)
    vnni = {"avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()
    for K in (16, 160, 768, 4112):
        for rows in (1, 2, 3, 8, 9, 17):
            ws, ss = zip(*(quantize_int8(torch.randn(N, K, generator=g)) for N in (37, 6)))
            x = torch.randn(rows, K, generator=g) * 3
            got = fast.small_linear_int8(x, ws, ss)
            w = torch.cat([dequantize_int8(q, sc).double() for q, sc in zip(ws, ss)])
            want = x.double() @ w.T
            unit = x.abs().amax(1, keepdim=True).double() / 32767
            bound = 0.5 * unit * w.abs().sum(1) + 1e-6 * (x.double().abs() @ w.abs().T)
            assert got.shape == (rows, 43) and ((got.double() - want).abs() <= bound).all(), (K, rows)
            if vnni:
                with fast.int8_vnni(False):
                    assert torch.equal(fast.small_linear_int8(x, ws, ss), got), (K, rows)
    assert fast.small_linear_int8(x.bfloat16(), ws, ss).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="int8 \\(N, K\\)"):
        fast.small_linear_int8(x, [w.float() for w in ws], ss)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32 \\(N,\\)"):
        fast.small_linear_int8(x, ws, [sc[:-1] for sc in ss])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_runs_int8_weights(dtype):
    """A model quantized to int8 (linears, LM head, embedding) decodes through the fused step: from
    a cache prefilled by the model with those weights dequantized, its steps give the dequantized
    model's logits within the int16 rounding of the activations, closer than the eager int8 linears
    (bf16 activations in torch's `_weight_int8pack_mm`): fp32 within 1e-3 of the logits' scale, bf16
    no farther than the eager path. Three rows past the window of 8, over a cache of the model's
    dtype and an int8 one."""
    import copy

    from mistral_torch.quantize import QuantizedLinear, quantize_model

    torch.manual_seed(0)
    quantized = quantize_model(tiny_model(seed=60, sliding_window=8).to(dtype), "int8")
    dequantized = tiny_model(seed=0, sliding_window=8).to(dtype)
    dequantized.load_state_dict({**{n + ".weight": m.dequantize(dtype) for n, m in quantized.named_modules()
                                    if isinstance(m, QuantizedLinear)},
                                 **dict(quantized.named_parameters())})
    fused_model = copy.deepcopy(quantized).compile_decode()
    assert fused_model._fused_step is not None
    tokens = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(61))
    for kv in (None, torch.int8):
        with torch.inference_mode():
            _, prefilled = dequantized(tokens[:, :6], cache=dequantized.new_cache(3, kv_dtype=kv))
            logits = {}
            for name, m in (("eager", quantized), ("fused", fused_model), ("dequantized", dequantized)):
                cache, steps = copy.deepcopy(prefilled), []
                for t in range(6, tokens.shape[1]):
                    out, cache = m(tokens[:, t:t + 1], cache=cache)
                    steps.append(out.float())
                logits[name] = torch.cat(steps, 1)
        want = logits["dequantized"]
        err = {name: (logits[name] - want).abs().max().item() for name in ("eager", "fused")}
        if dtype == torch.float32:
            assert err["fused"] <= 1e-3 * want.abs().max() and err["fused"] < err["eager"] / 4, err
        else:
            assert err["fused"] <= err["eager"], err
    assert fused_model._fused_step.steps == 2 * 18


@needs_kernels
@pytest.mark.parametrize("avx512", [False, True])
def test_compile_decode_packs_for_onednn_only_where_it_pays(monkeypatch, avx512):
    """With the C++ kernels taking the decode rows, oneDNN's packed copy (one more copy of every linear
    weight) is kept only on AVX-512 CPUs, for prefill, and not when the step is compiled ahead of time."""
    monkeypatch.setattr(fast, "avx512", lambda: avx512)
    for aot, packed in ((False, avx512), (True, False)):
        model = tiny_model(seed=3).compile_decode(aot=aot, fused=False)
        linears = [m for m in model.modules() if isinstance(m, fast.PackedLinear)]
        assert linears and all(m.small for m in linears)
        assert all(m.onednn == packed for m in linears), (aot, avx512)
        assert (model._aot_step is not None) == aot
        if packed:  # the eager prefill of a prompt goes through the packed weight and still matches
            tokens = torch.randint(0, model.args.vocab_size, (1, 24))
            with torch.inference_mode():
                plain = tiny_model(seed=3)(tokens)[0]
                torch.testing.assert_close(model(tokens)[0], plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [8, None])
def test_masked_prefill_attends_block_by_block_to_the_keys_each_block_sees(monkeypatch, window):
    """A prefill whose mask hides keys from whole blocks of queries (causal, sliding window, a
    wrapped cache) attends per block of `QUERY_BLOCK` queries to the key span the block sees
    (`key_spans`): the logits of transformers' full forward, and of attention over every key when
    padding is involved; a span one key short would not be."""
    import mistral_torch.model as model_module
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 16)
    used = []
    spans_of = model_module.key_spans
    monkeypatch.setattr(model_module, "key_spans", lambda bias: used.append(spans_of(bias)) or used[-1])
    model = tiny_model(seed=61, sliding_window=window)
    tokens = torch.randint(0, 512, (2, 110), generator=torch.Generator().manual_seed(62))
    with torch.no_grad():
        want = hf_twin(model)(tokens).logits
    with torch.inference_mode():
        first, cache = model(tokens[:, :70])  # window 8: wraps the cache in the first chunk
        second, _ = model(tokens[:, 70:], cache=cache)  # the cache's rolled slots, then the new keys
    assert (torch.cat([first, second], dim=1) - want).abs().max() <= TOL
    # Without a window the second chunk's 40 queries see all 70 cached keys: too little to skip.
    assert len(used) == 2 and used[0] is not None and (used[1] is None) == (window is None)
    for spans, T in zip(used, (70, 40)):
        assert spans is None or [a for a, *_ in spans] == list(range(0, T, 16)) and spans[-1][1] == T
    assert all(hi - lo <= 16 + 7 for _, _, lo, hi in used[0]) if window else used[0][0][3] == 16
    # Left padding (position -1 sees every key): spans against attention over every key.
    positions = torch.arange(70).repeat(2, 1) - torch.tensor([[0], [5]])
    positions[1, :5] = -1
    with torch.inference_mode():
        got, _ = model(tokens[:, :70], positions=positions)
        monkeypatch.setattr(model_module, "key_spans", lambda bias: None)
        plain, _ = model(tokens[:, :70], positions=positions)
    assert used[-1] is not None and (got - plain).abs().max() <= TOL


def test_key_spans_hold_every_visible_key():
    """Every key a query may see lies in its block's span, for random masks; no span where the
    blocks would skip too little."""
    from mistral_torch.model import key_spans
    g = torch.Generator().manual_seed(63)
    for _ in range(20):
        T, S = int(torch.randint(33, 90, (1,), generator=g)), int(torch.randint(20, 120, (1,), generator=g))
        seen = torch.rand(2, 1, T, S, generator=g) < 0.02
        seen[..., :T // 3, S // 2:] = False
        bias = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))
        spans = key_spans(bias, block=16)
        if spans is None:
            continue
        for a, b, lo, hi in spans:
            assert not seen[..., a:b, :lo].any() and not seen[..., a:b, hi:].any()
    causal = torch.zeros(1, 1, 64, 64).masked_fill_(torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf"))
    assert key_spans(causal, block=16) == [(0, 16, 0, 16), (16, 32, 0, 32), (32, 48, 0, 48), (48, 64, 0, 64)]
    assert key_spans(torch.zeros(1, 1, 64, 64), block=16) is None  # nothing to skip


@pytest.mark.skipif(not fast.plain_onednn(torch.float32), reason="fp32 matmuls stay with the BLAS on this CPU")
def test_plain_fp32_forwards_run_through_onednn_with_fused_pointwise_work(monkeypatch):
    """An eager fp32 inference forward (a prefill, a decode step) multiplies every linear of the
    plain model through oneDNN (SiLU, product and residual adds fused), with transformers'
    logits; autograd, a module with a forward hook (evaluate's on lm_head) and products too small
    to pay for oneDNN's fixed cost go through the module."""
    monkeypatch.setattr(fast, "PLAIN_ONEDNN_MIN_MACS", 0)  # a tiny model's products are all small
    model = tiny_model(seed=64, sliding_window=8)
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(65))
    with torch.no_grad():
        want = hf_twin(model)(tokens).logits
    named = {id(m): n for n, m in model.named_modules()}
    calls = []
    onednn_weight = fast.onednn_weight
    monkeypatch.setattr(fast, "onednn_weight", lambda x, m: calls.append(
        (named[id(m)], onednn_weight(x, m) is not None)) or onednn_weight(x, m))
    got, _ = decode(model, tokens, 20)  # a prefill of 20 positions, then 10 decode steps
    assert (got - want).abs().max() <= TOL
    assert len(calls) == 11 * (7 * model.args.n_layers + 1) and all(fused for _, fused in calls)
    calls.clear()
    model(tokens)  # autograd on
    assert calls and not any(fused for _, fused in calls)
    hooked = []
    model.lm_head.register_forward_pre_hook(lambda m, args: hooked.append(args[0].shape))
    calls.clear()
    with torch.inference_mode():
        model(tokens)
    assert hooked == [(2, 30, 64)] and ("lm_head", False) in calls
    monkeypatch.setattr(fast, "PLAIN_ONEDNN_MIN_MACS", 64 * 160 + 1)  # more than any one-row product here
    calls.clear()
    decode(model, tokens[:1], 29)  # a prefill of 29 rows, then one decode step
    layer = [fused for name, fused in calls if name.startswith("model.layers.0.")]
    # prefill: q, k, v, o, gate, up, down through oneDNN; the step: q, k, v, o, gate (then up
    # without asking), down through their modules
    assert layer == [True] * 7 + [False] * 6, layer


@pytest.mark.skipif(not fast.packing_supported(torch.bfloat16), reason="oneDNN runs no bf16 here")
def test_bf16_prefill_with_fused_pointwise_work_is_as_close_to_fp32(monkeypatch):
    """oneDNN's post-ops keep SiLU, product and residual add in fp32 before one rounding: the bf16
    prefill's logits are no farther from fp32 transformers' than the unfused path's (packed and plain)."""
    monkeypatch.setattr(fast, "PLAIN_ONEDNN_MIN_MACS", 0)  # a tiny model's products are all small
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(67))
    with torch.no_grad():
        ref = hf_twin(tiny_model(seed=66, sliding_window=8))(tokens).logits  # fp32
    for pack in (False, True):
        model = tiny_model(seed=66, sliding_window=8).to(torch.bfloat16)
        if pack:
            fast.pack_linears(model)
        with torch.inference_mode():
            fused_logits, _ = model(tokens)
            with monkeypatch.context() as m:
                m.setattr(fast, "onednn_weight", lambda x, mod: None)
                plain_logits, _ = model(tokens)
        fused_err = (fused_logits.float() - ref).abs().max()
        plain_err = (plain_logits.float() - ref).abs().max()
        assert not torch.equal(fused_logits, plain_logits), pack  # the fused path ran
        assert fused_err <= 1.25 * plain_err + 1e-3, (pack, fused_err, plain_err)


@pytest.mark.skipif(not fast.plain_onednn(torch.float32), reason="fp32 matmuls stay with the BLAS on this CPU")
def test_linears_without_a_packed_copy_still_run_through_onednn(monkeypatch):
    """`PackedLinear`s that keep no packed copy (`compile_decode(pack=False)`, AOT, or too little
    memory for the copy) multiply eager prefill rows through oneDNN on the weight as it is, fused
    like the plain model's, with transformers' logits."""
    monkeypatch.setattr(fast, "PLAIN_ONEDNN_MIN_MACS", 0)  # a tiny model's products are all small
    model = tiny_model(seed=68, sliding_window=8)
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(69))
    with torch.no_grad():
        want = hf_twin(model)(tokens).logits
    assert fast.pack_linears(model, onednn=False) == 7 * model.args.n_layers + 1
    x = torch.randn(2, 30, 64)
    with torch.inference_mode():
        assert fast.onednn_weight(x, model.lm_head) is model.lm_head.weight  # the weight itself, no copy
        got, _ = model(tokens)
    assert (got - want).abs().max() <= TOL
    assert all(m._packed is None for m in model.modules() if isinstance(m, fast.PackedLinear))


@needs_onednn
def test_compile_decode_keeps_no_packed_copy_that_would_crowd_memory(monkeypatch):
    """On AVX-512 CPUs the packed copy is optional (it speeds prefill): it is declined when it
    would take more than half the memory available."""
    model = tiny_model(seed=70)
    need = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(fast, "memory_available", lambda: 2 * need - 1)
    assert not fast.packed_copy_fits(model)
    monkeypatch.setattr(fast, "memory_available", lambda: 2 * need)
    assert fast.packed_copy_fits(model)
    if fast.avx512() and fast.cpp_kernels():
        monkeypatch.setattr(fast, "memory_available", lambda: 2 * need - 1)
        model.compile_decode()
        assert not any(m.onednn for m in model.modules() if isinstance(m, fast.PackedLinear))
        monkeypatch.setattr(fast, "memory_available", lambda: None)  # unknown: pack
        model.compile_decode()
        assert all(m.onednn for m in model.modules() if isinstance(m, fast.PackedLinear))
        with torch.inference_mode():
            model(torch.randint(0, 512, (1, 40)))  # a prefill makes the packed copies
        assert any(m._packed is not None for m in model.modules() if isinstance(m, fast.PackedLinear))
        monkeypatch.setattr(fast, "memory_available", lambda: 2 * need - 1)
        model.compile_decode()  # declined now: the copies go
        assert all(m._packed is None for m in model.modules() if isinstance(m, fast.PackedLinear))
