"""The Mistral transformer, top to bottom.

    tokens (B, T) -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits (B, T, V)
    DecoderLayer: x + Attention(RMSNorm(x)), then h + FeedForward(RMSNorm(h))

Module and parameter names are transformers' `MistralForCausalLM` names, so `state_dict()` keys
are HF keys and checkpoints load without renaming. RMSNorm and RoPE run in fp32 as in the
reference. Attention is grouped-query (n_kv_heads <= n_heads) with an optional sliding window,
through `scaled_dot_product_attention`; inference goes through a `RollingKVCache`.

Speed: per-forward work (RoPE angles, the attention mask as an additive bias, the key span each
block of queries sees) is done once, not per layer; a masked prefill attends per block of queries
(`key_spans`); the linears' pointwise neighbours (SiLU, gate x up, residual adds) ride on oneDNN's
matmuls where it runs them (`fast.swiglu`, `fast.linear_add`); the one-token decode step can be
compiled with `compile_decode()` (torch.compile: CPU inductor with the memory-reading tricks of
`fast.py`, CUDA graphs on GPU). Measured figures: README "Speed", docs/speed.md, `benchmarks/`.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .args import ModelArgs
from .aot import AotDecoder
from .fused import FusedDecoder
from .cache import CacheStep, RollingKVCache, attention_bias, attention_mask, dequantize_int8


# Prompts longer than the window go through in chunks of max(window, this): attention then costs
# O(n * (W + chunk)), and a small window (the shipped model's is 64) does not mean tiny matmuls.
MIN_PREFILL_CHUNK = 512

_module_registrations = 0  # submodules registered anywhere (apply_lora, quantize_model, ...): see _decode


def _count_module_registration(module: nn.Module, name: str, submodule: nn.Module) -> None:
    """Every module in the process calls this hook, also inside other code that torch.compile traces
    (transformers slices its ModuleList in forward): there it does nothing, since a global changed
    in a traced function is a guard that fails on every call (a recompile each step, and an error
    under fullgraph=True). Swaps that matter here (LoRA, quantization) happen outside compiled code."""
    global _module_registrations
    if torch.compiler.is_compiling():
        return
    _module_registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_module_registration)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 (one fused kernel), rounded to x's dtype, then scaled.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, head_dim) in fp32 for absolute `positions` (B, T).

    The first half of `sin` is negated, so that `apply_rope` rotates with one `cat` and no `neg`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, head_dim)
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, head_dim) by RoPE in the half-split layout transformers' weights use:
    x * cos + [-x2, x1] * sin, with the sign already in `sin` (see `rope_cos_sin`)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     cpp: bool = False, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row, q (B, nh, 1, hd), over k, v (B, nkv, S, hd) with an additive
    bias (B, 1, 1, S). The query heads that share a kv head become that head's `group` queries
    (all at the same position, so one bias row serves them), and SDPA reads K and V once per kv
    head. On an AVX2 CPU at S = 4096 this is 8x faster than two bf16 matmuls (no bf16 hardware)
    and level with fp32 ones; with one query per head, SDPA would read K and V once per query head.
    `cpp`: through the C++ kernel where it fits (`fast.decode_attention`, ~3x faster on AVX2).
    An int8 cache gives k, v as stored with their scales (`CacheStep.stored_keys_values`)."""
    if cpp and fast.decode_attention_fits(q, k, v):
        return fast.decode_attention(q, k, v, bias, k_scale, v_scale)
    if k_scale is not None:
        k, v = dequantize_int8(k, k_scale, q.dtype), dequantize_int8(v, v_scale, q.dtype)
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd)  # query heads grouped by the kv head they share
    y = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)  # (B, nkv, group, hd)
    return y.reshape(B, nh, 1, hd)


KeySpan = tuple[int, int, int, int]  # queries [a, b) see only keys among [lo, hi)
QUERY_BLOCK = 128  # queries per attention call of a masked prefill (see key_spans)


def key_spans(bias: torch.Tensor, block: int | None = None) -> list[KeySpan] | None:
    """The keys each block of `block` queries can see under the additive `bias` (B, 1, T, S), as
    (a, b, lo, hi): queries [a, b) see no key outside [lo, hi). A causal or sliding-window prefill
    then multiplies about half the (query, key) pairs: SDPA's CPU kernel computes every pair of one
    512-key block, masked or not (512-token fp32 attention 1.3x; docs/speed.md). None where that
    would skip less than a sixth of the pairs. Worked out once per forward (one host sync)."""
    B, _, T, S = bias.shape
    block = block or QUERY_BLOCK
    if T <= block:
        return None
    seen = (bias[:, 0] != float("-inf")).any(0)  # (T, S): some row's query t sees key s
    n = -(-T // block)
    seen = F.pad(seen, (0, 0, 0, n * block - T)).view(n, block, S).any(1)  # (blocks, S)
    index = torch.arange(S, device=bias.device)
    lo = torch.where(seen, index, S).amin(1).tolist()
    hi = (torch.where(seen, index, -1).amax(1) + 1).tolist()
    spans = [(i * block, min(T, (i + 1) * block), *((l, h) if l < h else (0, S)))
             for i, (l, h) in enumerate(zip(lo, hi))]
    if sum((b - a) * (h - l) for a, b, l, h in spans) > 5 / 6 * T * S:
        return None
    return spans


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cpp_decode = False  # decode attention through the C++ kernel (set by compile_decode)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                step: CacheStep | None, mask: torch.Tensor | None,
                spans: list[KeySpan] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`[residual +] o_proj(attention)`; `spans`: `key_spans(mask)`, the keys each block of
        queries sees (a prefill then skips the keys its block cannot see)."""
        B, T, _ = x.shape
        q, k, v = fast.project(x, self.q_proj, self.k_proj, self.v_proj)  # one kernel call when compiled
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_scale = v_scale = None  # an int8 cache's, for decode_attention
        if step is not None and T == 1:
            k, v, k_scale, v_scale = step.stored_keys_values(layer, k, v)  # (B, nkv, S, hd), S = keys visible
        elif step is not None:
            k, v = step.keys_values(layer, k, v)  # in the model's dtype
        gqa = self.n_kv_heads != self.n_heads
        if T == 1 and mask is not None:  # decode: one query per row
            y = decode_attention(q, k, v, mask, self.cpp_decode, k_scale, v_scale)
        elif mask is None:  # plain causal attention over the chunk itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif spans is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi],
                                                          attn_mask=mask[..., a:b, lo:hi], enable_gqa=gqa)
                           for a, b, lo, hi in spans], dim=2)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return fast.linear(y, self.o_proj) if residual is None else fast.linear_add(y, self.o_proj, residual)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`[residual +] FFN(x)`; the residual add is fused into down_proj where oneDNN runs it."""
        return fast.swiglu(x, self.gate_proj, self.up_proj, self.down_proj, residual)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                step: CacheStep | None, mask: torch.Tensor | None,
                spans: list[KeySpan] | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, layer, step, mask, spans, residual=x)
        return self.mlp(self.post_attention_layernorm(h), residual=h)


class Transformer(nn.Module):
    """Mistral decoder-only LM. `logits, cache = model(tokens)`; continue with `cache=cache`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False  # set by the trainer
        self.kv_cache_dtype: torch.dtype | None = None  # new caches' buffers: None = the model's dtype, or torch.int8
        self._decode_step = None  # a compiled `_run` for one-token steps (see `compile_decode`)
        self._aot_step: AotDecoder | None = None  # the batch-1 step compiled ahead of time (aot=True)
        self._fused_step: FusedDecoder | None = None  # steps of up to 8 or 16 rows as one C++ call (fused.py)

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype (that of its norms: still float when the linears are
        quantized to integer weights)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @classmethod
    def from_name(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_name(name))

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Transformer":
        """Normal(0, std) linear/embedding weights, unit norms (transformers' initialisation).
        Drawn on the parameters' device (a 7B model on a GPU: seconds, not minutes of CPU draws);
        with `seed`, the same weights on every run on that kind of device."""
        generators: dict[torch.device, torch.Generator] = {}
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                    continue
                if seed is not None and p.device not in generators:
                    generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                gen = generators.get(p.device)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=p.device) * std)
        return self

    def new_cache(self, batch_size: int, capacity: int | None = None,
                  kv_dtype: torch.dtype | None = None) -> RollingKVCache:
        """An empty cache: capacity = sliding window (default), or max_seq_len without one; keys
        and values held as `kv_dtype` (default `self.kv_cache_dtype`: None is the model's dtype;
        torch.int8 quarters an fp32 cache, see `cache.py`)."""
        a = self.args
        if capacity is None:
            capacity = a.sliding_window or a.max_seq_len
        if a.sliding_window is not None:
            capacity = max(capacity, a.sliding_window)
        return RollingKVCache(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, capacity,
                              a.sliding_window, dtype=self.dtype, device=self.device,
                              kv_dtype=kv_dtype or self.kv_cache_dtype)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (batch, seq_len) with seq_len >= 1, got {tuple(tokens.shape)}")
        lo, hi = (int(t) for t in torch.aminmax(tokens)) if tokens.numel() > 1 else (int(tokens.item()),) * 2
        if lo < 0 or hi >= self.args.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size})")

    def forward(self, tokens: torch.Tensor, cache: RollingKVCache | None = None,
                positions: torch.Tensor | None = None, *, use_cache: bool = True,
                last_logits_only: bool = False) -> tuple[torch.Tensor, RollingKVCache | None]:
        """Logits (B, T, V) (or (B, 1, V) with `last_logits_only`) and the updated cache.

        tokens:    (B, T) integer ids.
        cache:     continue from this cache; a new one is made when None and `use_cache`.
        positions: (B, T) absolute positions, -1 for padding (default: continue each row).
        use_cache: False for training/scoring: one pass over the sequence, no cache kept.
        Prompts longer than the window go through the cache in chunks of max(window, 512).
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        a = self.args
        if not use_cache:
            explicit = positions is not None  # may hold padding (-1) or offsets: mask from positions
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            elif positions.shape != tokens.shape:
                raise ValueError(f"positions shape {tuple(positions.shape)} does not match tokens shape {tuple(tokens.shape)}")
            self._check_length(int(positions.max()) + 1)
            with fast.upcast_linears(self.dtype, self.device.type, B * T):
                return self._run(tokens, positions, None, last_logits_only, mask_from_positions=explicit), None
        if cache is None:
            cache = self.new_cache(B)
        elif cache.batch_size != B:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, but tokens have batch size {B}")
        if positions is not None and positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} does not match tokens shape {tuple(tokens.shape)}")
        if T == 1 and self._decode_step is not None and not torch.is_grad_enabled():
            return self._decode(tokens, positions, cache), cache
        if positions is None:
            positions = cache.next_pos[:, None] + torch.arange(T, device=tokens.device)
        with fast.upcast_linears(self.dtype, self.device.type, B * T):  # bf16 on CPUs without bf16 GEMMs
            return self._prefill(tokens, positions, cache, last_logits_only), cache

    def _prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: RollingKVCache,
                 last_logits_only: bool) -> torch.Tensor:
        """Run (B, T) tokens through the cache in chunks (the window, at least MIN_PREFILL_CHUNK)."""
        a = self.args
        T = tokens.shape[1]
        chunk = max(a.sliding_window, MIN_PREFILL_CHUNK) if a.sliding_window else T
        outs = []
        for s in range(0, T, chunk):
            tok, pos = tokens[:, s:s + chunk], positions[:, s:s + chunk]
            new_length = max(cache.length, int(pos.max()) + 1)
            self._check_length(new_length)
            step = cache.plan(pos, new_length)
            if last_logits_only and s + chunk < T:  # an earlier chunk: its logits are not wanted
                self._run(tok, pos, step, True, hidden_only=True)
            else:
                outs.append(self._run(tok, pos, step, last_logits_only))
            cache.commit(step, new_length)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    # ------------------------------------------------------------------ compiled decode
    def compile_decode(self, mode: str | None = None, options: dict | None = None,
                       backend: str | None = "inductor", pack: bool | None = None,
                       kernels: bool | None = None, aot: bool = False, fused: bool = True) -> "Transformer":
        """Compile the one-token decode step (used under `torch.no_grad`/`inference_mode`).

        Only `_run` is compiled; the cache bookkeeping around it stays eager. On CPU the step
        attends to the allocated part of the cache buffers, which grow with the sequence (a dynamic
        length, so one compilation serves every position); with `mode="reduce-overhead"` (CUDA
        graphs) the buffers start at full capacity, so every step has the same shapes. The first
        step compiles: 20-35 s on a CPU, again for batch 1 vs larger batches; inductor's on-disk
        caches make that ~5 s in later processes. (Steps of up to 8 or 16 rows of plain or int8 models
        on x86 AVX2 and AVX-512 CPUs skip it: `fused` below.)

        On CPU the linears become `fast.PackedLinear`s (same parameters and state-dict keys). On an
        x86 CPU with AVX2 or AVX-512 `kernels` (default: wherever they build) adds two small C++
        kernels, compiled on first use (~15 s, then cached by torch): `fast.small_linear` for up to
        8 rows (batch-1 and batched steps read each weight once, at memory speed, bf16 included;
        q/k/v and gate/up one call each)
        and `fast.decode_attention` (~3x faster than SDPA). Without them the batch-1 step fuses
        each linear into a one-row reduction (`fast.one_row_linear`). Several rows beyond that
        (larger batches, eager prefill) take the fastest kernel this CPU has for the dtype:
        oneDNN with a packed copy of the weight (one extra copy of the linear weights; by default
        when the C++ kernels are off, or on AVX-512 CPUs without `aot` where the copy takes at most
        half the memory available (`fast.packed_copy_fits`); `pack` forces it on or off), oneDNN
        on the weight as it is (AVX-512 without the copy: ~6 % slower prefill), or for bf16/fp16
        without native hardware an fp32 matmul on the weight upcast block by block (no copy kept).
        Without a mode, guards on modules are skipped (they cost ~0.4 ms a step); instead the step
        is recompiled when the set of modules or the dtype changes (apply_lora, quantize, `.to()`).

        `backend=None`: no compiler at all: the fused step where it applies (CPU, C++ kernels),
        every other step eager, with the C++ decode attention and small-row linears (what `mistral-torch
        generate` does by default once the kernels are built: nothing waits for a compiler).

        `fused` (default; with the C++ kernels, no mode): steps of plain models (float or int8
        weights; no LoRA, int4 or nf4 linears) of up to 8 rows (16 for small models and, with AVX512_BF16, bf16 ones),
        each continuing at its next position, run as one C++ call (`fused.py`) that nothing
        compiles, so they start at once; the compiled step (torch.compile, or for batch 1 with
        `aot=True` the same graph compiled ahead of time by AOTInductor, `aot.py`, its package
        cached on disk) runs every other step.
        """
        self._compile_args = (mode, options, backend, pack, kernels, aot, fused)
        kwargs = dict(mode=mode, options=options) if backend == "inductor" else {}
        cpu_inductor = backend == "inductor" and mode is None and self.device.type == "cpu"
        cpu_eager = backend is None and self.device.type == "cpu"
        use_kernels = (cpu_inductor or cpu_eager) and kernels is not False and fast.cpp_kernels()  # built once
        # oneDNN's packed copy: where the C++ kernels are off (it takes the decode rows), and on
        # AVX-512 CPUs (it takes the prefill rows: 1.03-1.33x oneDNN on the plain weight there,
        # 1.06x a 512-token fp32 prefill; docs/speed.md) where the copy takes at most half the
        # memory available, unless the step is to be compiled ahead of time, which cannot call it
        onednn = pack if pack is not None else not use_kernels or (fast.avx512() and not aot
                                                                    and fast.packed_copy_fits(self))
        if cpu_inductor or use_kernels:
            fast.pack_linears(self)
            if fast.HUGE_PAGES:
                fast.huge_page_weights(self)
        if cpu_inductor:
            kwargs["options"] = {**fast.INDUCTOR_OPTIONS, **(options or {})}
        for m in self.modules():  # also the PackedLinears of an earlier compile_decode
            if isinstance(m, fast.PackedLinear):
                m.small, m.onednn = use_kernels, onednn
                if not onednn:  # an earlier compile_decode's packed copy, no longer wanted
                    m._packed, m._packed_key = None, None
            elif isinstance(m, Attention):
                m.cpp_decode = use_kernels
        if backend is None:  # no compiler: the steps the fused one does not take run eagerly
            self._decode_step = self._run
        else:
            if kwargs.get("mode") is None:  # torch.compile takes a mode or options, not both
                kwargs["options"] = {**(kwargs.get("options") or {}),
                                     "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            # Without module guards, compiled graphs must not be shared between models: dynamo caches
            # graphs per code object, so each model compiles its own copy of `_run`'s code.
            run = Transformer._run
            own_run = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, run.__defaults__)
            self._decode_step = torch.compile(types.MethodType(own_run, self), backend=backend, **kwargs)
        # Ahead of time: CPU inductor steps whose weights are not oneDNN-packed (their graph op is
        # Python); packing is the default only where the C++ kernels are off.
        self._aot_step = AotDecoder(self) if aot and cpu_inductor and not onednn else None
        self._fused_step = FusedDecoder(self) if fused and use_kernels and FusedDecoder.fits(self) else None
        if aot and self._aot_step is None:
            warnings.warn("compile_decode(aot=True) applies to CPU inductor steps without oneDNN-packed "
                          "weights (the default with the C++ kernels on AVX2 CPUs): using torch.compile's step")
        self._compiled_for, self._checked_at, self._dynamic_buffers = self._structure(), None, None
        return self

    def warm_up_decode(self, batch_sizes: tuple[int, ...] | None = None,
                       max_batch_size: int | None = None) -> "Transformer":
        """Run the compiled step at every shape class a server meets, so that no request waits for
        the compiler: batch 1, and two larger batches (the second size makes the graph dynamic in
        the batch); where the fused step takes batches (of up to 8 or 16 rows: `fused.py`), the two
        are one and two rows larger.
        `max_batch_size`: none larger (a server that never batches more than the fused step
        takes compiles nothing). Every cache length shares one graph (see `_decode`)."""
        if batch_sizes is None:
            first = self._fused_step.max_rows + 1 if self._fused_step is not None else 2
            batch_sizes = (1, first, first + 1)
        batch_sizes = [b for b in batch_sizes if max_batch_size is None or b <= max_batch_size]
        with torch.inference_mode():
            for b in batch_sizes:
                _, cache = self(torch.ones(b, 2, dtype=torch.long, device=self.device))
                self(torch.ones(b, 1, dtype=torch.long, device=self.device), cache=cache)
        return self

    def _structure(self) -> tuple:
        """What the compiled step assumed about the model: its modules and their dtype."""
        return (self.dtype, self.device, *map(id, self.modules()))

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: RollingKVCache) -> torch.Tensor:
        """One token per row through the compiled step; `positions` None: each row's next."""
        seen = (_module_registrations, self.dtype, self.device)
        if seen != self._checked_at:  # something changed somewhere since the last step
            self._checked_at = seen
            if self._structure() != self._compiled_for:  # here: modules swapped or cast since compiling
                self.compile_decode(*self._compile_args)
        next_token = positions is None and cache.batch_size == 1  # the usual step: planned on the host
        fused = positions is None and self._fused_step is not None and cache.batch_size <= self._fused_step.max_rows
        if positions is None and not next_token:
            positions = cache.next_pos[:, None]
        last = int(cache.next_pos.item()) if next_token else int(positions.max())
        new_length = max(cache.length, last + 1)
        self._check_length(new_length)
        # The step attends to every allocated slot (empty ones are masked), so that the number of
        # keys is the buffer length: one dynamic size, one graph while the buffers grow. CUDA graphs
        # (reduce-overhead) need fixed shapes: there the buffers start at full capacity.
        static = self._compile_args[0] == "reduce-overhead"
        cache.reserve(cache.capacity if static else new_length)
        if fused:  # one C++ call (fused.py)
            logits = self._fused_step(tokens, cache)
            cache.commit_next_tokens(new_length, last)
            return logits
        step = cache.plan_next_token(last) if next_token else cache.plan(positions, max(new_length, cache.allocated))
        positions = step.q_pos
        logits = self._aot_step(tokens, step) if self._aot_step is not None else None  # None: not its step
        if logits is None:
            if not static and cache.allocated > 1:
                torch._dynamo.mark_dynamic(step.k_pos, 1)
                if id(cache.k[0]) != self._dynamic_buffers:  # a new cache, or grown buffers
                    for t in cache.buffers():
                        torch._dynamo.mark_dynamic(t, 2)
                    self._dynamic_buffers = id(cache.k[0])
            logits = self._decode_step(tokens, positions, step, False)
        cache.commit(step, new_length)
        return logits

    def _check_length(self, length: int) -> None:
        if self.args.sliding_window is None and length > self.args.max_seq_len:
            raise ValueError(
                f"sequence of {length} positions exceeds max_seq_len={self.args.max_seq_len} "
                "(this model has no sliding window)"
            )

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, step: CacheStep | None,
             last_logits_only: bool, hidden_only: bool = False,
             mask_from_positions: bool = False) -> torch.Tensor:
        a = self.args
        T = tokens.shape[1]
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = rope_cos_sin(positions, a.head_dim, a.rope_theta)
        mask = None  # without a cache: plain causal attention unless the window or padding needs a mask
        window_cuts = a.sliding_window is not None and T > a.sliding_window
        if step is not None:
            mask = step.bias()
        elif window_cuts or mask_from_positions:
            mask = attention_bias(attention_mask(positions, positions, a.sliding_window), x.dtype)
        spans = key_spans(mask) if mask is not None and T > 1 else None
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, i, step, mask, spans, use_reentrant=False)
            else:
                x = layer(x, cos, sin, i, step, mask, spans)
        if hidden_only:
            return x
        if last_logits_only:
            x = x[:, -1:]
        return fast.linear(self.model.norm(x), self.lm_head)


Mistral7B = Transformer
