"""Decoding caches: layouts from each pattern's key extent, the ring keeping exactly the keys a query can see,
and one decoding step equal to the reference's row of attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention import reference
from sparse_attention.decoding import CacheLayout, KVCache, decode_attention
from sparse_attention.patterns import parse

SPECS = ("dense", "block(8)", "block(8, 3)", "window(5)", "repaired(8, 2, bridge)", "repaired(8, 3, prefix)",
         "sinks(3) | window(4)", "strided(3)", "dilated(3, 2)", "random_blocks(8, 1, 5) | block(8)",
         "block(8) & window(6)")


@pytest.mark.parametrize("spec, max_len, first, ring", [
    ("block(8)", 100, 0, 8), ("repaired(8, 3, prefix)", 100, 0, 11), ("sinks(3) | window(4)", 100, 3, 4),
    ("dense", 100, 100, 0), ("block(8)", 6, 6, 0), ("strided(3)", 50, 50, 0),
    # every position kept: slots rounded up to a multiple of 1,024 beyond it
    ("dense", 1024, 1024, 0), ("dense", 1025, 2048, 0), ("dense", 131_136, 132_096, 0), ("window(4000)", 3000, 3072, 0),
])
def test_layouts_follow_the_key_extent(spec, max_len, first, ring):
    layout = CacheLayout.for_pattern(parse(spec), max_len)
    assert (layout.first, layout.ring, layout.slots) == (first, ring, first + ring)


def test_ring_slots_cycle_after_the_global_prefix():
    layout = CacheLayout(first=3, ring=4, max_len=100)
    assert layout.slot(np.arange(12)).tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]
    assert int(layout.slot(jnp.int32(11))) == 3


@pytest.mark.parametrize("prompt", [1, 5, 11, 30])
def test_fill_keeps_what_writing_one_position_at_a_time_keeps(prompt):
    layout = CacheLayout.for_pattern(parse("sinks(2) | window(5)"), 64)
    k, v = jax.random.normal(jax.random.key(0), (2, 2, prompt, 3, 4))
    filled = KVCache.empty(layout, 2, 3, 4, jnp.float32).fill(k, v)
    written = KVCache.empty(layout, 2, 3, 4, jnp.float32)
    for position in range(prompt):
        written = written.write(k[:, position:position + 1], v[:, position:position + 1], jnp.int32(position))
    for a, b in zip(jax.tree.leaves(filled), jax.tree.leaves(written)):
        np.testing.assert_array_equal(a, b)
    held = sorted(int(p) for p in filled.positions if p >= 0)
    assert held == sorted(set(range(min(prompt, 2))) | set(range(max(prompt - 5, 0), prompt)))


def test_a_prompt_longer_than_the_cache_is_refused():
    layout = CacheLayout.for_pattern(parse("dense"), 8)
    k = jnp.zeros((1, 9, 1, 2))
    with pytest.raises(ValueError, match="prompt: 9 positions do not fit a cache of max_len 8"):
        KVCache.empty(layout, 1, 1, 2, jnp.float32).fill(k, k)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_each_step_equals_the_reference_row(spec, heads, kv_heads):
    """Written one position at a time, across many block edges, every step attends exactly what the full
    masked softmax attends at that row."""
    seq_len, head_dim = 45, 8
    pattern = parse(spec)
    kq, kk, kv = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    q = jax.random.normal(kq, (2, seq_len, heads, head_dim))
    k = jax.random.normal(kk, (2, seq_len, kv_heads, head_dim))
    v = jax.random.normal(kv, (2, seq_len, kv_heads, head_dim))
    positions = np.arange(seq_len)
    mask = np.broadcast_to(pattern.mask(positions[:, None], positions[None, :]), (seq_len, seq_len))
    expected = reference.masked_attention(q, k, v, jnp.asarray(mask), scale=1 / math.sqrt(head_dim))
    cache = KVCache.empty(CacheLayout.for_pattern(pattern, seq_len), 2, kv_heads, head_dim, jnp.float32)
    write = jax.jit(KVCache.write)
    attend = jax.jit(lambda q, cache, t: decode_attention(q, cache, t, pattern))
    for t in range(seq_len):
        cache = write(cache, k[:, t:t + 1], v[:, t:t + 1], jnp.int32(t))
        got = attend(q[:, t:t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(got[:, 0], expected[:, t], atol=2e-5, rtol=2e-5)
