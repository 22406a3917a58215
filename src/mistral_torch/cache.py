"""`RollingKVCache`: per-layer key/value buffers of a fixed capacity, written modulo capacity.

With a sliding window W the capacity is W, so memory stops growing once W tokens have been seen,
however long the generation runs. Each slot remembers the absolute position it holds
(`slot_pos`, -1 when empty), so the cache alone answers "which keys may this query see?" through
`attention_mask`, for prefill, chunked prefill, ragged batches and decode alike.

Keys are stored after RoPE, so a slot never needs re-rotating when the buffer wraps.

The buffers are allocated lazily: they grow (in steps of at least `GROW` slots, doubling) up to the
capacity as positions arrive, so a short prompt does not pay for a 4096-slot window up front.
Nothing wraps before the buffers reach the full capacity, so growing never moves a slot.
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


def _pad(t: torch.Tensor, dim: int, size: int, value: int) -> torch.Tensor:
    """`t` extended along `dim` to `size` with `value` (unchanged when already that long)."""
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


class RollingKVCache:
    """Rolling-buffer key/value cache for all layers of one batch of sequences.

    k[i], v[i]: (B, n_kv_heads, allocated, head_dim) for layer i (allocated grows to capacity).
    slot_pos:   (B, capacity) absolute position held by each slot, -1 when empty.
    next_pos:   (B,) position the next token of each row will take.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 capacity: int, window: int | None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"cache capacity and batch size must be positive, got {capacity} and {batch_size}")
        if window is not None and capacity < window:
            raise ValueError(f"cache capacity {capacity} is smaller than the sliding window {window}")
        shape = (batch_size, n_kv_heads, min(capacity, GROW), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slot_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self.window = window
        self.length = 0  # max over rows of positions seen so far (host-side, for slicing)

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers and slot positions."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.slot_pos))

    @property
    def allocated(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, n: int) -> None:
        """Grow the buffers to hold at least `n` slots (doubling, capped at the capacity)."""
        n = min(n, self.capacity)
        if n <= self.allocated:
            return
        n = min(self.capacity, max(-(-n // GROW) * GROW, 2 * self.allocated))
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], n - t.shape[2], t.shape[3])], dim=2)
        self.k, self.v = [grow(t) for t in self.k], [grow(t) for t in self.v]

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_pos.zero_()
        self.length = 0

    # ------------------------------------------------------------------ batch rows
    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (1-D index) of the batch, in that order (finished rows leave)."""
        self.k = [k.index_select(0, keep) for k in self.k]
        self.v = [v.index_select(0, keep) for v in self.v]
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
        capacity = max(self.capacity, other.capacity)
        allocated = max(self.allocated, other.allocated)
        for c in (self, other):
            c.slot_pos = _pad(c.slot_pos, 1, capacity, -1)
            c.k = [_pad(k, 2, allocated, 0) for k in c.k]
            c.v = [_pad(v, 2, allocated, 0) for v in c.v]
            c.capacity = capacity
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Store new keys/values (B, n_kv_heads, T, head_dim) of `layer` at `index` (see `_write_index`)."""
        rows, cols, slots = index
        self.k[layer][rows, :, slots] = k[rows, :, cols]
        self.v[layer][rows, :, slots] = v[rows, :, cols]

    def commit(self, step: "CacheStep", new_length: int) -> None:
        """Record the chunk's positions once every layer has written it."""
        rows, cols, slots = step.index
        self.slot_pos[rows, slots] = step.q_pos[rows, cols]
        self.next_pos = step.q_pos.max(dim=1).values.clamp(min=-1) + 1
        self.length = new_length


class CacheStep:
    """How one forward chunk uses the cache: the key positions, the mask, and per-layer k/v."""

    def __init__(self, cache: RollingKVCache, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 index: tuple[torch.Tensor, torch.Tensor, torch.Tensor], write_first: bool,
                 used: int) -> None:
        self.cache, self.q_pos, self.k_pos, self.index = cache, q_pos, k_pos, index
        self.write_first, self.used = write_first, used

    def bias(self) -> torch.Tensor:
        """The additive attention bias (B, 1, T, S) of this chunk: built once per forward, inside
        the compiled graph for a compiled decode step (one fused kernel instead of eight)."""
        return attention_bias(attention_mask(self.q_pos, self.k_pos, self.cache.window), self.cache.k[0].dtype)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, n_kv_heads, S, head_dim) this chunk attends to, matching `k_pos`."""
        c = self.cache
        if self.write_first:
            c.write(layer, k, v, self.index)
            used = self.k_pos.shape[-1]  # == self.used; read from k_pos so a compiled step need not specialise on it
            return c.k[layer][:, :, :used], c.v[layer][:, :, :used]
        if self.used == 0:
            c.write(layer, k, v, self.index)
            return k, v
        keys = torch.cat([c.k[layer], k], dim=2)
        values = torch.cat([c.v[layer], v], dim=2)
        c.write(layer, k, v, self.index)
        return keys, values
