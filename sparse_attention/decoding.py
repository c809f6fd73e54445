"""Decoding with a bounded KV cache: the past keys a pattern can still use, kept in a ring, and one step of
attention over them.

A query of a local pattern sees only a global prefix and its last few keys (`Pattern.key_extent()`): keys
[0, first) and the last `recent`. A cache of first + recent slots holds them: position p < first sits in
slot p for good, later positions cycle through a ring of `recent` slots. Patterns with no bound keep every
position (a cache as long as the sequence, rounded up to a multiple of 1,024 slots). The slots carry their
positions, and each step masks them with the pattern's own `mask`, so what a decoding step attends is exactly
what the full pass attends.

    layout = CacheLayout.for_pattern(parse("repaired(512, 64, prefix)"), max_len=1_000_000)   # 576 slots
    cache = KVCache.empty(layout, batch, kv_heads, head_dim, jnp.bfloat16).fill(k_prompt, v_prompt)
    cache = cache.write(k_new, v_new, position)
    out = decode_attention(q_new, cache, position, pattern)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.patterns import Pattern

# A cache that keeps every position has its slots rounded up to a multiple of this: on the H200, XLA split the
# contracting dimension of dense decoding's weights-times-values product and padded the whole cache to do it
# (a copy of every layer's values per step) when the slot count was 131,136 = 64 x 2,049 or 32,832, and not at
# 132,096 or 33,792 (multiples of 1,024): 1.225 against 1.775 ms per step at 128k (docs/benchmarks.md).
UNBOUNDED_SLOT_MULTIPLE = 1024


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Slots of a decoding cache: positions < first in slot p; later ones in slot first + (p - first) % ring.

    A ring of 0 means every position below max_len has its own slot: first is max_len, rounded up to a
    multiple of UNBOUNDED_SLOT_MULTIPLE beyond it; the slots past max_len stay empty.
    """

    first: int
    ring: int
    max_len: int

    @classmethod
    def for_pattern(cls, pattern: Pattern, max_len: int) -> "CacheLayout":
        """The smallest layout that holds what `pattern` lets any query below max_len see (one that keeps
        every position rounded up as above)."""
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if pattern.block_selection() is not None:
            raise ValueError(f"pattern: {pattern.spec} chooses blocks by content, which decoding does not support "
                             f"yet")
        extent = pattern.key_extent()
        size = extent.size()
        if size is None or size >= max_len:
            multiple = UNBOUNDED_SLOT_MULTIPLE if max_len > UNBOUNDED_SLOT_MULTIPLE else 1
            return cls(first=-(-max_len // multiple) * multiple, ring=0, max_len=max_len)
        return cls(first=extent.first, ring=extent.recent, max_len=max_len)

    @property
    def slots(self) -> int:
        return self.first + self.ring

    @property
    def bounded(self) -> bool:
        """Whether the cache is smaller than the sequence (a ring)."""
        return self.ring > 0

    def kept(self, length: int) -> np.ndarray:
        """The positions still held once positions 0 .. length - 1 are written, int64 [<= slots]: the global
        prefix and the last `ring` after it (each slot keeps its last writer)."""
        if length > self.max_len:
            raise ValueError(f"prompt: {length} positions do not fit a cache of max_len {self.max_len}")
        positions = np.arange(length)
        return positions[(positions < self.first) | (positions >= length - self.ring)]

    def slot(self, positions):
        """Slot of each position (NumPy or traced int arrays)."""
        if not self.ring:
            return positions
        xp = np if isinstance(positions, (np.ndarray, np.generic, int)) else jnp
        return xp.where(positions < self.first, positions, self.first + (positions - self.first) % self.ring)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's cache. k, v: [batch, slots, kv_heads, head_dim]; positions int32 [slots], -1 where empty."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    layout: CacheLayout = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def empty(cls, layout: CacheLayout, batch: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, layout.slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((layout.slots,), -1, jnp.int32),
                   layout)

    def fill(self, k, v) -> "KVCache":
        """The cache after the prompt's keys and values k, v [batch, prompt, kv_heads, head_dim] at positions
        0 .. prompt - 1 (an empty cache; the prompt length is static)."""
        kept = self.layout.kept(k.shape[1])
        slots = self.layout.slot(kept)
        return dataclasses.replace(
            self, k=self.k.at[:, slots].set(k[:, kept].astype(self.k.dtype)),
            v=self.v.at[:, slots].set(v[:, kept].astype(self.v.dtype)),
            positions=self.positions.at[slots].set(jnp.asarray(kept, jnp.int32)))

    def write(self, k, v, position) -> "KVCache":
        """The cache with one new position's k, v [batch, 1, kv_heads, head_dim] (position: traced int)."""
        slot = self.layout.slot(jnp.asarray(position, jnp.int32))
        return dataclasses.replace(
            self, k=jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), slot, axis=1),
            v=jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), slot, axis=1),
            positions=self.positions.at[slot].set(jnp.asarray(position, jnp.int32)))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.positions.nbytes


def decode_attention(q, cache: KVCache, position, pattern: Pattern, *, scale: float | None = None):
    """Attention of the query at `position`, q [batch, 1, heads, head_dim], over the cache (which holds the
    position's own key already) -> [batch, 1, heads, head_dim]. Softmax in float32; heads share kv heads in
    groups of heads // kv_heads (GQA)."""
    batch, _, heads, head_dim = q.shape
    kv_heads = cache.k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of the cache's kv heads ({kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bhgd,bshd->bhgs", grouped, cache.k, preferred_element_type=jnp.float32) * scale
    position = jnp.asarray(position, jnp.int32)
    visible = (cache.positions >= 0) & pattern.mask(position, cache.positions)  # [slots]
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgs,bshd->bhgd", weights.astype(cache.v.dtype), cache.v, preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
