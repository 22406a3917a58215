"""`RollingKVCache`: per-layer key/value buffers of a fixed capacity, written modulo capacity.

With a sliding window W the capacity is W, so memory stops growing once W tokens have been seen,
however long the generation runs. Each slot remembers the absolute position it holds
(`slot_pos`, -1 when empty), so the cache alone answers "which keys may this query see?" through
`attention_mask`, for prefill, chunked prefill, ragged batches and decode alike.

Keys are stored after RoPE, so a slot never needs re-rotating when the buffer wraps.

The buffers are allocated lazily: they grow (in steps of at least `GROW` slots, doubling) up to the
capacity as positions arrive, so a short prompt does not pay for a 4096-slot window up front.
Nothing wraps before the buffers reach the full capacity, so growing never moves a slot.

`kv_dtype=torch.int8` stores keys and values as int8 with one fp32 scale per token and head
(symmetric, absmax / 127, as llama.cpp's q8_0 cache with a block of head_dim): a quarter of an fp32
cache's bytes (plus 4 bytes per head_dim values), half of a bf16 one. Attention then reads the
rounded values, dequantized (`dequantize_int8`) or, in the compiled CPU decode step, straight from
int8 by `fast.decode_attention`.
"""

from __future__ import annotations

import torch

GROW = 256  # smallest buffer growth step, in slots


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query at q_pos[b, t] may attend the key at k_pos[b, s].

    A key is visible when it is valid (position >= 0), not in the future, and (with a sliding
    window W) among the last W positions including the query's own (transformers' convention).
    Padding queries (position < 0) see every key, which keeps their (unused) output finite.
    """
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask | (qp < 0)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean `mask` as an additive bias (0 / -inf) in `dtype`, built once per forward so
    that no layer converts it again inside `scaled_dot_product_attention`."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) as int8 values (..., D) and fp32 scales (...,): x ~= values * scale, symmetric,
    scale = max |x| / 127 over the last dimension (0 for an all-zero vector)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(xf * inv[..., None]).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_int8`, in `dtype`."""
    return (values.float() * scale[..., None]).to(dtype)


def _pad(t: torch.Tensor, dim: int, size: int, value: int) -> torch.Tensor:
    """`t` extended along `dim` to `size` with `value` (unchanged when already that long)."""
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


KV_DTYPES = {"auto": None, "int8": torch.int8}  # names of the cache dtypes users pick (CLI --kv-cache)


class RollingKVCache:
    """Rolling-buffer key/value cache for all layers of one batch of sequences.

    k[i], v[i]: (B, n_kv_heads, allocated, head_dim) for layer i (allocated grows to capacity).
    k_scale[i], v_scale[i]: (B, n_kv_heads, allocated) fp32 scales of an int8 cache (else empty lists).
    slot_pos:   (B, capacity) absolute position held by each slot, -1 when empty.
    next_pos:   (B,) position the next token of each row will take.
    dtype: the model's (attention's) dtype; kv_dtype: what the buffers hold (dtype, or torch.int8).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 capacity: int, window: int | None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kv_dtype: torch.dtype | None = None) -> None:
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"cache capacity and batch size must be positive, got {capacity} and {batch_size}")
        if window is not None and capacity < window:
            raise ValueError(f"cache capacity {capacity} is smaller than the sliding window {window}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype != dtype and kv_dtype != torch.int8:
            raise ValueError(f"kv_dtype must be the model's dtype ({dtype}) or torch.int8, got {kv_dtype}")
        self.dtype, self.kv_dtype = dtype, kv_dtype
        shape = (batch_size, n_kv_heads, min(capacity, GROW), head_dim)
        self.k = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(n_layers)]
        n_scales = n_layers if self.quantized else 0
        self.k_scale = [torch.zeros(shape[:3], device=device) for _ in range(n_scales)]
        self.v_scale = [torch.zeros(shape[:3], device=device) for _ in range(n_scales)]
        self.slot_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self.window = window
        self.length = 0  # max over rows of positions seen so far (host-side, for slicing)

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor], k_scale: list[torch.Tensor],
             v_scale: list[torch.Tensor], window: int | None, dtype: torch.dtype) -> "RollingKVCache":
        """A cache object over existing buffers, for `CacheStep`'s reads and writes only (no slot
        positions): how the ahead-of-time compiled step (`aot.py`), which takes the buffers as
        plain tensors, sees them."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.k_scale, cache.v_scale = list(k), list(v), list(k_scale), list(v_scale)
        cache.window, cache.dtype = window, dtype
        cache.kv_dtype = torch.int8 if k_scale else dtype
        return cache

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    @property
    def quantized(self) -> bool:
        return self.kv_dtype == torch.int8

    def buffers(self) -> list[torch.Tensor]:
        """Every per-slot buffer (keys, values, and an int8 cache's scales); slots along dim 2."""
        return [*self.k, *self.v, *self.k_scale, *self.v_scale]

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers (with scales) and slot positions."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), self.slot_pos))

    @property
    def allocated(self) -> int:
        return self.k[0].shape[2]

    def _map_buffers(self, fn) -> None:
        """Replace every per-slot buffer `t` by `fn(t)`."""
        self.k, self.v = [fn(t) for t in self.k], [fn(t) for t in self.v]
        self.k_scale, self.v_scale = [fn(t) for t in self.k_scale], [fn(t) for t in self.v_scale]

    def reserve(self, n: int) -> None:
        """Grow the buffers to hold at least `n` slots (doubling, capped at the capacity)."""
        n = min(n, self.capacity)
        if n <= self.allocated:
            return
        n = min(self.capacity, max(-(-n // GROW) * GROW, 2 * self.allocated))
        self._map_buffers(lambda t: _pad(t, 2, n, 0))

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_pos.zero_()
        self.length = 0

    # ------------------------------------------------------------------ batch rows
    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (1-D index) of the batch, in that order (finished rows leave)."""
        self._map_buffers(lambda t: t.index_select(0, keep))
        self.slot_pos = self.slot_pos.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)

    def append_rows(self, other: "RollingKVCache") -> None:
        """Append the rows of `other` (a cache of the same model) after this cache's rows.

        Both are first brought to the same shape, which never moves a slot: without a window the
        smaller capacity grows to the larger (such a cache never wraps, so slot = position), and
        buffers not yet grown to the capacity are padded to the longer one. Added slots are empty
        (position -1), hence never attended.
        """
        if self.capacity != other.capacity and (self.window is not None or other.window is not None):
            raise ValueError("caches with a sliding window have a fixed capacity: they must match to be joined")
        if self.kv_dtype != other.kv_dtype:
            raise ValueError(f"a cache of {other.kv_dtype} cannot join one of {self.kv_dtype}")
        capacity = max(self.capacity, other.capacity)
        allocated = max(self.allocated, other.allocated)
        for c in (self, other):
            c.slot_pos = _pad(c.slot_pos, 1, capacity, -1)
            c._map_buffers(lambda t: _pad(t, 2, allocated, 0))
            c.capacity = capacity
        joined = iter([torch.cat([a, b]) for a, b in zip(self.buffers(), other.buffers())])
        self._map_buffers(lambda t: next(joined))
        self.slot_pos = torch.cat([self.slot_pos, other.slot_pos])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.length = max(self.length, other.length)

    # ------------------------------------------------------------------ one forward step
    def plan(self, q_pos: torch.Tensor, new_length: int) -> "CacheStep":
        """Decide how a chunk of queries at `q_pos` (B, T) reads and writes the cache.

        write-first: the chunk is written, then attention reads the buffer (no copy). This is
        exact when no slot still needed by a query of the chunk gets overwritten: for one token
        at a time with capacity >= window, or while the buffer has not wrapped.
        read-then-write: attention reads [old buffer ++ new keys], then the chunk is written.
        """
        T = q_pos.shape[1]
        wraps = new_length > self.capacity
        if self.window is None and wraps:
            raise ValueError(
                f"sequence of {new_length} tokens exceeds the cache capacity of {self.capacity} "
                "(the model has no sliding window, so the cache must hold every position)"
            )
        self.reserve(new_length)
        index = self._write_index(q_pos)
        if T == 1 or not wraps:
            used = min(new_length, self.capacity)
            rows, cols, slots = index  # every slot < used: slot = position % capacity < new_length
            # Canonical strides (used, 1) even for one row, whose slice `.contiguous()` keeps the
            # stride (capacity, 1): a compiled step would otherwise recompile once `used` reaches it.
            k_pos = self.slot_pos[:, :used].clone(memory_format=torch.contiguous_format)
            k_pos[rows, slots] = q_pos[rows, cols]
            return CacheStep(self, q_pos, k_pos, index, write_first=True, used=used)
        if self.length == 0:  # nothing cached yet: the chunk attends only to itself
            return CacheStep(self, q_pos, q_pos, index, write_first=False, used=0)
        k_pos = torch.cat([self.slot_pos, q_pos], dim=1)
        return CacheStep(self, q_pos, k_pos, index, write_first=False, used=self.capacity)

    def plan_next_token(self, pos: int) -> "CacheStep":
        """`plan` for one token at `pos`, the next position of a batch-1 cache whose buffers are
        grown for it (`reserve`): the step every generated token takes, worked out in Python
        integers, so that it costs a few small tensors instead of ~15 tensor ops (each 10-30 us
        right after a decode step has streamed the weights through the CPU caches)."""
        slot = pos % self.capacity
        used = self.allocated
        k_pos = self.slot_pos[:, :used].clone(memory_format=torch.contiguous_format)
        k_pos[0, slot] = pos
        device = self.slot_pos.device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        index = (zero, zero, torch.tensor([slot], device=device))
        return CacheStep(self, torch.tensor([[pos]], device=device), k_pos, index, write_first=True, used=used,
                         host=(pos, slot))

    def _write_index(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, chunk index, slot) of each new token to store: valid and among its row's last `capacity`."""
        T = q_pos.shape[1]
        if T == 1 and bool((q_pos >= 0).all()):  # decode: one token per row, no host-side nonzero
            rows = torch.arange(q_pos.shape[0], device=q_pos.device)
            return rows, torch.zeros_like(rows), q_pos[:, 0] % self.capacity
        last = q_pos.max(dim=1, keepdim=True).values
        keep = (q_pos >= 0) & (q_pos > last - self.capacity)
        rows, cols = keep.nonzero(as_tuple=True)
        return rows, cols, q_pos[rows, cols] % self.capacity

    def layer_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer `layer`'s keys, values and (int8 cache) their scales, else None, None."""
        if self.quantized:
            return self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer]
        return self.k[layer], self.v[layer], None, None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """Store new keys/values (B, n_kv_heads, T, head_dim) of `layer` at `index` (see `_write_index`);
        an int8 cache takes `quantize_int8`'s values and scales."""
        rows, cols, slots = index
        if self.quantized:
            self.k_scale[layer][rows, :, slots] = k_scale[rows, :, cols]
            self.v_scale[layer][rows, :, slots] = v_scale[rows, :, cols]
        self.k[layer][rows, :, slots] = k[rows, :, cols]
        self.v[layer][rows, :, slots] = v[rows, :, cols]

    def commit(self, step: "CacheStep", new_length: int) -> None:
        """Record the chunk's positions once every layer has written it."""
        if step.host is not None:  # `plan_next_token`'s step: one position, known here
            self.commit_token(step.host[0], new_length)
            return
        rows, cols, slots = step.index
        self.slot_pos[rows, slots] = step.q_pos[rows, cols]
        self.next_pos = step.q_pos.max(dim=1).values.clamp(min=-1) + 1
        self.length = new_length

    def commit_next_tokens(self, new_length: int, last: int | None = None) -> None:
        """`commit` for one token of each row at its next position (`last`: a batch-1 cache's, known)."""
        if self.batch_size == 1 and last is not None:
            self.commit_token(last, new_length)
            return
        rows = torch.arange(self.batch_size, device=self.slot_pos.device)
        self.slot_pos[rows, self.next_pos % self.capacity] = self.next_pos
        self.next_pos = self.next_pos + 1
        self.length = new_length

    def commit_token(self, pos: int, new_length: int) -> None:
        """`commit` for one token of a batch-1 cache at position `pos`, slot `pos % capacity`."""
        self.slot_pos[0, pos % self.capacity] = pos
        self.next_pos.fill_(pos + 1)
        self.length = new_length


class CacheStep:
    """How one forward chunk uses the cache: the key positions, the mask, and per-layer k/v."""

    def __init__(self, cache: RollingKVCache, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 index: tuple[torch.Tensor, torch.Tensor, torch.Tensor], write_first: bool,
                 used: int, host: tuple[int, int] | None = None) -> None:
        self.cache, self.q_pos, self.k_pos, self.index = cache, q_pos, k_pos, index
        self.write_first, self.used = write_first, used
        self.host = host  # (position, slot) of a batch-1 one-token step planned in Python integers

    def bias(self) -> torch.Tensor:
        """The additive attention bias (B, 1, T, S) of this chunk: built once per forward, inside
        the compiled graph for a compiled decode step (one fused kernel instead of eight)."""
        return attention_bias(attention_mask(self.q_pos, self.k_pos, self.cache.window), self.cache.dtype)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, n_kv_heads, S, head_dim) this chunk attends to, matching `k_pos`, in the
        model's dtype (an int8 cache's dequantized: the chunk's own keys too, rounded as stored)."""
        keys, values, k_scale, v_scale = self.stored_keys_values(layer, k, v)
        if k_scale is None:
            return keys, values
        dtype = self.cache.dtype
        return dequantize_int8(keys, k_scale, dtype), dequantize_int8(values, v_scale, dtype)

    def stored_keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`keys_values` as stored: keys, values, and for an int8 cache their scales (B, n_kv_heads,
        S) (else None, None): the compiled CPU decode step reads int8 directly."""
        c = self.cache
        k_scale = v_scale = None
        if c.quantized:
            (k, k_scale), (v, v_scale) = quantize_int8(k), quantize_int8(v)
        new = (k, v, k_scale, v_scale)
        if self.write_first:
            c.write(layer, k, v, self.index, k_scale, v_scale)
            used = self.k_pos.shape[-1]  # == self.used; read from k_pos so a compiled step need not specialise on it
            return tuple(t if t is None else t[:, :, :used] for t in c.layer_buffers(layer))
        if self.used == 0:
            kept = new
        else:  # read the old buffers before the chunk overwrites slots its queries still see
            kept = tuple(a if a is None else torch.cat([a, b], dim=2) for a, b in zip(c.layer_buffers(layer), new))
        c.write(layer, k, v, self.index, k_scale, v_scale)
        return kept
