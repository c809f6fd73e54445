"""Blockwise sparse attention in plain JAX: computes only the active tiles of the block layout.

Each query tile gathers its active key tiles (full and partial, padded to the widest row) and takes a
softmax over them. Memory is O(seq_len x active keys), not O(seq_len^2). Runs on every backend; the
CPU default under `impl="auto"`. Gradients come from autodiff (the gather transposes to a scatter-add).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.layout import block_layout
from sparse_attention.patterns import Pattern
from sparse_attention.reference import masked_softmax

DEFAULT_TILE = 128


def attention(q, k, v, pattern: Pattern, *, scale: float, interpret: bool = False, tile: int = DEFAULT_TILE,
              selected=None):
    """`selected` (int32 [batch, kv_heads, query blocks, K], -1: none; `selection.select_blocks`): the blocks a
    `topk` pattern chose, attended beside the layout's tiles of the static part, which `pattern.mask` is."""
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
    logits = logits.reshape(*logits.shape[:-2], slots * tile)  # [batch, num_tiles, kv_heads, group, tile, keys]
    mask = jnp.broadcast_to(mask.reshape(1, num_tiles, 1, 1, tile, slots * tile), (batch, num_tiles, kv_heads, 1,
                                                                                     tile, slots * tile))
    # (values, einsum, keys): the static tiles' values, then the chosen blocks' (one softmax over both).
    values = [(v_gathered.reshape(batch, num_tiles, slots * tile, kv_heads, head_dim), "bnhgqk,bnkhd->bnqhgd",
               slots * tile)]
    if selected is not None:
        chosen_logits, chosen_mask, chosen_values = _chosen_blocks(q_tiles, k, v, pattern, selected, tile, scale)
        logits = jnp.concatenate([logits, chosen_logits], axis=-1)
        mask = jnp.concatenate([mask, jnp.broadcast_to(chosen_mask, chosen_logits.shape[:3] + (1,)
                                                       + chosen_logits.shape[4:])], axis=-1)
        values.append((chosen_values, "bnhgqk,bhnkd->bnqhgd", chosen_values.shape[3]))
    probs = masked_softmax(logits, mask)
    out, start = 0.0, 0
    for value, subscripts, width in values:
        out = out + jnp.einsum(subscripts, probs[..., start:start + width].astype(v.dtype), value,
                               preferred_element_type=jnp.float32)
        start += width
    out = out.reshape(batch, padded_len, q_heads, head_dim)[:, :seq_len]
    return out.astype(q.dtype)


def _chosen_blocks(q_tiles, k, v, pattern: Pattern, selected, tile: int, scale: float):
    """(logits [batch, num_tiles, kv_heads, group, tile, keys], mask broadcastable to them, values [batch,
    kv_heads, num_tiles, keys, d]) over the blocks chosen by each query tile's query blocks. A key the static
    part attends already is masked here, so no pair is counted twice."""
    batch, num_tiles, _, kv_heads, group, head_dim = q_tiles.shape
    seq_len = k.shape[1]
    size = pattern.block_selection().size
    blocks = -(-seq_len // size)
    # [num_tiles, width]: the query blocks each query tile holds; a tile that holds fewer repeats its last, and
    # the repeats are not used (their keys would count twice).
    first = np.arange(num_tiles) * tile // size
    last = (np.minimum((np.arange(num_tiles) + 1) * tile, seq_len) - 1) // size
    width = int((last - first).max()) + 1
    tile_blocks = np.minimum(first[:, None] + np.arange(width), last[:, None])
    count = selected.shape[-1]
    chosen = selected[:, :, tile_blocks].reshape(batch, kv_heads, num_tiles, width * count)  # block ids, -1: none
    chosen = jnp.where(np.repeat(first[:, None] + np.arange(width) <= last[:, None], count, axis=1), chosen, -1)
    source = np.repeat(tile_blocks, count, axis=1)  # [num_tiles, width * count]: the query block that chose each

    def block_rows(x):  # [batch, seq, kv_heads, d] -> [batch, kv_heads, blocks, size, d]
        x = jnp.pad(x, ((0, 0), (0, blocks * size - seq_len), (0, 0), (0, 0)))
        return x.reshape(batch, blocks, size, kv_heads, head_dim).transpose(0, 3, 1, 2, 4)

    safe = jnp.maximum(chosen, 0)
    take = jax.vmap(jax.vmap(lambda rows, ids: rows[ids]))  # over batch and kv heads
    k_chosen = take(block_rows(k), safe).reshape(batch, kv_heads, num_tiles, width * count * size, head_dim)
    v_chosen = take(block_rows(v), safe).reshape(batch, kv_heads, num_tiles, width * count * size, head_dim)
    logits = jnp.einsum("bnqhgd,bhnkd->bnhgqk", q_tiles, k_chosen, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    q_pos = jnp.arange(num_tiles * tile, dtype=jnp.int32).reshape(num_tiles, tile)
    k_pos = safe[..., None] * size + jnp.arange(size, dtype=jnp.int32)  # [batch, kv_heads, num_tiles, slots, size]
    in_block = (q_pos[:, :, None] // size) == jnp.asarray(source, jnp.int32)[:, None, :]  # [num_tiles, tile, slots]
    mask = ((chosen >= 0)[..., None, :, None] & in_block[None, None, :, :, :, None]
            & ~pattern.mask(q_pos[None, None, :, :, None, None], k_pos[:, :, :, None, :, :])
            & (k_pos < seq_len)[:, :, :, None, :, :])  # [batch, kv_heads, num_tiles, tile, slots, size]
    mask = mask.reshape(batch, kv_heads, num_tiles, tile, width * count * size).transpose(0, 2, 1, 3, 4)
    return logits, mask[:, :, :, None], v_chosen
