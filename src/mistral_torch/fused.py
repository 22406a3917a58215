"""The decode step as one C++ call: `Transformer.compile_decode()` on x86 AVX2/AVX-512 CPUs.

A decode step is ~60 small kernels (per layer: norm, q/k/v, RoPE and the cache
write, attention, o, norm, gate/up, SwiGLU, down). Run from a compiled graph, every call pays for
dispatch, allocation and code and metadata that the weight stream has pushed out of the CPU
caches: ~15 % of a bf16 step at bench-125m (docs/speed.md). `decode_step` in
`csrc/decode_kernels.cpp` runs the same ops in one call, in the order and at the rounding points
of `model.py`, over the model's own parameters and the cache's own buffers, with the same two
kernels the compiled step uses (`small_linear`, the decode attention). No compiler is involved,
so there is no warm-up beyond building the kernels once per machine.

It takes plain models: `nn.Linear` weights of the model's dtype or int8 ones (`quantize.Int8Linear`,
`Int8Embedding`: x rounded to int16 per row, multiplied in integers; not LoRA-wrapped or other
quantized linears), the model's `RMSNorm`s, fp32/bf16/fp16, a cache of the model's dtype or int8,
up to `max_rows` sequences, each continuing at its own next position (ragged batches included);
the linears take the rows together, reading each weight once per 8 rows. Every other step goes
to the compiled step.

`max_rows` is 8, or 16 where a second pass over the weights costs less than the compiled step's
one (bench-125m, batch 16, twins in one process on a Zen 4: bf16 weights, multiplied by
`vdpbf16ps`, 1.27x torch.compile's step; fp32 weights 0.84x, since oneDNN multiplies 16 fp32
rows near its peak; the shipped 20 MB fp32 model, whose weights stay in the CPU's last-level
cache between passes, served 16 clients 1.53x faster). bf16 on CPUs without AVX512_BF16 and
fp16 (widened, compute-bound at 8 rows) were not measured there and keep 8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import fast
from .cache import RollingKVCache

if TYPE_CHECKING:
    from .model import Transformer


CACHE_RESIDENT_BYTES = 32 << 20  # linear weights up to this stay in the last-level cache between passes


def bf16_dot_products(dtype: torch.dtype) -> bool:
    """Whether the C++ kernels multiply `dtype` weights as bf16 pairs (`vdpbf16ps`) on this CPU."""
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return dtype == torch.bfloat16 and bool(supported())


def _int8(module: nn.Module) -> bool:
    from .quantize import Int8Embedding, Int8Linear

    return type(module) in (Int8Linear, Int8Embedding)


def _scales(module: nn.Module) -> torch.Tensor:
    """An int8 module's fp32 scales (N,); for any other, an empty tensor (decode_step: not quantized)."""
    return module.scales if _int8(module) else torch.empty(0)


class FusedDecoder:
    """`decode_step` over one model's parameters (kept by reference: in-place updates are seen)."""

    def __init__(self, model: "Transformer") -> None:
        a = model.args
        self.model = model
        modules = [m for layer in model.model.layers for m in (
            layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp.gate_proj, layer.mlp.up_proj,
            layer.mlp.down_proj)]
        self.layers = [m.weight for m in modules]
        self.scales = [_scales(m) for m in (*modules, model.model.embed_tokens, model.lm_head)]
        # rope_cos_sin's inverse frequencies, computed as it computes them
        self.inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
        self.op = torch.ops.mistral_torch_cpu.decode_step
        self.steps = 0  # steps it has run
        norms = (0, 5)  # of each layer's 9 tensors above; the other 7 are its linears
        linear_bytes = model.lm_head.weight.nbytes + sum(w.nbytes for i, w in enumerate(self.layers) if i % 9 not in norms)
        two_passes_pay = bf16_dot_products(model.dtype) or linear_bytes <= CACHE_RESIDENT_BYTES
        self.max_rows = 2 * fast.SMALL_MAX_ROWS if two_passes_pay else fast.SMALL_MAX_ROWS  # see above

    @staticmethod
    def fits(model: "Transformer") -> bool:
        """Whether `decode_step` can run this model's steps."""
        from .model import RMSNorm

        a, dtype = model.args, model.dtype
        if (not fast.cpp_kernels() or model.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16)
                or a.head_dim % 16 or a.dim % 16 or a.hidden_dim % 16 or a.n_heads % a.n_kv_heads or a.n_heads // a.n_kv_heads > fast.SMALL_MAX_ROWS):
            return False
        linears, norms = [model.lm_head], [model.model.norm]
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            linears += [at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        embed = model.model.embed_tokens

        def int8(m: nn.Module) -> bool:
            return _int8(m) and m.weight.is_contiguous() and m.scales.is_contiguous()

        def float_linear(m: nn.Module) -> bool:
            return (type(m) in (nn.Linear, fast.PackedLinear) and m.bias is None and m.weight.dtype == dtype
                    and m.weight.is_contiguous())

        # q/k/v and gate/up are multiplied side by side: each group all int8 or all float
        side_by_side = all(_int8(la.self_attn.q_proj) == _int8(la.self_attn.k_proj) == _int8(la.self_attn.v_proj)
                           and _int8(la.mlp.gate_proj) == _int8(la.mlp.up_proj) for la in model.model.layers)
        return (((type(embed) is nn.Embedding and embed.weight.dtype == dtype) or int8(embed))
                and embed.weight.is_contiguous() and side_by_side
                and all(float_linear(m) or int8(m) for m in linears)
                and all(type(m) is RMSNorm and m.eps == a.norm_eps and m.weight.dtype == dtype
                        and m.weight.is_contiguous() for m in norms))

    def __call__(self, tokens: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        """The logits (B, 1, V) of each row's token (B, 1) at its cache's next position (buffers grown
        for it); the cache is written at each row's slot (`commit_next_tokens` records it)."""
        m = self.model
        self.steps += 1
        return self.op(
            tokens.long().contiguous(), cache.next_pos, cache.slot_pos, m.args.sliding_window or 0,
            m.model.embed_tokens.weight, self.layers, m.model.norm.weight, m.lm_head.weight, self.inv_freq,
            cache.k, cache.v, cache.k_scale, cache.v_scale, m.args.n_heads, m.args.norm_eps, self.scales)
