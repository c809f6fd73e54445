"""Learned block selection for `topk(B, K)` patterns: which earlier key blocks each query block attends.

For each batch row, KV head and query block of B positions: the queries of the block (and of every query
head that shares the KV head) are averaged into one vector, each earlier key block's keys into another,
and the K earlier blocks with the highest dot product are chosen (MoBA's gate at block granularity). The
own block is always attended, causally, by the static part. The choice is made with jnp ops on the device
at every call and is not differentiated (as in MoBA); the attention over the chosen blocks is.

    selected = select_blocks(q, k, size=512, count=4)   # int32 [batch, kv_heads, query blocks, 4], -1: none
    allowed = selection_mask(selected, size=512, seq_len=q.shape[1])   # bool [batch, kv_heads, seq, seq]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_means(x, size: int):
    """x [batch, seq, heads, d] -> float32 [batch, blocks, heads, d]: the mean over each block's positions (the
    last block's real positions only)."""
    batch, seq_len, heads, dim = x.shape
    blocks = -(-seq_len // size)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, blocks * size - seq_len), (0, 0), (0, 0)))
    sums = padded.reshape(batch, blocks, size, heads, dim).sum(axis=2)
    counts = jnp.minimum(size, seq_len - jnp.arange(blocks) * size).astype(jnp.float32)
    return sums / counts[None, :, None, None]


def select_blocks(q, k, size: int, count: int):
    """The `count` earlier key blocks that score highest for each query block, int32 [batch, kv_heads,
    query_blocks, count] in order of score, -1 where fewer than `count` earlier blocks exist.

    q [batch, seq, q_heads, d], k [batch, seq, kv_heads, d]; the q heads of a KV group share its choice (their
    means are averaged), so a kernel reads each chosen K/V tile once for the group. Ties go to the earlier
    block."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    batch, _, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    q_means = block_means(q, size).reshape(batch, -1, kv_heads, q_heads // kv_heads, dim).mean(axis=3)
    k_means = block_means(k, size)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_means, k_means, precision="highest")  # [b, kv_heads, blocks, blocks]
    blocks = scores.shape[-1]
    earlier = jnp.arange(blocks)[None, :] < jnp.arange(blocks)[:, None]
    scores = jnp.where(earlier, scores, -jnp.inf)
    top_scores, chosen = jax.lax.top_k(scores, min(count, blocks))
    chosen = jnp.where(jnp.isfinite(top_scores), chosen, -1).astype(jnp.int32)
    if count > blocks:
        chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, count - blocks)), constant_values=-1)
    return chosen


def selection_mask(selected, size: int, seq_len: int):
    """bool [batch, kv_heads, seq, seq]: whether query q sees key k through the chosen blocks of q's block."""
    positions = jnp.arange(seq_len)
    per_query = selected[:, :, positions // size]  # [batch, kv_heads, seq, count]
    return (per_query[..., None, :] == (positions // size)[None, None, None, :, None]).any(axis=-1)
