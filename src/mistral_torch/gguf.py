"""GGUF, llama.cpp's file format: read GGUF files into our `Transformer`, write ours as GGUF.

    load_gguf(path, dtype=None)                 a Transformer from a .gguf (also `load_model("x.gguf")`)
    load_gguf_tokenizer(path)                   our `Tokenizer`, rebuilt from the embedded vocabulary
    save_gguf(model, path, outtype, tokenizer)  a .gguf that llama.cpp (and ollama) load and run

Files are read and written through the `gguf` package (llama.cpp's own Python reader/writer, on
PyPI; `pip install 'mistral-torch[gguf]'`).

Model. llama.cpp runs Mistral checkpoints as its "llama" architecture; the hyper-parameters are
`llama.*` keys (embedding_length = dim, block_count = n_layers, feed_forward_length = hidden_dim,
attention.head_count[_kv], attention.key_length = head_dim, attention.layer_norm_rms_epsilon,
rope.freq_base, context_length = max_seq_len). Our sliding window is written as
`llama.attention.sliding_window` and read back, but llama.cpp's "llama" architecture does not
apply it: llama.cpp attends to the whole context, which gives the same result as long as a
sequence stays within the window (4096 tokens for Mistral-7B v0.1, 64 for tiny-en-fr).
A GGUF without `output.weight` has tied embeddings, as in llama.cpp.

Tensors: `token_embd`, `blk.N.attn_{norm,q,k,v,output}`, `blk.N.ffn_{norm,gate,up,down}`,
`output_norm`, `output`. GGUF lists dimensions fastest-first, so a (out, in) matrix is stored
with ne = [in, out] and its rows are the same bytes as ours. llama.cpp's converter permutes the
rows of q/k per head from transformers' half-split RoPE order into the interleaved order
(Mistral's native layout, `checkpoint.hf_to_native`); import undoes it (`native_to_hf`).

Tensor types. Read: F32, F16, BF16, Q8_0, Q4_0 (here, in torch, bit for bit as ggml), and the
other ggml block types the `gguf` package can dequantize (Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K, IQ*).
Written: f32, f16, bf16 (1-D norm weights always f32, as llama.cpp does), q8_0 and q4_0 (blocks
of 32 along each row with an fp16 scale; quantized exactly as ggml's reference code does).
q4_0 keeps `output.weight` at q8_0 (llama-quantize uses q6_K there, which nothing on PyPI writes).
A matrix whose row length is not a multiple of 32 falls back to f16, as llama.cpp's converter does.

Tokenizer. SentencePiece models are embedded as llama.cpp does it: `tokenizer.ggml.tokens`,
`scores`, `token_type` (SentencePiece's own piece types, same numbering), the special ids and
flags. A BPE model (Mistral's v1/v3 `tokenizer.model`) is written as `tokenizer.ggml.model =
"llama"` (llama.cpp's SPM tokenizer); a unigram model (ours, e.g. tiny-en-fr's) as "t5", llama.cpp's
unigram (Viterbi) tokenizer, because the merge-by-score SPM tokenizer segments unigram vocabularies
differently from SentencePiece. The rest of the SentencePiece model (trainer and normalizer specs)
is kept under `mistral_torch.sentencepiece.spec`, so import rebuilds the original `tokenizer.model`
byte for byte; a GGUF from elsewhere gets a model rebuilt from the llama.cpp keys. A chat template
(Jinja, the same prompts as `Tokenizer.encode_chat`) is written to `tokenizer.chat_template`.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .args import ModelArgs
from .model import Transformer

ARCHITECTURES = ("llama", "mistral")  # GGUF architectures with Mistral's layout ("mistral": same keys)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QK = 32  # values per Q8_0 / Q4_0 block
SPEC_KEY = "mistral_torch.sentencepiece.spec"  # base64 of the SentencePiece model minus its pieces
USER_DEFINED_KEY = "mistral_torch.sentencepiece.user_defined"  # ids written as normal pieces (see below)
EXPLICIT_TYPES_KEY = "mistral_torch.sentencepiece.explicit_types"  # piece types spelled out in the file

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}


def _gguf():
    """The `gguf` package, or a clear error naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF support needs the 'gguf' package: pip install 'mistral-torch[gguf]' "
                          "(or pip install gguf)") from None
    return gguf


# ---------------------------------------------------------------- tensor names
def gguf_name(hf_key: str) -> str:
    """transformers key -> GGUF tensor name (`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    if hf_key in _TOP:
        return _TOP[hf_key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_key)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise ValueError(f"no GGUF name for {hf_key!r}")


def hf_name(gguf_key: str) -> str | None:
    """GGUF tensor name -> transformers key (None if it is not part of a Mistral model)."""
    for hf, g in _TOP.items():
        if g == gguf_key:
            return hf
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_key)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}.weight"
    return None


def _rope_heads(hf_key: str, args: ModelArgs) -> int | None:
    if hf_key.endswith("self_attn.q_proj.weight"):
        return args.n_heads
    if hf_key.endswith("self_attn.k_proj.weight"):
        return args.n_kv_heads
    return None


# ---------------------------------------------------------------- Q8_0 / Q4_0 in torch (bit-exact with ggml)
def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), computed as ggml's Python reference does."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % QK:
        raise ValueError(f"rows of {cols} values cannot be split into blocks of {QK}")
    return w.detach().to(device="cpu", dtype=torch.float32).reshape(rows, cols // QK, QK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float -> (rows, cols/32*34) uint8: per block an fp16 scale d = max|x|/127, then
    32 int8 values round(x/d) — ggml's quantize_row_q8_0_ref."""
    x = _blocks(w)
    d = x.abs().amax(-1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8)
    raw = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return raw.reshape(w.shape[0], -1)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float -> (rows, cols/32*18) uint8: per block an fp16 scale d = m/-8 (m: the value
    of largest magnitude), then 32 4-bit values min(15, trunc(x/d + 8.5)), value j in the low
    nibble of byte j and value 16+j in its high nibble — ggml's quantize_row_q4_0_ref."""
    x = _blocks(w)
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = m / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., :QK // 2] | (q[..., QK // 2:] << 4)
    raw = torch.cat([d.to(torch.float16).view(torch.uint8), packed], dim=-1)
    return raw.reshape(w.shape[0], -1)


def q8_0_parts(raw: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales fp16 (rows, cols/32), values int8 (rows, cols)) of Q8_0 rows: w = scale * value."""
    b = raw.reshape(raw.shape[0], cols // QK, 2 + QK)
    d = b[..., :2].contiguous().view(torch.float16)
    q = b[..., 2:].contiguous().view(torch.int8)
    return d.reshape(raw.shape[0], -1), q.reshape(raw.shape[0], cols)


def q4_0_parts(raw: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales fp16 (rows, cols/32), values uint8 in 0..15 (rows, cols)) of Q4_0 rows:
    w = scale * (value - 8)."""
    b = raw.reshape(raw.shape[0], cols // QK, 2 + QK // 2)
    d = b[..., :2].contiguous().view(torch.float16)
    qs = b[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return d.reshape(raw.shape[0], -1), q.reshape(raw.shape[0], cols)


def dequantize_q8_0(raw: torch.Tensor, cols: int) -> torch.Tensor:
    d, q = q8_0_parts(raw, cols)
    rows = raw.shape[0]
    return (q.float().reshape(rows, -1, QK) * d.float()[..., None]).reshape(rows, cols)


def dequantize_q4_0(raw: torch.Tensor, cols: int) -> torch.Tensor:
    d, q = q4_0_parts(raw, cols)
    rows = raw.shape[0]
    return ((q.float() - 8).reshape(rows, -1, QK) * d.float()[..., None]).reshape(rows, cols)


# ---------------------------------------------------------------- a minimal protobuf codec (SentencePiece models)
# A SentencePiece model is a protobuf message: ModelProto { repeated SentencePiece pieces = 1;
# TrainerSpec trainer_spec = 2; NormalizerSpec normalizer_spec = 3; ... }, SentencePiece
# { string piece = 1; float score = 2; Type type = 3 (NORMAL=1 when absent) }. These few lines
# read and write that wire format, so no protobuf runtime is needed.
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _pb_fields(buf: bytes) -> Iterator[tuple[int, int, Any, bytes]]:
    """(field number, wire type, value, raw bytes of the whole field) for each field of a message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        no, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i)
        elif wt == 1:
            value, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wt == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield no, wt, value, buf[start:i]


def _pb_varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are ten-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(no: int, value: int) -> bytes:
    return _pb_varint(no << 3) + _pb_varint(int(value))


def _pb_bytes(no: int, value: bytes) -> bytes:
    return _pb_varint(no << 3 | 2) + _pb_varint(len(value)) + value


def _pb_float(no: int, value: float) -> bytes:
    return _pb_varint(no << 3 | 5) + struct.pack("<f", value)


@dataclass
class SentencePieceModel:
    """A SentencePiece model split into its pieces and everything else (`spec`: raw protobuf bytes)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    spec: bytes  # trainer_spec, normalizer_spec, ... exactly as stored
    explicit_types: bool = False  # every piece spells out its type, even NORMAL (Mistral's v3 file does)

    @classmethod
    def parse(cls, data: bytes) -> "SentencePieceModel":
        pieces, scores, types, spec, explicit = [], [], [], bytearray(), True
        for no, wt, value, raw in _pb_fields(data):
            if no != 1 or wt != 2:
                spec += raw
                continue
            piece, score, typ, has_type = "", 0.0, 1, False
            for f, _, v, _ in _pb_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    typ, has_type = v, True
            explicit = explicit and has_type
            pieces.append(piece)
            scores.append(score)
            types.append(typ)
        if not pieces:
            raise ValueError("not a SentencePiece model (no pieces)")
        return cls(pieces, scores, types, bytes(spec), explicit)

    def serialize(self) -> bytes:
        out = bytearray()
        for piece, score, typ in zip(self.pieces, self.scores, self.types):
            body = _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, score)
            if typ != 1 or self.explicit_types:
                body += _pb_int(3, typ)
            out += _pb_bytes(1, body)
        return bytes(out + self.spec)

    def _sub(self, no: int) -> dict[int, Any]:
        for f, wt, value, _ in _pb_fields(self.spec):
            if f == no and wt == 2:
                return {k: v for k, _, v, _ in _pb_fields(value)}
        return {}

    @property
    def trainer(self) -> dict[int, Any]:
        return self._sub(2)

    @property
    def normalizer(self) -> dict[int, Any]:
        return self._sub(3)

    @property
    def model_type(self) -> str:
        """"unigram", "bpe", "word" or "char" (TrainerSpec.model_type, field 3; default unigram)."""
        return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(self.trainer.get(3, 1), "unknown")

    def special_id(self, field: int, default: int) -> int:
        """TrainerSpec unk_id (40), bos_id (41), eos_id (42), pad_id (43); -1 = none."""
        v = self.trainer.get(field, default)
        return v - (1 << 64) if v >= 1 << 63 else v

    def flag(self, field: int, default: bool) -> bool:
        """NormalizerSpec add_dummy_prefix (3), remove_extra_whitespaces (4), escape_whitespaces (5)."""
        return bool(self.normalizer.get(field, default))

    @property
    def charsmap(self) -> bytes:
        return self.normalizer.get(2, b"")


def _rebuilt_spec(model_type: str, n: int, types: list[int], ids: dict[str, int],
                  add_space_prefix: bool, remove_extra_ws: bool, charsmap: bytes) -> bytes:
    """Trainer and normalizer specs for a vocabulary that came without ours (a GGUF from elsewhere)."""
    trainer = (_pb_int(3, 1 if model_type == "unigram" else 2) + _pb_int(4, n)
               + _pb_int(35, 6 in types)  # byte_fallback when there are byte pieces
               + _pb_int(40, ids["unk"]) + _pb_int(41, ids["bos"]) + _pb_int(42, ids["eos"])
               + _pb_int(43, ids["pad"]))
    normalizer = (_pb_bytes(1, b"identity") + (_pb_bytes(2, charsmap) if charsmap else b"")
                  + _pb_int(3, add_space_prefix) + _pb_int(4, remove_extra_ws) + _pb_int(5, 1))
    return _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# ---------------------------------------------------------------- chat templates (Jinja, as encode_chat)
# v1: [INST] markers are text, the system prompt goes before the first user message.
CHAT_TEMPLATE_V1 = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '[INST] ' + ((ns.system + '\\n\\n') if ns.first and ns.system else '') + m['content'] + ' [/INST]' -}}"
    "{%- set ns.first = false -%}"
    "{%- else -%}"
    "{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# v3: [INST] / [/INST] are control tokens, the system prompt goes before the last user message,
# assistant answers lose trailing spaces.
CHAT_TEMPLATE_V3 = (
    "{%- set ns = namespace(system='', last=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '[INST]' + ((ns.system + '\\n\\n') if loop.index0 == ns.last and ns.system else '') + m['content'] + '[/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- m['content'].rstrip(' ') + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# ---------------------------------------------------------------- reading
class GGUFFormatError(ValueError):
    """A GGUF file this package cannot read (the message names the key, tensor or type at fault)."""


def _open_reader(path: Path):
    """A `gguf.GGUFReader` that reports truncated files and unknown tensor types clearly."""
    gguf = _gguf()

    class _Reader(gguf.GGUFReader):
        _itemsize: dict = {}

        def _get(self, offset, dtype, count=1, override_order=None):
            # As GGUFReader._get, on a plain ndarray view of the mapping: slicing a np.memmap costs
            # ~20 us, and a 32000-token vocabulary takes ~100,000 slices (5-10 s -> under 1 s).
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            size = self._itemsize.get(dtype) or self._itemsize.setdefault(dtype, np.dtype(dtype).itemsize)
            count = int(count)
            arr = plain[offset:offset + size * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _build_tensors(self, start_offs, fields):  # check bounds and types before numpy does
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise GGUFFormatError(f"{path}: tensor {name!r} has ggml type id {int(raw_dtype[0])}, "
                                          "which this version of the gguf package does not know") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise GGUFFormatError(f"{path} is truncated: tensor {name!r} ends at byte {end:,} "
                                          f"but the file has {size:,} bytes")
            super()._build_tensors(start_offs, fields)

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _Reader(path)
    except GGUFFormatError:
        raise
    except Exception as exc:  # the reader raises ValueError/IndexError/... on damaged headers
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')") from None
        raise GGUFFormatError(f"{path}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from None


class GGUFFile:
    """Metadata, tensor infos and tensors of one GGUF file (memory-mapped, read tensor by tensor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        if self.reader.byte_order != "I":
            raise GGUFFormatError(f"{self.path} is a big-endian GGUF file; only little-endian files are supported")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFFormatError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def _mapped(self, name: str) -> np.memmap:
        """The tensor's bytes in a mapping of their own (copy-on-write, so torch may view them)."""
        t = self.tensors[name]
        return np.memmap(self.path, dtype=np.uint8, mode="c", offset=t.data_offset, shape=(t.n_bytes,))

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in our order, (rows, cols) for a matrix (GGUF lists dimensions reversed)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes (rows, bytes per row) as uint8, copied out of a short-lived mapping."""
        mm = self._mapped(name)
        try:
            return torch.from_numpy(mm).reshape(int(np.prod(self.shape(name)[:-1])), -1).clone()
        finally:
            del mm

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor in our (rows, cols) order as `dtype` (default: F16/BF16 as stored, everything
        else float32). It is converted straight out of its own mapping, quantized types in chunks
        of rows, so converting one tensor holds little more than its result."""
        gguf = _gguf()
        qtype, Q = self.tensors[name].tensor_type, gguf.GGMLQuantizationType
        shape = self.shape(name)
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        floats = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
        mm = self._mapped(name)
        try:
            raw = torch.from_numpy(mm).reshape(rows, -1)
            if qtype in floats:
                return raw.view(floats[qtype]).to(dtype or floats[qtype], copy=True).reshape(shape)
            if qtype == Q.Q8_0:
                dequantize = functools.partial(dequantize_q8_0, cols=cols)
            elif qtype == Q.Q4_0:
                dequantize = functools.partial(dequantize_q4_0, cols=cols)
            else:
                def dequantize(chunk: torch.Tensor) -> torch.Tensor:
                    return torch.from_numpy(gguf.quants.dequantize(chunk.numpy(), qtype))
            out = torch.empty(rows, cols, dtype=dtype or torch.float32)
            step = max(1, (1 << 20) // cols)  # about a million values at a time
            for r in range(0, rows, step):
                try:
                    out[r:r + step] = dequantize(raw[r:r + step])
                except NotImplementedError:
                    raise GGUFFormatError(
                        f"{self.path}: tensor {name!r} has type {qtype.name}, which cannot be dequantized "
                        "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K and the IQ types "
                        "the gguf package reads)") from None
            return out.reshape(shape)
        finally:
            del raw, mm

    # -------------------------------------------------------------- model hyper-parameters
    def model_args(self) -> ModelArgs:
        arch = self.arch
        if arch not in ARCHITECTURES:
            raise GGUFFormatError(f"{self.path}: unsupported GGUF architecture {arch!r} "
                                  f"(supported: {', '.join(ARCHITECTURES)}, i.e. Mistral/Llama models)")

        def key(name: str, default: Any = None, required: bool = False) -> Any:
            full = f"{arch}.{name}"
            return self.require(full) if required else self.get(full, default)

        if key("expert_count", 0):
            raise GGUFFormatError(f"{self.path}: mixture-of-experts models ({arch}.expert_count = "
                                  f"{key('expert_count')}) are not supported")
        scaling = key("rope.scaling.type", "none")
        if scaling not in ("none", None) and key("rope.scaling.factor", 1.0) not in (0.0, 1.0):
            raise GGUFFormatError(f"{self.path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) "
                                  "is not supported")
        dim, n_heads = key("embedding_length", required=True), key("attention.head_count", required=True)
        if isinstance(n_heads, list) or isinstance(key("attention.head_count_kv"), list) \
                or isinstance(key("feed_forward_length"), list):
            raise GGUFFormatError(f"{self.path}: per-layer head counts / FFN sizes are not supported")
        head_dim = key("attention.key_length", dim // n_heads)
        if key("attention.value_length", head_dim) != head_dim:
            raise GGUFFormatError(f"{self.path}: key_length {head_dim} != value_length "
                                  f"{key('attention.value_length')} is not supported")
        if key("rope.dimension_count", head_dim) != head_dim:
            raise GGUFFormatError(f"{self.path}: partial RoPE ({arch}.rope.dimension_count = "
                                  f"{key('rope.dimension_count')}, head_dim {head_dim}) is not supported")
        if "token_embd.weight" not in self.tensors:
            raise GGUFFormatError(f"{self.path}: tensor 'token_embd.weight' is missing")
        emb_shape = [int(d) for d in self.tensors["token_embd.weight"].shape]  # ne: [dim, vocab]
        vocab = emb_shape[1]
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        n_tokens = len(tokens.data) if tokens is not None else None
        if n_tokens is not None and n_tokens != vocab:
            raise GGUFFormatError(f"{self.path}: the vocabulary has {n_tokens} tokens "
                                  f"(tokenizer.ggml.tokens) but token_embd.weight has {vocab} rows")
        declared = key("vocab_size")
        if declared is not None and declared != vocab:
            raise GGUFFormatError(f"{self.path}: {arch}.vocab_size = {declared} but token_embd.weight "
                                  f"has {vocab} rows")
        window = key("attention.sliding_window")
        try:
            return ModelArgs(
                dim=dim, n_layers=key("block_count", required=True), head_dim=head_dim,
                hidden_dim=key("feed_forward_length", required=True), n_heads=n_heads,
                n_kv_heads=key("attention.head_count_kv", n_heads),
                norm_eps=_f32(key("attention.layer_norm_rms_epsilon", required=True)), vocab_size=vocab,
                rope_theta=_f32(key("rope.freq_base", 10000.0)), sliding_window=window or None,
                max_seq_len=key("context_length", required=True),
                tie_embeddings="output.weight" not in self.tensors,
            )
        except ValueError as exc:
            raise GGUFFormatError(f"{self.path}: {exc}") from None

    # -------------------------------------------------------------- tokenizer
    def sentencepiece_model(self) -> SentencePieceModel:
        """The embedded vocabulary as a SentencePiece model (the original one when we wrote the file)."""
        kind = self.get("tokenizer.ggml.model")
        if kind is None:
            raise GGUFFormatError(f"{self.path} has no embedded tokenizer (tokenizer.ggml.model is missing)")
        if kind not in ("llama", "t5"):
            raise GGUFFormatError(f"{self.path}: tokenizer type {kind!r} (tokenizer.ggml.model) is not a "
                                  "SentencePiece vocabulary ('llama' or 't5'); it cannot be rebuilt here")
        pieces = self.require("tokenizer.ggml.tokens")
        n = len(pieces)
        scores = self.get("tokenizer.ggml.scores") or [0.0] * n
        types = self.get("tokenizer.ggml.token_type") or [1] * n
        if len(scores) != n or len(types) != n:
            raise GGUFFormatError(f"{self.path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
        types = [int(t) for t in types]
        for i in self.get(USER_DEFINED_KEY) or []:
            types[i] = 4  # user-defined pieces written as normal ones for llama.cpp's sake
        spec_b64 = self.get(SPEC_KEY)
        if spec_b64:
            spec = base64.b64decode(spec_b64)
            n_orig = SentencePieceModel([], [], [], spec).trainer.get(4, n)
            if n_orig < n and all(p == f"[PAD{i}]" for i, p in enumerate(pieces[n_orig:], n_orig)):
                n = n_orig  # drop the padding tokens save_gguf added for padded embeddings
                pieces, scores, types = pieces[:n], scores[:n], types[:n]
        else:
            ids = {name: int(self.get(f"tokenizer.ggml.{key}", default))
                   for name, key, default in (("unk", "unknown_token_id", 0), ("bos", "bos_token_id", 1),
                                              ("eos", "eos_token_id", 2), ("pad", "padding_token_id", -1))}
            charsmap = bytes(self.get("tokenizer.ggml.precompiled_charsmap") or [])
            spec = _rebuilt_spec("unigram" if kind == "t5" else "bpe", n, types, ids,
                                 bool(self.get("tokenizer.ggml.add_space_prefix", True)),
                                 bool(self.get("tokenizer.ggml.remove_extra_whitespaces", False)), charsmap)
        return SentencePieceModel(list(pieces), [float(s) for s in scores], types, spec,
                                  bool(self.get(EXPLICIT_TYPES_KEY, False)))


# ---------------------------------------------------------------- load
def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06),
    so that the 1e-5 we wrote comes back as 1e-5."""
    return float(str(np.float32(value)))


def _set_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, name, nn.Parameter(value, requires_grad=getattr(module, name).requires_grad))


def _default_dtype(f: GGUFFile) -> torch.dtype:
    """The dtype the weights are stored in when they all share one float type, else float32."""
    kinds = {f.type_name(n) for n, t in f.tensors.items() if len(t.shape) == 2}
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kinds.pop(), torch.float32) \
        if len(kinds) == 1 else torch.float32


def load_gguf(path: str | Path, dtype: str | torch.dtype | None = None,
              device: str | torch.device = "cpu", keep_quantized: bool = False) -> Transformer:
    """A `Transformer` (eval mode) from a GGUF file of a Mistral/Llama-architecture model.

    dtype: target dtype; None keeps F32/F16/BF16 weights as stored and dequantizes quantized ones
           (Q8_0, Q4_0, K-quants, ...) to float32. Tensors are read one at a time from the file.
    keep_quantized: Q4_0 matrices become `quantize.Int4Linear` / `Int4Embedding` (group size 32,
           zero 0) holding the file's 4-bit codes; the scales become bf16 (the file's are fp16),
           so weights move by at most 1/256 of each block's largest magnitude. Q8_0 has one scale
           per 32 values where `Int8Linear` has one per row, so Q8_0 is dequantized either way.
    """
    from .checkpoint import native_to_hf, parse_dtype

    f = GGUFFile(path)
    args = f.model_args()
    target = parse_dtype(dtype) or _default_dtype(f)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    if args.tie_embeddings:
        expected.pop("lm_head.weight", None)
    unsupported = [name for name in f.tensors if hf_name(name) not in expected]
    if unsupported:
        raise GGUFFormatError(f"{f.path}: tensor(s) this Mistral/Llama model does not have: "
                              f"{', '.join(sorted(unsupported)[:6])}"
                              + (" (biases, RoPE frequency factors and experts are not supported)"
                                 if any(("bias" in n or "rope" in n or "exps" in n) for n in unsupported) else ""))
    missing = sorted(gguf_name(k) for k in expected if gguf_name(k) not in f.tensors)
    if missing:
        raise GGUFFormatError(f"{f.path}: missing tensor(s): {', '.join(missing[:6])}")
    for name in f.tensors:
        key = hf_name(name)
        shape = f.shape(name)
        if shape != expected[key]:
            raise GGUFFormatError(f"{f.path}: tensor {name!r} has shape {shape}, the metadata implies "
                                  f"{expected[key]} (the file's metadata disagrees with its tensors?)")
        heads = _rope_heads(key, args)
        if keep_quantized and f.type_name(name) == "Q4_0" and not (args.tie_embeddings and "embed" in key):
            raw = f.raw(name)
            if heads is not None:
                raw = native_to_hf(raw, heads)  # whole rows move: the blocks stay intact
            _set_int4(model, key.removesuffix(".weight"), raw, shape, target, device)
            continue
        value = f.tensor(name, target).to(device)
        if heads is not None:
            value = native_to_hf(value, heads)
        _set_param(model, key, value.contiguous())
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _set_int4(model: Transformer, module_name: str, raw: torch.Tensor, shape: tuple[int, int],
              dtype: torch.dtype, device: str | torch.device) -> None:
    """Q4_0 rows -> an Int4Linear (Int4Embedding for the embeddings): code q, scale d, zero 0."""
    from .quantize import Int4Embedding, Int4Linear, pack_nibbles

    rows, cols = shape
    d, q = q4_0_parts(raw, cols)
    cls = Int4Embedding if module_name.endswith("embed_tokens") else Int4Linear
    kw = {"use_kernel": False} if cls is Int4Embedding else {}
    m = cls(cols, rows, group_size=QK, dtype=dtype, device=device, **kw)
    m.set_quantized(pack_nibbles(q).to(device), d.to(device=device, dtype=torch.bfloat16),
                    torch.zeros(rows, cols // QK, dtype=torch.bfloat16, device=device))
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, m)


def sentencepiece_bytes(path: str | Path | GGUFFile) -> bytes:
    """The serialized SentencePiece model (`tokenizer.model` contents) embedded in a GGUF file."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    return f.sentencepiece_model().serialize()


def load_gguf_tokenizer(path: str | Path | GGUFFile):
    """Our `Tokenizer` for a GGUF file, rebuilt from its embedded SentencePiece vocabulary."""
    from .tokenizer import Tokenizer

    data = sentencepiece_bytes(path)
    with tempfile.TemporaryDirectory() as tmp:  # sentencepiece reads the whole model into memory
        file = Path(tmp) / "tokenizer.model"
        file.write_bytes(data)
        try:
            return Tokenizer.from_file(file)
        except ValueError as exc:
            raise GGUFFormatError(f"{getattr(path, 'path', path)}: the embedded vocabulary is not a valid "
                                  f"SentencePiece model ({exc})") from None


# ---------------------------------------------------------------- write
def _tensor_plan(hf_key: str, shape: tuple[int, ...], outtype: str) -> str:
    """The ggml type name one tensor is written as."""
    if len(shape) == 1 or outtype == "f32":
        return "F32"
    if outtype in ("f16", "bf16"):
        return outtype.upper()
    if shape[-1] % QK:
        return "F16"  # as llama.cpp's converter: rows that do not split into blocks stay f16
    if outtype == "q4_0" and hf_key == "lm_head.weight":
        return "Q8_0"
    return outtype.upper()


def _encode(tensor: torch.Tensor, kind: str) -> np.ndarray:
    """A (rows, cols) float tensor as the bytes of ggml type `kind` (uint8 array, or f32/f16 array)."""
    t = tensor.detach().to("cpu")
    if kind == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if kind == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if kind == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    if kind in ("Q8_0", "Q4_0"):
        quantize = quantize_q8_0 if kind == "Q8_0" else quantize_q4_0
        rows, cols = t.shape
        out = torch.empty(rows, cols // QK * (2 + (QK if kind == "Q8_0" else QK // 2)), dtype=torch.uint8)
        step = max(1, (1 << 20) // cols)  # about a million values at a time
        for r in range(0, rows, step):
            out[r:r + step] = quantize(t[r:r + step])
        return out.numpy()
    raise ValueError(f"cannot write ggml type {kind}")


def _export_tensors(model: Transformer) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(hf key, GGUF name, tensor in GGUF row order), tied lm_head omitted (llama.cpp reuses token_embd)."""
    from .checkpoint import hf_to_native

    args = model.args
    for key, tensor in model.state_dict().items():
        if key.endswith(("lora_A", "lora_B")) or ".base." in key:
            raise ValueError(f"{key!r}: merge LoRA adapters (lora.merge_lora) before writing GGUF")
        if args.tie_embeddings and key == "lm_head.weight":
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{key!r} is {tensor.dtype}: dequantize quantized layers before writing GGUF")
        heads = _rope_heads(key, args)
        if heads is not None:
            tensor = hf_to_native(tensor, heads)
        yield key, gguf_name(key), tensor


def _tokenizer_model(tokenizer) -> SentencePieceModel:
    from .tokenizer import Tokenizer, _SentencePiece

    if not isinstance(tokenizer, Tokenizer) or not isinstance(tokenizer._backend, _SentencePiece):
        name = getattr(getattr(tokenizer, "path", None), "name", type(tokenizer).__name__)
        raise ValueError(f"GGUF export embeds SentencePiece tokenizers only; {name} is not one "
                         "(tekken.json / tokenizer.json vocabularies are not supported)")
    return SentencePieceModel.parse(Path(tokenizer.path).read_bytes())


def _add_tokenizer(w, sp: SentencePieceModel, vocab_size: int, chat_template: str | None) -> None:
    gguf = _gguf()
    n = len(sp.pieces)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} pieces but the model only {vocab_size} embeddings")
    if sp.model_type not in ("bpe", "unigram"):
        raise ValueError(f"SentencePiece model type {sp.model_type!r} cannot be run by llama.cpp")
    pieces, scores, types = list(sp.pieces), list(sp.scores), list(sp.types)
    for i in range(n, vocab_size):  # padded embeddings: unused tokens, as llama.cpp's converter writes
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    user_defined = [i for i, t in enumerate(types) if t == int(gguf.TokenType.USER_DEFINED)]
    if sp.model_type == "unigram" and user_defined:
        # llama.cpp cuts user-defined pieces out of the text before tokenizing and then gives every
        # remaining fragment its own leading "▁"; SentencePiece matches them inside the text with the
        # single dummy prefix at the start. As normal pieces (score 0, above every log-probability)
        # llama.cpp's Viterbi still picks them, and tokenizes as SentencePiece does.
        for i in user_defined:
            types[i] = int(gguf.TokenType.NORMAL)
        w.add_array(USER_DEFINED_KEY, user_defined)
    w.add_tokenizer_model("t5" if sp.model_type == "unigram" else "llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for name, field, default, add in (("unk", 40, 0, w.add_unk_token_id), ("bos", 41, 1, w.add_bos_token_id),
                                      ("eos", 42, 2, w.add_eos_token_id), ("pad", 43, -1, w.add_pad_token_id)):
        i = sp.special_id(field, default)
        if 0 <= i < n:
            add(i)
    w.add_add_bos_token(sp.special_id(41, 1) >= 0)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(sp.flag(3, True))
    w.add_remove_extra_whitespaces(sp.flag(4, True))
    if sp.model_type == "unigram" and sp.charsmap:
        w.add_precompiled_charsmap(sp.charsmap)
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_string(SPEC_KEY, base64.b64encode(sp.spec).decode("ascii"))
    if sp.explicit_types:
        w.add_bool(EXPLICIT_TYPES_KEY, True)


def save_gguf(model: Transformer, path: str | Path, outtype: str | None = None, tokenizer=None, *,
              name: str | None = None, chat_template: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` (and its SentencePiece `tokenizer`) as a GGUF file llama.cpp can run.

    outtype: f32, f16, bf16, q8_0 or q4_0 (default: the model's dtype). The file is written beside
    its destination and renamed into place; an existing file is refused unless `overwrite`.
    chat_template: Jinja template; default: the tokenizer's own form (v1 text or v3 control markers).
    """
    gguf = _gguf()
    if outtype is None:
        outtype = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(model.dtype, "f32")
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r} (use one of: {', '.join(OUTTYPES)})")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True, or --force, to replace it)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; GGUF output is a single file")
    args = model.args
    sp = _tokenizer_model(tokenizer) if tokenizer is not None else None
    if chat_template is None and tokenizer is not None:
        chat_template = CHAT_TEMPLATE_V3 if tokenizer.template == "v3" else CHAT_TEMPLATE_V1

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, arch="llama")
        w.add_name(name or path.stem)
        w.add_type("model")
        file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                     "q4_0": "MOSTLY_Q4_0"}[outtype]
        w.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
        if outtype in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(args.vocab_size)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_rope_dimension_count(args.head_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(args.rope_theta)
        if args.sliding_window is not None:
            w.add_sliding_window(args.sliding_window)  # recorded; llama.cpp's "llama" arch ignores it
        if sp is not None:
            _add_tokenizer(w, sp, args.vocab_size, chat_template)
        else:
            w.add_tokenizer_model("none")  # llama.cpp then runs on token ids alone

        # Header and tensor infos first, then each tensor converted and written on its own.
        plan = []
        for key, gname, tensor in _export_tensors(model):
            kind = _tensor_plan(key, tuple(tensor.shape), outtype)
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = tensor.numel() * type_size // block
            w.add_tensor_info(gname, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
            plan.append((key, kind))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (key, kind), (_, _, tensor) in zip(plan, _export_tensors(model)):
            w.write_tensor_data(_encode(tensor, kind))
        w.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result should not be
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- the convert command
def merge_adapter(model: Transformer, adapter: str | Path, qlora_base: str = "auto") -> Transformer:
    """Load a PEFT-format LoRA adapter onto `model` and merge it in (NF4 base for QLoRA adapters)."""
    import json

    from .lora import ADAPTER_CONFIG, load_adapter, merge_lora, quantize_base_nf4

    cfg = Path(adapter) / ADAPTER_CONFIG
    if not cfg.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter} (not a LoRA adapter folder)")
    dtype = model.dtype
    nf4 = bool(json.loads(cfg.read_text()).get("mistral_torch", {}).get("qlora"))
    if qlora_base == "yes" or (qlora_base == "auto" and nf4):
        quantize_base_nf4(model)
    load_adapter(model, adapter)
    return merge_lora(model, dtype=dtype) or model


def convert_command(args) -> int:
    """`mistral-torch convert` when GGUF is involved (or an adapter is merged on the way)."""
    from .checkpoint import load_model, resolve_model_path, save_model, tokenizer_files
    from .tokenizer import load_tokenizer

    src = resolve_model_path(args.src)
    from_gguf = src.is_file() and src.suffix == ".gguf"
    outtype = getattr(args, "outtype", None)
    if outtype and args.to != "gguf":
        raise ValueError("--outtype applies to --to gguf (use --dtype for hf/mistral)")
    model = load_model(src, dtype=args.dtype)
    if getattr(args, "adapter", None):
        model = merge_adapter(model, args.adapter)
    dtype = str(model.dtype).removeprefix("torch.")
    if args.to == "gguf":
        tokenizer = load_gguf_tokenizer(src) if from_gguf else load_tokenizer(src)
        name = Path(args.src).name.removesuffix(".gguf")
        try:
            save_gguf(model, args.dst, outtype, tokenizer, name=name, overwrite=args.force)
        except FileExistsError as exc:
            raise ValueError(str(exc)) from None
        size = Path(args.dst).stat().st_size
        print(f"wrote {args.dst} (gguf {outtype or 'as ' + dtype}, {model.args.n_params:,} parameters, "
              f"{size / 1e6:,.1f} MB; tokenizer and chat template embedded)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if from_gguf:
            extra = [Path(tmp) / "tokenizer.model"]
            extra[0].write_bytes(sentencepiece_bytes(src))
        else:
            extra = tokenizer_files(src if src.is_dir() else src.parent)
        try:
            save_model(model, args.dst, format=args.to, max_shard_size=args.max_shard_size,
                       overwrite=args.force, extra_files=extra)
        except FileExistsError as exc:
            raise ValueError(str(exc)) from None
    print(f"wrote {args.dst} ({args.to}, {dtype}, {model.args.n_params:,} parameters)")
    return 0
