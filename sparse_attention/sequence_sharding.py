"""Attention over a sequence split across devices: inside `shard_map`, each device holds one contiguous shard
of queries, keys and values, and receives from its left neighbour only the keys its queries can see.

A local pattern (`Pattern.key_extent()` bounded, no global prefix) needs, before a shard, at most recent - 1
keys: bridge R, prefix B - 1 + R, window W - 1, block B - 1. That halo, rounded up to the pattern's period
(the lcm of its block sizes, so that block edges fall where they fall globally), comes from the left
neighbour through one `ppermute` of k and v; the shard then runs the same attention on [halo + own] keys, its
queries placed after the halo. The backward pass of `ppermute` sends the halo's gradients back. The first
shard has no left neighbour and attends its own keys only. Patterns with unbounded reach (dense, strided,
sinks, random_blocks, topk) all-gather q, k and v, attend the whole sequence and keep their shard's rows.

    out = jax.shard_map(lambda q, k, v: sharded_attention(q, k, v, "repaired(512, 64, bridge)", axis_name="seq"),
                        mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))(q, k, v)

`plan(pattern, shard_len, shards)` says which ran and what each device sends.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.attention import attention
from sparse_attention.patterns import Intersection, Pattern, Union_, as_pattern

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How one layer's attention runs over `shards` shards of `shard_len` positions.

    method:  "halo" (keys from the left neighbour; `halo` of them, 0 for block patterns whose edges fall on
             shard edges) or "all_gather"
    window:  the halo rounded up to the pattern's period: the keys before a shard that its attention runs
             over (the ones not sent are zeros that no real query attends)
    """

    pattern: str
    shard_len: int
    shards: int
    method: str
    halo: int
    window: int

    def sent_bytes(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Bytes one device sends in a forward pass (its backward sends as many): the halo's k and v, or its
        shard of q, k and v passed on to each other device."""
        if self.method == "halo":
            return 2 * self.halo * batch * kv_heads * head_dim * itemsize
        return (self.shards - 1) * self.shard_len * batch * (q_heads + 2 * kv_heads) * head_dim * itemsize


def period(pattern: Pattern) -> int | None:
    """The shift that leaves the pattern's mask unchanged away from the sequence start: 1 for patterns of
    q - k alone, the block size of a blocky kind, the lcm over the parts of a union or intersection; None
    when there is none to rely on."""
    if pattern.offsets(1) is not None:
        return 1
    if isinstance(pattern, (Union_, Intersection)):
        periods = [period(part) for part in pattern.parts]
        return None if None in periods else math.lcm(*periods)
    grid = pattern.block_grid()
    return None if grid is None else grid[0]


def plan(pattern: Pattern | str, shard_len: int, shards: int) -> ShardPlan:
    """The method and halo for a sequence of shards x shard_len positions; ValueError naming the field when
    the shard length does not hold whole periods of the pattern, or its halo is longer than a shard."""
    pattern = as_pattern(pattern)
    extent = pattern.key_extent()
    repeat = period(pattern)
    if extent.recent is None or extent.first > 0 or pattern.block_selection() is not None or repeat is None:
        return ShardPlan(pattern.spec, shard_len, shards, "all_gather", 0, 0)
    if shard_len % repeat:
        raise ValueError(f"mesh.seq: a shard of {shard_len} positions must be a multiple of {repeat} (the block "
                         f"of {pattern.spec}), so that block edges fall where they fall in the whole sequence")
    interval = pattern.row_interval()
    # The earliest key a shard's queries see, relative to its start (a later shard's: the first block has none
    # of the previous block's keys to see); without row intervals, the extent's bound.
    halo = shard_len - int(interval[0](np.array([shard_len]))[0]) if interval else extent.recent - 1
    if halo > shard_len:
        raise ValueError(f"mesh.seq: {pattern.spec} needs a halo of {halo} keys, longer than a shard of {shard_len}"
                         f" positions; use fewer sequence shards")
    return ShardPlan(pattern.spec, shard_len, shards, "halo", max(halo, 0), -(-max(halo, 0) // repeat) * repeat)


@functools.lru_cache(maxsize=None)
def _log_plan(sharded: ShardPlan) -> None:
    how = (f"a halo of {sharded.halo} keys from the left neighbour" if sharded.method == "halo"
           else "an all-gather of q, k and v")
    log.info("sequence-sharded attention of %s over %d shards of %d: %s", sharded.pattern, sharded.shards,
             sharded.shard_len, how)


def sharded_attention(q, k, v, pattern: Pattern | str, *, axis_name: str, impl: str = "auto",
                      scale: float | None = None, interpret: bool = False):
    """This device's shard of causal sparse attention, inside shard_map over `axis_name`: q [batch, L,
    q_heads, d] and k, v [batch, L, kv_heads, d] are shard i (positions i * L .. (i + 1) * L - 1) of the
    sequence; returns that shard of the output."""
    pattern = as_pattern(pattern)
    shards = jax.lax.axis_size(axis_name)
    shard_len = q.shape[1]
    sharded = plan(pattern, shard_len, shards)
    _log_plan(sharded)
    attend = functools.partial(attention, pattern=pattern, impl=impl, scale=scale, interpret=interpret)
    index = jax.lax.axis_index(axis_name)
    if sharded.method == "all_gather":
        full = [jax.lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (q, k, v)]
        return jax.lax.dynamic_slice_in_dim(attend(*full), index * shard_len, shard_len, axis=1)
    if sharded.halo == 0 or shards == 1:
        return attend(q, k, v)
    halo, window = sharded.halo, sharded.window
    to_right = [(i, i + 1) for i in range(shards - 1)]

    def before(x):
        """The window of keys before this shard: zeros, then the halo from the left neighbour."""
        received = jax.lax.ppermute(x[:, shard_len - halo:], axis_name, to_right)
        return jnp.concatenate([jnp.zeros((x.shape[0], window - halo) + x.shape[2:], x.dtype), received], axis=1)

    k_before, v_before = before(k), before(v)

    def with_halo():
        # Queries after the window; its query rows are zeros whose outputs are dropped.
        q_ext = jnp.concatenate([jnp.zeros((q.shape[0], window) + q.shape[2:], q.dtype), q], axis=1)
        out = attend(q_ext, jnp.concatenate([k_before, k], axis=1), jnp.concatenate([v_before, v], axis=1))
        return out[:, window:]

    # The first shard has no left neighbour: its own keys are all its queries see.
    return jax.lax.cond(index == 0, lambda: attend(q, k, v), with_halo)
