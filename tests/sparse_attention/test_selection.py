"""topk(B, K): the block choice against a NumPy oracle, and attention over the chosen blocks (xla against the
reference, forward and gradients) through the dispatch, under jit, vmap and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attention import attention, reachability, reference, xla
from sparse_attention.decoding import CacheLayout
from sparse_attention.patterns import Block, KeyExtent, parse
from sparse_attention.selection import block_means, select_blocks, selection_mask


def oracle_selection(q, k, size, count):
    """select_blocks in NumPy, loop by loop."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, seq_len, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    blocks = -(-seq_len // size)
    chosen = np.full((batch, kv_heads, blocks, count), -1)
    for b in range(batch):
        for h in range(kv_heads):
            for i in range(blocks):
                q_mean = q[b, i * size:(i + 1) * size, h * group:(h + 1) * group].mean(axis=(0, 1))
                scores = [q_mean @ k[b, j * size:(j + 1) * size, h].mean(axis=0) for j in range(i)]
                order = sorted(range(i), key=lambda j: (-scores[j], j))[:count]
                chosen[b, h, i, :len(order)] = order
    return chosen


@settings(max_examples=30, deadline=None)
@given(seq_len=st.integers(1, 70), size=st.integers(1, 16), count=st.integers(1, 5),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), seed=st.integers(0, 2**16))
def test_selection_matches_the_numpy_oracle(seq_len, size, count, heads, seed):
    q_heads, kv_heads = heads
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (2, seq_len, q_heads, 4))
    k = jax.random.normal(kk, (2, seq_len, kv_heads, 4))
    np.testing.assert_array_equal(select_blocks(q, k, size, count), oracle_selection(q, k, size, count))


def test_block_means_of_a_partial_last_block_count_its_real_positions():
    x = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1, 1)
    assert block_means(x, 4)[0, :, 0, 0].tolist() == [1.5, 5.5, 8.5]


def test_selection_mask_sees_exactly_the_chosen_blocks():
    selected = jnp.array([[[[-1], [0], [0]]]])  # block 1 and block 2 both chose block 0
    mask = np.asarray(selection_mask(selected, 2, 6))[0, 0]
    expected = np.zeros((6, 6), bool)
    expected[2:6, 0:2] = True
    np.testing.assert_array_equal(mask, expected)


SPECS = ("topk(16, 2)", "topk(16, 2) | repaired(16, 3, prefix)", "topk(64, 1) | window(8)", "topk(8, 3) | sinks(2)",
         "topk(32, 2) | block(32, 16)")


def inputs(seq_len, q_heads, kv_heads, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((2, seq_len, q_heads, 16), (2, seq_len, kv_heads, 16), (2, seq_len, kv_heads, 16))
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


# (spec, seq_len, tile, (q_heads, kv_heads)): tiles wider and narrower than the block, unaligned lengths, GQA.
CASES = [(spec, seq_len, tile, heads) for spec, (seq_len, tile, heads) in zip(
    SPECS * 2, [(100, 32, (2, 2)), (96, 16, (4, 1)), (130, 128, (2, 2)), (37, 8, (4, 1)), (100, 32, (4, 2)),
                (37, 8, (2, 2)), (130, 128, (4, 1)), (100, 32, (2, 1)), (96, 16, (2, 2)), (130, 32, (4, 2))])]


@pytest.mark.parametrize("spec, seq_len, tile, heads", CASES)
def test_xla_over_the_chosen_blocks_matches_the_reference(spec, seq_len, tile, heads):
    pattern = parse(spec)
    q, k, v = inputs(seq_len, *heads, jnp.float32, np.random.randint(1 << 30))
    topk = pattern.block_selection()
    selected = select_blocks(q, k, topk.size, topk.count)

    def loss(impl, q, k, v):
        out = impl(q, k, v, pattern, scale=0.25, selected=selected)
        return jnp.sum(out * jnp.cos(out)), out

    (_, expected), expected_grads = jax.value_and_grad(
        lambda *a: loss(reference.attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, got), grads = jax.value_and_grad(lambda *a: loss(lambda *b, **c: xla.attention(*b, tile=tile, **c), *a),
                                         argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=5e-5, rtol=5e-5)


def test_bfloat16_over_the_chosen_blocks():
    q, k, v = inputs(130, 4, 2, jnp.bfloat16, 3)
    pattern = parse("topk(16, 2) | repaired(16, 3, bridge)")
    selected = select_blocks(q, k, 16, 2)
    got = xla.attention(q, k, v, pattern, scale=0.25, selected=selected)
    expected = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), pattern, scale=0.25,
                                   selected=selected)
    np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=3e-2)


def test_the_dispatch_chooses_under_jit_vmap_and_grad_without_differentiating_the_choice():
    q, k, v = inputs(64, 2, 1, jnp.float32, 5)
    spec = "topk(16, 1)"

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, spec) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    # The same gradients with the choice held fixed: the selection contributes none of its own.
    selected = select_blocks(q, k, 16, 1)
    fixed = jax.grad(lambda q, k, v: jnp.sum(reference.attention(q, k, v, parse(spec), scale=0.25,
                                                                 selected=selected) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, fixed):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5)
    per_row = jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None], spec)[0])(q, k, v)
    np.testing.assert_allclose(per_row, attention(q, k, v, spec), atol=1e-6)
    # A chosen block's keys change the output: topk(16, 1) is not block(16).
    assert float(jnp.abs(attention(q, k, v, spec) - attention(q, k, v, "block(16)")).max()) > 1e-3


def test_topk_pattern_rules():
    pattern = parse("topk(64, 4) | repaired(64, 8, bridge)")
    assert pattern.block_selection() == parse("topk(64, 4)") and pattern.block_grid() == (64, 0)
    assert parse("block(64)").block_selection() is None
    # The static part is block(B): what the pattern guarantees, and what reachability counts.
    positions = np.arange(200)
    np.testing.assert_array_equal(parse("topk(64, 4)").mask(positions[:, None], positions[None, :]),
                                  Block(64).mask(positions[:, None], positions[None, :]))
    assert reachability.reachable("topk(64, 4) | repaired(64, 8, bridge)", 256, 2, 100, 60)
    assert parse("topk(64, 4) | window(8)").key_extent() == KeyExtent(0, None)
    for spec, message in [("topk(64, 4) & window(8)", "combines with other patterns by \\| only"),
                          ("topk(64, 4) | topk(32, 1)", "at most one topk"), ("topk(64, 0)", "K must be a positive")]:
        with pytest.raises(ValueError, match=message):
            parse(spec)
    with pytest.raises(ValueError, match="pattern: topk\\(64, 4\\) chooses blocks by content, which decoding"):
        CacheLayout.for_pattern(parse("topk(64, 4)"), 1024)
