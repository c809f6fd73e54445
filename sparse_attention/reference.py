"""Dense masked softmax attention: the test oracle for every implementation.

Every implementation module has this signature:
    attention(q, k, v, pattern, *, scale, interpret=False) -> out
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; kv_heads divides q_heads.
A query that sees no key (possible for intersections such as sinks(4) & window(2)) gets a zero output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention.patterns import Pattern
from sparse_attention.selection import selection_mask


def attention(q, k, v, pattern: Pattern, *, scale: float, interpret: bool = False, selected=None):
    """`selected`: the blocks a `topk` pattern chose (`selection.select_blocks`), seen beside `pattern.mask`."""
    del interpret  # nothing to interpret: plain XLA
    positions = jnp.arange(q.shape[1], dtype=jnp.int32)
    mask = pattern.mask(positions[:, None], positions[None, :])
    if selected is not None:
        size = pattern.block_selection().size
        mask = (mask | selection_mask(selected, size, q.shape[1]))[:, :, None]  # [batch, kv_heads, 1, seq, seq]
    return masked_attention(q, k, v, mask, scale=scale)


def masked_attention(q, k, v, mask, *, scale: float):
    """Attention under an explicit mask (True: the query sees the key), bool [seq_q, seq_k] or any shape that
    broadcasts against [batch, kv_heads, group, seq_q, seq_k]; other shapes as `attention`. The mask is
    data, so one compiled function serves every pattern (and vmaps over masks)."""
    batch, seq_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # [batch, seq, kv_heads, group, head_dim]: the q heads that share one kv head.
    q_grouped = q.reshape(batch, seq_len, kv_heads, q_heads // kv_heads, head_dim)
    logits = jnp.einsum(
        "bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=jnp.float32, precision="highest"
    ) * jnp.float32(scale)
    probs = masked_softmax(logits, mask)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32), precision="highest"
    )
    return out.reshape(batch, seq_len, q_heads, head_dim).astype(q.dtype)


def masked_softmax(logits, mask):
    """Softmax over the last axis where `mask`, float32; rows with no True entry give zeros."""
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnormalized = jnp.where(mask, jnp.exp(masked - row_max), 0.0)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total > 0, total, 1.0)
