"""Blockwise sparse attention in plain JAX: computes only the active tiles of the block layout.

Each query tile gathers its active key tiles (full and partial, padded to the widest row) and takes a
softmax over them. Memory is O(seq_len x active keys), not O(seq_len^2). Runs on every backend; the
CPU default under `impl="auto"`. Gradients come from autodiff (the gather transposes to a scatter-add).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sparse_attention.layout import block_layout
from sparse_attention.patterns import Pattern
from sparse_attention.reference import masked_softmax

DEFAULT_TILE = 128


def attention(q, k, v, pattern: Pattern, *, scale: float, interpret: bool = False, tile: int = DEFAULT_TILE):
    del interpret  # nothing to interpret: plain XLA
    batch, seq_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    tile = min(tile, seq_len)
    layout = block_layout(pattern, seq_len, tile, tile)
    num_tiles = layout.num_q_tiles
    padded_len = num_tiles * tile

    full, num_full, partial, num_partial = layout.forward.padded
    # [num_tiles, slots]: every active key tile of each query tile, and which slots are real.
    key_tiles = np.concatenate([full, partial], axis=1)
    slot_valid = np.concatenate(
        [np.arange(full.shape[1]) < num_full[:, None], np.arange(partial.shape[1]) < num_partial[:, None]], axis=1
    )

    def tiles(x):  # [batch, seq, heads, d] -> [batch, num_tiles, tile, heads, d]
        x = jnp.pad(x, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)))
        return x.reshape(batch, num_tiles, tile, x.shape[2], head_dim)

    q_tiles = tiles(q).reshape(batch, num_tiles, tile, kv_heads, group, head_dim)
    k_gathered = tiles(k)[:, key_tiles]  # [batch, num_tiles, slots, tile, kv_heads, d]
    v_gathered = tiles(v)[:, key_tiles]

    logits = jnp.einsum(
        "bnqhgd,bnskhd->bnhgqsk", q_tiles, k_gathered, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    q_pos = jnp.arange(padded_len, dtype=jnp.int32).reshape(num_tiles, tile)
    k_pos = jnp.asarray(key_tiles, jnp.int32)[:, :, None] * tile + jnp.arange(tile, dtype=jnp.int32)
    # Padded keys (k >= seq_len) come after every real query, so causality in the mask already drops them.
    mask = (
        pattern.mask(q_pos[:, :, None, None], k_pos[:, None, :, :]) & jnp.asarray(slot_valid)[:, None, :, None]
    )  # [num_tiles, tile_q, slots, tile_k]
    slots = key_tiles.shape[1]
    probs = masked_softmax(
        logits.reshape(*logits.shape[:-2], slots * tile), mask.reshape(num_tiles, 1, 1, tile, slots * tile)
    ).reshape(logits.shape)
    out = jnp.einsum(
        "bnhgqsk,bnskhd->bnqhgd", probs.astype(v.dtype), v_gathered, preferred_element_type=jnp.float32
    )
    out = out.reshape(batch, padded_len, q_heads, head_dim)[:, :seq_len]
    return out.astype(q.dtype)
