"""Weight-only quantization by module swap: int8, int4 (group-wise) and NF4 (QLoRA).

Every `nn.Linear` (and, by default, the token embedding) is replaced by a quantized module under
the same module name, so `state_dict()` keys stay the HF keys plus a few extra buffers:

    method  buffers of `<module>.`                            bits/weight  weight = ...
    int8    weight int8 (N, K), scales fp32 (N)               8            weight[n, k] * scales[n]
    int4    weight uint8 (N, K/2), scales, zeros bf16         4 + 32/g     (q - 8) * scale + zero,
            (N, K/g)                                                       per group of g columns
    nf4     weight uint8 (N, K/2), absmax uint8 (N*K/64),     4.127        NF4[q] * absmax(block),
            absmax_scale fp32 (blocks/256), absmax_offset                  blocks of 64 weights

Two 4-bit codes share a byte, the first (even column) in the HIGH nibble, as bitsandbytes packs.
NF4 is the QLoRA scheme exactly as bitsandbytes' `quantize_4bit(quant_type="nf4",
compress_statistics=True)`: the flattened weight is cut into blocks of 64, each scaled by its
absolute maximum and rounded to the nearest of the 16 NF4 values (`NF4_CODE`); the fp32 absmax
constants are then double-quantized: their mean is subtracted (`absmax_offset`) and they are
quantized in blocks of 256 to 8-bit codes of bitsandbytes' signed dynamic map (`DYNAMIC_CODE`),
one fp32 scale per block (`absmax_scale`):  absmax[b] = DYNAMIC_CODE[absmax_q[b]] *
absmax_scale[b // 256] + absmax_offset.

Kernels (CPU). Activations keep the model's dtype outside the linears; each quantized linear casts
them to what its kernel wants and returns x's dtype:
    int8  `torch._weight_int8pack_mm` with bf16 activations (it is ~50x slower with fp32 ones).
    int4  `torch._weight_int4pack_mm_for_cpu` (bf16 activations). Its packed layout depends on the
          CPU (AVX-512 / AVX2 / scalar builds tile differently), so files hold the plain layout
          above and the module repacks at load time; `state_dict()` unpacks again.
    nf4   a small C kernel (fp32 activations, code-book lookup with AVX-512/AVX2 permutes),
          compiled once with the system C compiler into a per-user cache; without a compiler,
          or on other devices, the PyTorch path: dequantize, then `F.linear`.
Other devices (CUDA, ...) use the PyTorch path everywhere (correct, not tuned); NF4 can use
bitsandbytes' kernels there (`NF4Linear.use_bitsandbytes = True`), the layout being the same.

A quantized checkpoint is an HF folder whose config.json records
`"quantization": {"method": ..., "group_size": ..., "embeddings": ...}`; `load_model` hands such
a folder to `load_quantized` (registered in `checkpoint.QUANTIZED_LOADERS`).
`load_and_quantize` quantizes a float checkpoint tensor by tensor as it is read, so peak memory
stays near the quantized size instead of the float size.
"""

from __future__ import annotations

import abc
import ctypes
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .fast import plain_onednn
from .model import Transformer

METHODS = ("int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 32
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
FORMAT_VERSION = 1

# The 16 NF4 values: bitsandbytes' `get_4bit_type("nf4")` / the QLoRA paper (appendix E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map`: the 256-value 8-bit code used for double quantization.

    For each exponent e = 0..6, 2^e fraction steps (midpoints of linspace(0.1, 1)) scaled by
    10^(e-6), both signs; plus 0 and 1. Sorted.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # fp32 tensor math, as bitsandbytes does
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # fp32 tensor math, as bitsandbytes does
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


# ---------------------------------------------------------------- reference math (any device)
def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` (ties to the lower one, as argmin)."""
    mid = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, mid.to(values.device), right=False, out_int32=True).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes 0..15 -> (..., K/2) uint8, the first of each pair in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (..., K/2) uint8 -> (..., K) uint8 codes."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def _row_chunks(n_rows: int, row_len: int, multiple: int = 1, max_elems: int = 1 << 20) -> Iterator[slice]:
    """Row ranges of at most ~max_elems weights (a multiple of `multiple` rows), so quantizing a
    large matrix never holds more than a few chunk-sized temporaries."""
    step = max(multiple, max_elems // max(row_len, 1) // multiple * multiple)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 (N, K), scales fp32 (N,)), |w - q*s| <= s/2."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, dtype=torch.float32, device=w.device)
    for rows in _row_chunks(N, K):
        c = w[rows].detach().float()
        absmax = c.abs().amax(dim=1)
        s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q[rows] = torch.round(c / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[rows] = s
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (codes uint8 (N, K) in 0..15, scales bf16, zeros bf16 (N, K/g)).

    w ~ (q - 8) * scale + zero with scale = (max - min) / 15 and zero = min + 8 * scale per
    group (torch's int4 kernels' convention). Codes are rounded against the bf16-rounded scale
    and zero, so |w - dequantized| <= scale/2 (up to bf16 rounding of the range's ends).
    """
    N, K = w.shape
    G = K // group_size
    codes = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, G, dtype=torch.bfloat16, device=w.device)
    zeros = torch.empty(N, G, dtype=torch.bfloat16, device=w.device)
    for rows in _row_chunks(N, K):
        g = w[rows].detach().float().reshape(-1, G, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        s = ((hi - lo) / 15).clamp_(min=1e-8).to(torch.bfloat16)
        z = (lo + 8 * s.float()).to(torch.bfloat16)
        q = torch.round((g - z.float()[..., None]) / s.float()[..., None]).add_(8)
        codes[rows] = q.clamp_(0, 15).to(torch.uint8).reshape(-1, K)
        scales[rows], zeros[rows] = s, z
    return codes, scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    N, K = codes.shape
    G = scales.shape[1]
    q = codes.reshape(N, G, K // G).float() - 8
    return (q * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K).to(dtype)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' `quantize_blockwise`: per block absmax (fp32), nearest code of x/absmax."""
    x = x.float().reshape(-1)
    n = x.numel()
    pad = (-n) % blocksize
    blocks = F.pad(x, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = (blocks / safe[:, None]).clamp_(-1, 1)
    q = _nearest(scaled.reshape(-1), code)[:n]
    return q, absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = NF4_BLOCK) -> dict[str, torch.Tensor]:
    """NF4 with double-quantized absmax (bitsandbytes' nf4 + compress_statistics, block 64/256).

    Returns {"weight": uint8 (N, K/2), "absmax": uint8 (numel/64,), "absmax_scale": fp32
    (ceil(blocks/256),), "absmax_offset": fp32 scalar}.
    """
    N, K = w.shape
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(N * K // blocksize, dtype=torch.float32, device=w.device)
    multiple = blocksize // math.gcd(K, blocksize)  # rows per chunk: whole blocks only
    for rows in _row_chunks(N, K, multiple):
        flat = w[rows].detach().float().reshape(-1, blocksize)
        a = flat.abs().amax(dim=1)
        safe = torch.where(a > 0, a, torch.ones_like(a))
        codes = _nearest((flat / safe[:, None]).clamp_(-1, 1), NF4_CODE)
        packed[rows] = pack_nibbles(codes.reshape(-1, K))
        absmax[rows.start * K // blocksize:rows.stop * K // blocksize] = a
    offset = absmax.mean()
    qabsmax, absmax_scale = quantize_blockwise_8bit(absmax - offset, DYNAMIC_CODE, NF4_DQ_BLOCK)
    return {"weight": packed, "absmax": qabsmax, "absmax_scale": absmax_scale, "absmax_offset": offset.reshape(())}


def nf4_absmax(absmax: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor) -> torch.Tensor:
    """The fp32 per-block absmax from its double-quantized form."""
    code = DYNAMIC_CODE.to(absmax.device)
    scale = absmax_scale.float().repeat_interleave(NF4_DQ_BLOCK)[: absmax.numel()]
    return code[absmax.long()] * scale + absmax_offset.float()


def dequantize_nf4(weight: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_offset: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    N, K2 = weight.shape
    values = NF4_CODE.to(weight.device)[unpack_nibbles(weight).long()].view(-1, NF4_BLOCK)
    scale = nf4_absmax(absmax, absmax_scale, absmax_offset)
    return (values * scale[:, None]).view(N, 2 * K2).to(dtype)


# ---------------------------------------------------------------- int4: torch's CPU kernel layout
# `_convert_weight_to_int4pack_for_cpu` tiles rows in blocks of BLOCK_N (64 on AVX-512 builds,
# 32 otherwise) and pairs nibbles differently per ISA. `_block_perm` gives, for one block of `nb`
# rows, the source index (row*K + col) of every nibble of the packed block, low nibble first.
# The layout in use is recognised by probing the op once (`_cpu_int4_layout`).
def _block_perm(nb: int, K: int, block_n: int, kind: str) -> torch.Tensor:
    idx = torch.arange(nb * K).view(nb, K)
    if nb == block_n and kind == "avx512":  # byte[k, j*16+d] = row j*16+d | row 32+j*16+d << 4
        perm = idx.view(2, 2, 16, K).permute(3, 1, 2, 0)
    elif nb == block_n and kind == "avx2":  # byte[k, d] = row d | row 16+d << 4
        perm = idx.view(2, 16, K).permute(2, 1, 0)
    else:  # byte[k, j] = row 2j | row 2j+1 << 4
        perm = idx.view(nb // 2, 2, K).permute(2, 0, 1)
    return perm.reshape(-1)


def _blocks(N: int, block_n: int) -> list[tuple[int, int]]:
    """(first row, rows) of the full blocks (as one span) and of the tail block."""
    full = N // block_n * block_n
    spans = [(0, full)] if full else []
    if N > full:
        spans.append((full, N - full))
    return spans


def _pack_cpu_layout(codes: torch.Tensor, block_n: int, kind: str) -> torch.Tensor:
    N, K = codes.shape
    out = []
    for start, rows in _blocks(N, block_n):
        nb = min(rows, block_n)
        perm = _block_perm(nb, K, block_n, kind)
        nib = codes[start:start + rows].reshape(rows // nb, nb * K)[:, perm].view(-1, 2)
        out.append((nib[:, 0] | (nib[:, 1] << 4)).reshape(-1))
    return torch.cat(out).view(N, K // 2)


def _unpack_cpu_layout(packed: torch.Tensor, block_n: int, kind: str) -> torch.Tensor:
    N, K = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    codes = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    for start, rows in _blocks(N, block_n):
        nb = min(rows, block_n)
        perm = _block_perm(nb, K, block_n, kind).to(packed.device)
        b = flat[start * K // 2:(start + rows) * K // 2].view(rows // nb, nb * K // 2)
        nib = torch.stack([b & 15, b >> 4], dim=-1).view(rows // nb, nb * K)
        dst = codes[start:start + rows].view(rows // nb, nb * K)
        dst[:, perm] = nib
    return codes


@functools.cache
def _cpu_int4_layout() -> tuple[int, str] | None:
    """(BLOCK_N, kind) of this torch build's CPU int4 kernel layout, None if unknown/unavailable."""
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (80, 64), generator=gen, dtype=torch.int32)  # full blocks + a tail
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.ones(2, 80, 2, dtype=torch.bfloat16)
        torch._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, 32, sz)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    for block_n, kind in ((64, "avx512"), (32, "avx2"), (32, "scalar")):
        if torch.equal(_pack_cpu_layout(q.to(torch.uint8), block_n, kind), packed):
            return block_n, kind
    return None


# ---------------------------------------------------------------- NF4: the C kernel
_NF4_C = r"""
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#define MAXM 8

/* y[m, n] = sum_k x[m, k] * code[q(n, k)] * absmax(n*K/64 + k/64)   for rows n in [n0, n1)
   w: (N, K/2) bytes, first element of a pair in the high nibble; K % 64 == 0; M <= MAXM
   absmax(b) = code2[qa[b]] * s2[b / 256] + offset          (double quantization)
   xe / xo: (M, K/2) even / odd columns of x, so each nibble meets its activation. */
static void rows(const float* xe, const float* xo, int64_t M, int64_t K, const uint8_t* w,
                 const uint8_t* qa, const float* s2, float offset, const float* code,
                 const float* code2, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t K2 = K / 2, nb = K / 64;
#if defined(__AVX512F__)
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        __m512 acc[MAXM];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t j = 0; j < nb; j++) {
            const int64_t b = n * nb + j;
            const __m512 a = _mm512_set1_ps(code2[qa[b]] * s2[b >> 8] + offset);
            const uint8_t* wp = w + n * K2 + j * 32;
            __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)wp));
            __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wp + 16)));
            __m512 h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), lut);
            __m512 l0 = _mm512_permutexvar_ps(_mm512_and_si512(b0, low), lut);
            __m512 h1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), lut);
            __m512 l1 = _mm512_permutexvar_ps(_mm512_and_si512(b1, low), lut);
            for (int m = 0; m < M; m++) {
                const float* e = xe + m * K2 + j * 32;
                const float* o = xo + m * K2 + j * 32;
                __m512 p = _mm512_mul_ps(h0, _mm512_loadu_ps(e));
                __m512 q = _mm512_mul_ps(l0, _mm512_loadu_ps(o));
                p = _mm512_fmadd_ps(h1, _mm512_loadu_ps(e + 16), p);
                q = _mm512_fmadd_ps(l1, _mm512_loadu_ps(o + 16), q);
                acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p, q), a, acc[m]);
            }
        }
        for (int m = 0; m < M; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 lut0 = _mm256_loadu_ps(code), lut1 = _mm256_loadu_ps(code + 8);
    const __m256i low = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    for (int64_t n = n0; n < n1; n++) {
        __m256 acc[MAXM];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t j = 0; j < nb; j++) {
            const int64_t b = n * nb + j;
            const __m256 a = _mm256_set1_ps(code2[qa[b]] * s2[b >> 8] + offset);
            __m256 part[MAXM];
            for (int m = 0; m < M; m++) part[m] = _mm256_setzero_ps();
            for (int c = 0; c < 32; c += 8) {
                const uint8_t* wp = w + n * K2 + j * 32 + c;
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)wp));
                __m256i hi = _mm256_srli_epi32(bytes, 4), lo = _mm256_and_si256(bytes, low);
                __m256 wh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, hi), _mm256_permutevar8x32_ps(lut1, hi),
                                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(hi, seven)));
                __m256 wl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, lo), _mm256_permutevar8x32_ps(lut1, lo),
                                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(lo, seven)));
                for (int m = 0; m < M; m++) {
                    part[m] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xe + m * K2 + j * 32 + c), part[m]);
                    part[m] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xo + m * K2 + j * 32 + c), part[m]);
                }
            }
            for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(part[m], a, acc[m]);
        }
        for (int m = 0; m < M; m++) {
            float t[8];
            _mm256_storeu_ps(t, acc[m]);
            y[m * N + n] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
        }
    }
#else
    for (int64_t n = n0; n < n1; n++) {
        float acc[MAXM] = {0};
        for (int64_t j = 0; j < nb; j++) {
            const int64_t b = n * nb + j;
            const float a = code2[qa[b]] * s2[b >> 8] + offset;
            float part[MAXM] = {0};
            for (int64_t c = j * 32; c < j * 32 + 32; c++) {
                const uint8_t v = w[n * K2 + c];
                for (int m = 0; m < M; m++)
                    part[m] += code[v >> 4] * xe[m * K2 + c] + code[v & 15] * xo[m * K2 + c];
            }
            for (int m = 0; m < M; m++) acc[m] += part[m] * a;
        }
        for (int m = 0; m < M; m++) y[m * N + n] = acc[m];
    }
#endif
}

int nf4_max_rows(void) { return MAXM; }

void nf4_matmul(const float* xe, const float* xo, int64_t M, int64_t K, const uint8_t* w,
                const uint8_t* qa, const float* s2, float offset, const float* code,
                const float* code2, float* y, int64_t N, int threads) {
    const int64_t chunk = 16, chunks = (N + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t i = 0; i < chunks; i++) {
        const int64_t n0 = i * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        rows(xe, xo, M, K, w, qa, s2, offset, code, code2, y, N, n0, n1);
    }
}
"""


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: $MISTRAL_TORCH_KERNEL_CACHE, else ~/.cache/mistral-torch/kernels."""
    env = os.environ.get("MISTRAL_TORCH_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mistral-torch" / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.cache
def nf4_kernel() -> Any | None:
    """The compiled NF4 CPU kernel (ctypes), built on first use; None where it cannot be built.

    Set MISTRAL_TORCH_NF4_KERNEL=0 to use the PyTorch path instead.
    """
    if os.environ.get("MISTRAL_TORCH_NF4_KERNEL", "1") == "0":
        return None
    key = hashlib.sha256((_NF4_C + _cpu_signature()).encode()).hexdigest()[:16]
    lib_path = kernel_cache_dir() / f"nf4-{key}.so"
    if not lib_path.is_file():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            warnings.warn("no C compiler found: NF4 runs through the slower PyTorch path", stacklevel=2)
            return None
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "nf4.c", Path(tmp) / "nf4.so"
                src.write_text(_NF4_C)
                base = [cc, "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(out)]
                done = subprocess.run(base[:1] + ["-fopenmp"] + base[1:], capture_output=True, text=True)
                if done.returncode != 0:  # no OpenMP: single-threaded kernel
                    done = subprocess.run(base, capture_output=True, text=True)
                if done.returncode != 0:
                    raise OSError(done.stderr.strip()[-500:])
                os.replace(out, lib_path)  # atomic: concurrent builders are harmless
        except OSError as exc:
            warnings.warn(f"could not build the NF4 CPU kernel ({exc}); using the PyTorch path", stacklevel=2)
            return None
    lib = ctypes.CDLL(str(lib_path))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.nf4_matmul.argtypes = [P, P, I64, I64, P, P, P, ctypes.c_float, P, P, P, I64, ctypes.c_int]
    lib.nf4_matmul.restype = None
    lib.nf4_max_rows.restype = ctypes.c_int
    return lib


# ---------------------------------------------------------------- modules
def _kernel_threads() -> int:
    return max(1, torch.get_num_threads())


class QuantizedLinear(nn.Module, abc.ABC):
    """Base of the quantized linears: same `in_features`/`out_features` as the nn.Linear it
    replaces, `dequantize()` -> its float weight, quantization buffers that keep their dtype
    through `model.to(dtype)`, and `dtype` = the activations' (and embeddings' output) dtype."""

    method = ""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype

    def _apply(self, fn, recurse=True):  # keep packed/scale buffers' dtypes; follow float casts
        kept = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dt in kept.items():
            b = self._buffers[name]
            if b is not None and b.dtype != dt:
                self._buffers[name] = b.to(dt)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    @classmethod
    @abc.abstractmethod
    def from_linear(cls, linear: nn.Module, **kwargs: Any) -> "QuantizedLinear":
        """Quantize an `nn.Linear` (or `nn.Embedding`) into this layout."""

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (N, K) this module stands for."""

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `rows` of the float weight (an embedding lookup)."""
        return self.dequantize(dtype)[rows]

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


# From this many rows on, an int8 linear widens its weight to bf16 (int8 values are exact there)
# for oneDNN's bf16 GEMM where the CPU runs it natively, rather than `_weight_int8pack_mm`: 2x at
# 64-512 rows, level at 16 (Zen 4, a 2048 x 768 weight, 2 threads); a 512-token prefill of
# bench-125m 1.74-1.84x (A/B in one process), 1.4-1.7x llama.cpp q8_0 (benchmarks/results/prefill_int8.json).
INT8_WIDEN_MIN_ROWS = 32


class Int8Linear(QuantizedLinear):
    """int8 weight-only, one fp32 scale per output channel."""

    method = "int8"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        # the kernel takes scales in the activations' dtype (bf16): a derived copy, not saved
        self.register_buffer("kernel_scales", torch.empty(out_features, dtype=torch.bfloat16, device=device),
                             persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs: Any) -> "Int8Linear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
        m.set_quantized(*quantize_int8(w))
        return m

    def set_quantized(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight = weight.to(torch.int8).contiguous()
        self.scales = scales.float().contiguous()
        self.kernel_scales = self.scales.to(torch.bfloat16)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.kernel_scales = self.scales.to(torch.bfloat16)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype or self.dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight[rows.reshape(-1)], self.scales[rows.reshape(-1)],
                               dtype or self.dtype).view(*rows.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return self._reference(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if x2.shape[0] >= INT8_WIDEN_MIN_ROWS and plain_onednn(torch.bfloat16):
            # prefill: the weight widened to bf16 (exact) for oneDNN's bf16 GEMM, then scaled
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * self.kernel_scales
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self.kernel_scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(QuantizedLinear):
    """int4 weight-only, group-wise asymmetric (scale and zero per group of `group_size` columns).

    Files hold `weight` as plain nibble pairs; on a CPU with torch's int4 kernel the module keeps
    it in the kernel's own layout (`self.layout`) and its scales/zeros interleaved as the kernel
    wants (`scales_and_zeros` (K/g, N, 2)); `state_dict()` writes the plain form back.
    """

    method = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 use_kernel: bool = True) -> None:
        super().__init__(in_features, out_features, dtype)
        self.group_size = group_size
        self.use_kernel = use_kernel
        self.layout: tuple[int, str] | None = None  # None: plain nibble pairs
        G = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(G, out_features, 2, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = DEFAULT_INT4_GROUP_SIZE, use_kernel: bool = True,
                    **kwargs: Any) -> "Int4Linear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], group_size, dtype=w.dtype, device=w.device, use_kernel=use_kernel)
        codes, scales, zeros = quantize_int4(w, group_size)
        m.set_quantized(pack_nibbles(codes), scales, zeros)
        return m

    def _kernel_layout(self) -> tuple[int, str] | None:
        if not self.use_kernel or self.weight.device.type != "cpu" or self.out_features % 16:
            return None
        return _cpu_int4_layout()

    def set_quantized(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Set from the plain (file) form: weight (N, K/2) pairs, scales/zeros (N, K/g)."""
        self.layout = self._kernel_layout() if weight.device.type == "cpu" else None
        if self.layout is not None:  # repack in row chunks of whole kernel blocks (bounded temporaries)
            plain, weight = weight, torch.empty_like(weight, dtype=torch.uint8)
            for rows in _row_chunks(self.out_features, self.in_features, self.layout[0]):
                weight[rows] = _pack_cpu_layout(unpack_nibbles(plain[rows]), *self.layout)
            del plain
        self.weight = weight.to(torch.uint8).contiguous()
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()

    def plain_state(self) -> dict[str, torch.Tensor]:
        codes = self.codes()
        return {"weight": pack_nibbles(codes), "scales": self.scales_and_zeros[..., 0].t().contiguous(),
                "zeros": self.scales_and_zeros[..., 1].t().contiguous()}

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes 0..15, whatever the storage layout."""
        if self.layout is None:
            return unpack_nibbles(self.weight)
        codes = torch.empty(self.out_features, self.in_features, dtype=torch.uint8, device=self.weight.device)
        for rows in _row_chunks(self.out_features, self.in_features, self.layout[0]):
            codes[rows] = _unpack_cpu_layout(self.weight[rows], *self.layout)
        return codes

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.plain_state().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = ("weight", "scales", "zeros")
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing_keys.extend(prefix + n for n in names if n not in found)
        if len(found) == len(names):
            self.set_quantized(found["weight"].to(self.weight.device), found["scales"].to(self.weight.device),
                               found["zeros"].to(self.weight.device))

    def _apply(self, fn, recurse=True):
        layout = self.layout
        super()._apply(fn, recurse)
        if layout is not None and self.weight.device.type != "cpu":  # left the CPU: plain pairs
            self.weight = pack_nibbles(_unpack_cpu_layout(self.weight, *layout))
            self.layout = None
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        sz = self.scales_and_zeros
        return dequantize_int4(self.codes(), sz[..., 0].t(), sz[..., 1].t(), dtype or self.dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.layout is not None:
            return super().dequantize_rows(rows, dtype)
        r = rows.reshape(-1)
        sz = self.scales_and_zeros[:, r]
        out = dequantize_int4(unpack_nibbles(self.weight[r]), sz[..., 0].t(), sz[..., 1].t(), dtype or self.dtype)
        return out.view(*rows.shape, self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is None or (torch.is_grad_enabled() and x.requires_grad):
            return self._reference(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class NF4Linear(QuantizedLinear):
    """NF4 weight-only with double-quantized absmax: QLoRA's frozen base (bitsandbytes' layout).

    `NF4Linear.from_linear(linear)`, `.dequantize()` (float weight), `.forward(x)`.
    """

    method = "nf4"
    use_bitsandbytes = False  # True: on CUDA, run bitsandbytes' 4-bit matmul on these buffers
    kernel_max_rows = 8  # the C kernel serves up to this many rows of x; more: dequantize + GEMM

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        blocks = in_features * out_features // NF4_BLOCK
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(-blocks // NF4_DQ_BLOCK), dtype=torch.float32, device=device))
        self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs: Any) -> "NF4Linear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
        m.set_quantized(**quantize_nf4(w))
        return m

    def set_quantized(self, weight: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
                      absmax_offset: torch.Tensor) -> None:
        self.weight = weight.to(torch.uint8).contiguous()
        self.absmax = absmax.to(torch.uint8).contiguous()
        self.absmax_scale = absmax_scale.float().contiguous()
        self.absmax_offset = absmax_offset.float().reshape(())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.weight, self.absmax, self.absmax_scale, self.absmax_offset, dtype or self.dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.in_features % NF4_BLOCK:  # blocks cross rows
            return super().dequantize_rows(rows, dtype)
        r = rows.reshape(-1)
        per_row = self.in_features // NF4_BLOCK
        blocks = (r[:, None] * per_row + torch.arange(per_row, device=r.device)).reshape(-1)
        scale = nf4_absmax(self.absmax, self.absmax_scale, self.absmax_offset)[blocks]
        values = NF4_CODE.to(r.device)[unpack_nibbles(self.weight[r]).long()].view(-1, NF4_BLOCK)
        return (values * scale[:, None]).to(dtype or self.dtype).view(*rows.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self._reference(x)
        if x.device.type == "cuda" and self.use_bitsandbytes:
            return self._bitsandbytes(x)
        x2 = x.reshape(-1, self.in_features)
        lib = nf4_kernel() if x.device.type == "cpu" and self.in_features % NF4_BLOCK == 0 else None
        if lib is None or x2.shape[0] > min(self.kernel_max_rows, lib.nf4_max_rows()):
            return self._reference(x)
        M = x2.shape[0]
        xf = x2.float()
        xe, xo = xf[:, 0::2].contiguous(), xf[:, 1::2].contiguous()
        w, qa = self.weight.contiguous(), self.absmax.contiguous()
        s2 = self.absmax_scale.float().contiguous()
        y = torch.empty(M, self.out_features, dtype=torch.float32)
        lib.nf4_matmul(xe.data_ptr(), xo.data_ptr(), M, self.in_features, w.data_ptr(), qa.data_ptr(),
                       s2.data_ptr(), float(self.absmax_offset), NF4_CODE.data_ptr(), DYNAMIC_CODE.data_ptr(),
                       y.data_ptr(), self.out_features, _kernel_threads())
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _bitsandbytes(self, x: torch.Tensor) -> torch.Tensor:  # checked on CPU against ours (tests)
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        dev = x.device
        state2 = QuantState(absmax=self.absmax_scale.float(), code=DYNAMIC_CODE.to(dev),
                            blocksize=NF4_DQ_BLOCK, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]),
                           code=NF4_CODE.to(dev), blocksize=NF4_BLOCK, quant_type="nf4", dtype=x.dtype,
                           offset=self.absmax_offset.float(), state2=state2)
        return bnb.matmul_4bit(x, self.weight.view(-1, 1).t(), quant_state=state)


class _EmbeddingLookup:
    """Makes a quantized 'linear' an embedding: forward(token ids) -> rows of the float weight
    (num_embeddings = out_features, embedding_dim = in_features), in the model's dtype."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantize_rows(tokens)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features


class Int8Embedding(_EmbeddingLookup, Int8Linear):
    pass


class Int4Embedding(_EmbeddingLookup, Int4Linear):
    pass


class NF4Embedding(_EmbeddingLookup, NF4Linear):
    pass


LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
EMBEDDING_CLASSES = {"int8": Int8Embedding, "int4": Int4Embedding, "nf4": NF4Embedding}


# ---------------------------------------------------------------- whole models
def check_method(method: str, group_size: int | None) -> tuple[str, int | None]:
    """(method, group_size) normalised, or a ValueError saying what is allowed."""
    m = str(method).lower()
    if m not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (choose one of: {', '.join(METHODS)})")
    if m == "int4":
        group_size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}")
        return m, group_size
    if m == "nf4" and group_size not in (None, NF4_BLOCK):
        raise ValueError(f"nf4 uses blocks of {NF4_BLOCK} weights (QLoRA); group size {group_size} does not apply")
    if m == "int8" and group_size is not None:
        raise ValueError("int8 is quantized per output channel; a group size applies to int4 only")
    return m, (NF4_BLOCK if m == "nf4" else None)


def _check_shape(name: str, method: str, group_size: int | None, in_features: int, out_features: int) -> None:
    if method == "int4":
        if in_features % group_size:
            raise ValueError(f"cannot quantize {name} to int4 with group size {group_size}: its in_features "
                             f"({in_features}) is not divisible by {group_size} (try a group size dividing it)")
    elif method == "nf4":
        if in_features % 2 or (in_features * out_features) % NF4_BLOCK:
            raise ValueError(f"cannot quantize {name} to nf4: its {out_features}x{in_features} weights do not "
                             f"split into blocks of {NF4_BLOCK} with an even row length")


def _targets(model: nn.Module, embeddings: bool) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is_embedding) of every module to quantize."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):  # also fast.PackedLinear (after compile_decode)
            out.append((name, module, False))
        elif embeddings and type(module) is nn.Embedding:
            out.append((name, module, True))
    return out


def quantize_model(model: Transformer, method: str, group_size: int | None = None, *,
                   embeddings: bool = True) -> Transformer:
    """Quantize `model` in place (every nn.Linear, and the token embedding unless
    `embeddings=False`) and return it. All layers are checked before any is changed, so a bad
    method or group size leaves the model as it was; the error names the layer."""
    method, group_size = check_method(method, group_size)
    targets = _targets(model, embeddings)
    for name, module, is_emb in targets:
        k, n = (module.embedding_dim, module.num_embeddings) if is_emb else (module.in_features, module.out_features)
        _check_shape(name, method, group_size, k, n)
        if not is_emb and module.bias is not None:
            raise ValueError(f"cannot quantize {name}: linear layers with a bias are not supported")
    dtype = _float_dtype(model)
    with torch.no_grad():
        for name, module, is_emb in targets:
            cls = (EMBEDDING_CLASSES if is_emb else LINEAR_CLASSES)[method]
            kw = {"group_size": group_size, "use_kernel": not is_emb} if method == "int4" else {}
            q = cls.from_linear(module, **kw)
            q.dtype = dtype
            model.set_submodule(name, q)
    model.quantization = quantization_record(method, group_size, embeddings)
    return model


def _float_dtype(model: nn.Module) -> torch.dtype:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None:
        return norm.weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def quantization_record(method: str, group_size: int | None, embeddings: bool) -> dict[str, Any]:
    """What config.json's "quantization" holds."""
    return {"method": method, "group_size": group_size, "embeddings": embeddings, "format_version": FORMAT_VERSION,
            "modules": "all nn.Linear" + (" + embed_tokens" if embeddings else "")}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything `state_dict()` holds (what a checkpoint file stores)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- save and load
def save_quantized(model: Transformer, path: str | Path, *, max_shard_size: int | str = "5GB",
                   overwrite: bool = False, extra_files: Iterable[str | Path] = ()) -> Path:
    """Write a quantized model as an HF-style folder: config.json (with "quantization") +
    model.safetensors (or shards + index). `load_model(path)` reads it back."""
    from safetensors.torch import save_file

    from .checkpoint import HF_CONFIG, HF_INDEX, HF_SINGLE, atomic_folder, dtype_name, parse_size

    record = getattr(model, "quantization", None)
    if not record:
        raise ValueError("model is not quantized (use quantize_model first, or checkpoint.save_model)")
    limit = parse_size(max_shard_size)
    extra = [Path(f) for f in extra_files]
    dtype = _float_dtype(model)
    state = model.state_dict()
    if model.args.tie_embeddings and "lm_head.weight" in state and not isinstance(model.lm_head, QuantizedLinear):
        state.pop("lm_head.weight")  # still tied: written once, as the embedding
    with atomic_folder(Path(path), overwrite=overwrite) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][key] = t.detach().cpu().contiguous()
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / HF_SINGLE, metadata={"format": "pt"})
        else:
            weight_map, n = {}, len(shards)
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
        config = model.args.to_hf_config(torch_dtype=dtype_name(dtype))
        config["dtype"] = dtype_name(dtype)
        config["quantization"] = dict(record)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
    return Path(path)


def _skeleton(args: ModelArgs, method: str, group_size: int | None, embeddings: bool,
              dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """A model whose targets are empty quantized modules and whose float parameters are on meta."""
    with torch.device("meta"):
        model = Transformer(args)
    for name, module, is_emb in _targets(model, embeddings):
        k, n = (module.embedding_dim, module.num_embeddings) if is_emb else (module.in_features, module.out_features)
        _check_shape(name, method, group_size, k, n)
        cls = (EMBEDDING_CLASSES if is_emb else LINEAR_CLASSES)[method]
        kw = {"group_size": group_size, "use_kernel": not is_emb} if method == "int4" else {}
        model.set_submodule(name, cls(k, n, dtype=dtype, device=device, **kw))
    model.quantization = quantization_record(method, group_size, embeddings)
    return model


_PARTS = {"int8": ("weight", "scales"), "int4": ("weight", "scales", "zeros"),
          "nf4": ("weight", "absmax", "absmax_scale", "absmax_offset")}


@functools.cache
def _malloc_trim() -> Any | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps chunk-sized temporaries otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Assembler:
    """Fills a skeleton tensor by tensor: float parameters are set as they come, a quantized
    module once all its parts have arrived (so only one module's parts wait in memory)."""

    def __init__(self, model: Transformer, dtype: torch.dtype, device: torch.device | str) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        self.floats = {n for n, p in model.named_parameters()}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()

    def set_float(self, key: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        expected = tuple(getattr(module, attr).shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch for {key!r}: expected {expected}, got {tuple(tensor.shape)}")
        setattr(module, attr, nn.Parameter(tensor.to(device=self.device, dtype=self.dtype, copy=True),
                                           requires_grad=False))
        self.done.add(key)

    def add_part(self, module_name: str, part: str, tensor: torch.Tensor) -> None:
        module = self.quantized[module_name]
        parts = self.pending.setdefault(module_name, {})
        parts[part] = tensor.to(self.device, copy=True)
        if len(parts) == len(_PARTS[module.method]):
            del self.pending[module_name]
            self._check_parts(module_name, module, parts)
            module.set_quantized(*(parts[p] for p in _PARTS[module.method]))
            self.done.add(module_name)

    def add_quantized_from_float(self, module_name: str, weight: torch.Tensor) -> None:
        module = self.quantized[module_name]
        expected = (module.out_features, module.in_features)
        if tuple(weight.shape) != expected:  # (also for a _FileMatrix)
            raise ValueError(f"shape mismatch for {module_name}.weight: expected {expected}, got {tuple(weight.shape)}")
        # a tensor or a _FileMatrix: the quantizers read and convert it one row chunk at a time
        w = weight.to(self.device) if isinstance(weight, torch.Tensor) else weight
        if module.method == "int8":
            module.set_quantized(*quantize_int8(w))
        elif module.method == "int4":  # chunk by chunk straight to packed pairs: no (N, K) codes
            N, K, g = module.out_features, module.in_features, module.group_size
            packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
            scales = torch.empty(N, K // g, dtype=torch.bfloat16, device=w.device)
            zeros = torch.empty_like(scales)
            for rows in _row_chunks(N, K):
                codes, scales[rows], zeros[rows] = quantize_int4(w[rows], g)
                packed[rows] = pack_nibbles(codes)
            module.set_quantized(packed, scales, zeros)
        else:
            module.set_quantized(**quantize_nf4(w))
        self.done.add(module_name)
        release_memory()

    @staticmethod
    def _check_parts(name: str, module: QuantizedLinear, parts: dict[str, torch.Tensor]) -> None:
        N, K = module.out_features, module.in_features
        shapes = {"weight": (N, K) if module.method == "int8" else (N, K // 2)}
        if module.method == "int8":
            shapes["scales"] = (N,)
        elif module.method == "int4":
            shapes["scales"] = shapes["zeros"] = (N, K // module.group_size)
        else:
            blocks = N * K // NF4_BLOCK
            shapes.update(absmax=(blocks,), absmax_scale=(-(-blocks // NF4_DQ_BLOCK),), absmax_offset=())
        for part, shape in shapes.items():
            if tuple(parts[part].shape) != shape:
                raise ValueError(f"shape mismatch for {name}.{part}: expected {shape}, got {tuple(parts[part].shape)} "
                                 "(config.json's quantization record disagrees with the weights?)")

    def finish(self, folder: Path) -> Transformer:
        missing = [n for n in self.quantized if n not in self.done]
        missing += [k for k in self.floats if k not in self.done]
        if self.model.args.tie_embeddings and "lm_head.weight" in missing and "model.embed_tokens.weight" in self.done:
            missing.remove("lm_head.weight")
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(f"checkpoint in {folder} does not match the quantized model: missing {shown}")
        return self.model.eval()


def _iter_folder(folder: Path) -> tuple[str, dict[str, Any], list[Path]]:
    from .checkpoint import detect_format

    fmt, config_file, files = detect_format(folder)
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    return fmt, config, files


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time from safetensors files, each through its own short-lived mapping."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(file, framework="pt") as f:
                t = f.get_tensor(key)
            yield key, t


class _FileMatrix:
    """A 2-D tensor left in its safetensors file, read a slice of rows at a time (`m[rows]`), so
    quantizing it never holds the whole float matrix in memory."""

    def __init__(self, file: Path, key: str) -> None:
        from safetensors import safe_open

        self.file, self.key, self.device = file, key, torch.device("cpu")
        with safe_open(file, framework="pt") as f:
            self.shape = torch.Size(f.get_slice(key).get_shape())

    def __getitem__(self, rows: slice) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_slice(self.key)[rows].clone()

    def load(self) -> torch.Tensor:
        return self[0:self.shape[0]]


def _entries(files: list[Path]) -> Iterator[tuple[str, Path]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            yield key, file


def load_quantized(folder: str | Path, config: dict[str, Any], args: ModelArgs, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> Transformer:
    """A quantized checkpoint (config.json with "quantization") -> a quantized `Transformer`.

    This is the loader `checkpoint.load_model` calls; `dtype` is the float dtype of the rest
    (norms, activations), default the one recorded in config.json.
    """
    from .checkpoint import parse_dtype

    folder = Path(folder)
    record = config.get("quantization") or {}
    method, group_size = check_method(record.get("method"), record.get("group_size"))
    embeddings = bool(record.get("embeddings", True))
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = parse_dtype(dtype) or parse_dtype(stored)
    model = _skeleton(args, method, group_size, embeddings, dtype, device)
    _, _, files = _iter_folder(folder)
    if files[0].suffix != ".safetensors":
        raise ValueError(f"quantized checkpoints are safetensors files; {folder} holds {files[0].name}")
    asm = _Assembler(model, dtype, device)
    unexpected = []
    for key, tensor in _tensors(files):
        module_name, _, part = key.rpartition(".")
        if module_name in asm.quantized and part in _PARTS[asm.quantized[module_name].method]:
            asm.add_part(module_name, part, tensor)
        elif key in asm.floats:
            asm.set_float(key, tensor)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"checkpoint in {folder} has unexpected key(s): {', '.join(sorted(unexpected)[:5])}")
    return asm.finish(folder)


def load_and_quantize(path_or_name: str | Path | None, method: str, group_size: int | None = None, *,
                      embeddings: bool = True, dtype: str | torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> Transformer:
    """Load a float checkpoint and quantize it tensor by tensor as it is read (HF or Mistral
    native safetensors), so peak memory stays near the quantized model's size. An already
    quantized checkpoint is loaded as it is if it matches `method`/`group_size`."""
    from .checkpoint import load_model, native_key_to_hf, native_to_hf, parse_dtype, resolve_model_path

    method, group_size = check_method(method, group_size)
    folder = resolve_model_path(path_or_name)
    if folder.is_file():
        folder = folder.parent
    fmt, config, files = _iter_folder(folder)
    if config.get("quantization"):
        model = load_model(folder, dtype=dtype, device=device)
        have = model.quantization
        if (have["method"], have.get("group_size")) != (method, group_size):
            raise ValueError(f"{folder} is already quantized ({have['method']}, group size {have.get('group_size')}); "
                             f"quantize the float checkpoint to get {method}")
        return model
    if files[0].suffix != ".safetensors":  # pickles cannot be streamed: load, then quantize
        return quantize_model(load_model(folder, dtype=dtype, device=device), method, group_size, embeddings=embeddings)
    args = ModelArgs.from_hf_config(config) if fmt == "hf" else ModelArgs.from_params_json(config)
    target = parse_dtype(dtype)
    if target is None and fmt == "hf":
        stored = config.get("torch_dtype") or config.get("dtype")
        target = parse_dtype(stored) if isinstance(stored, str) and stored != "auto" else None
    model = _skeleton(args, method, group_size, embeddings, target or torch.float32, device)
    asm: _Assembler | None = None
    unexpected = []
    for key, file in _entries(files):
        hf_key = key if fmt == "hf" else native_key_to_hf(key)
        if hf_key is None:
            if not key.endswith("rotary_emb.inv_freq"):
                unexpected.append(key)
            continue
        if target is None:
            target = _FileMatrix(file, key)[0:1].dtype
            target = target if target.is_floating_point else torch.float32
        if asm is None:
            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.dtype = target
            asm = _Assembler(model, target, device)
        module_name = hf_key.rpartition(".")[0]
        source = _FileMatrix(file, key)
        if fmt == "native" and hf_key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = args.n_heads if ".q_proj." in hf_key else args.n_kv_heads
            source = native_to_hf(source.load(), heads)  # row permutation: read whole (attention-sized)
        tied_head = args.tie_embeddings and hf_key == "model.embed_tokens.weight" and "lm_head" in asm.quantized
        if module_name in asm.quantized:
            asm.add_quantized_from_float(module_name, source)
        elif hf_key in asm.floats:
            asm.set_float(hf_key, source.load() if isinstance(source, _FileMatrix) else source)
        elif args.tie_embeddings and hf_key == "lm_head.weight":
            continue
        else:
            unexpected.append(key)
            continue
        if tied_head:
            asm.add_quantized_from_float("lm_head", source)
    if unexpected:
        raise ValueError(f"checkpoint in {folder} has unexpected key(s): {', '.join(sorted(unexpected)[:5])}")
    if asm is None:
        raise ValueError(f"checkpoint in {folder} holds no tensors")
    return asm.finish(folder)


def _register() -> None:
    from . import checkpoint

    for m in METHODS:
        checkpoint.QUANTIZED_LOADERS.setdefault(m, load_quantized)


_register()
