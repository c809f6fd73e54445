"""Shared by the kernel test files: fresh random inputs, one jitted forward + VJP, the error measure, the
comparison with the reference, the check that a kernel's tile plan covers the pattern, and the cases every
backend runs on real hardware."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention import reference
from sparse_attention.patterns import parse

# (spec, seq_len, head_dim) that every backend's hardware test class runs with its default tiles: each kind
# of pattern at real sizes, lengths that are not multiples of the tiles, head_dim 64 and 128.
HARDWARE_CASES = [
    ("dense", 2048, 128),
    ("block(512)", 4096, 128),
    ("block(512, 256)", 2048, 64),
    ("window(1024)", 4000, 128),
    ("repaired(512, 64, bridge)", 4096, 128),
    ("repaired(512, 64, prefix)", 3000, 64),
    ("strided(64)", 1024, 64),
    ("dilated(128, 8)", 2048, 128),
    ("sinks(16)", 1500, 64),
    ("sinks(4) & window(2)", 1024, 64),
    ("random_blocks(256, 2, 5)", 4096, 64),
    ("window(1024) | sinks(16)", 2500, 128),
    ("block(512) & strided(3)", 2048, 64),
    ("repaired(512, 64, bridge) | strided(256)", 4096, 128),
]


def random_inputs(seed, batch, seq_len, heads, kv_heads, head_dim, dtype):
    """(q, k, v, d_out), normal, from their own key."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape, kv_shape = (batch, seq_len, heads, head_dim), (batch, seq_len, kv_heads, head_dim)
    return (jax.random.normal(keys[0], q_shape, dtype), jax.random.normal(keys[1], kv_shape, dtype),
            jax.random.normal(keys[2], kv_shape, dtype), jax.random.normal(keys[3], q_shape, dtype))


def output_and_grads(attend, q, k, v, d_out):
    """(out, dq, dk, dv) of one jitted forward + VJP."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)(q, k, v, d_out)


def random_selection(seed, batch, kv_heads, blocks, count):
    """A device layout a `topk(B, count)` choice could give: for every (batch, kv head, query block), up to
    `count` distinct earlier blocks in any order, -1 in the slots left over. int32 [batch, kv_heads, blocks,
    count]."""
    rng = np.random.default_rng(seed)
    chosen = np.full((batch, kv_heads, blocks, count), -1, np.int32)
    for b, h, i in np.ndindex(batch, kv_heads, blocks):
        n = rng.integers(0, min(count, i) + 1)
        chosen[b, h, i, :n] = rng.choice(i, n, replace=False)
    return jnp.asarray(chosen)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_matches_reference_on(attend, pattern, inputs, *, scale: float, rtol: float, label: str, selected=None):
    """(out, dq, dk, dv) of attend(q, k, v) on inputs = (q, k, v, d_out), each checked against the float32
    reference on the same (rounded) inputs (and the same chosen blocks of a `topk` pattern): the inputs'
    dtype and the reference's shape, finite, and a relative error below rtol."""
    q, k, v, d_out = inputs
    got = output_and_grads(attend, q, k, v, d_out)
    upcast = [x.astype(jnp.float32) for x in inputs]
    want = output_and_grads(lambda q, k, v: reference.attention(q, k, v, pattern, scale=scale, selected=selected),
                            *upcast)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype and g.shape == w.shape, f"{label}: {name}"
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{label}: non-finite {name}"
        error = relative_error(g, w)
        assert error < rtol, f"{label}: {name} relative error {error:.2e} >= {rtol:.0e}"
    return got


def assert_topk_matches_reference(attend, spec: str, *, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                                  dtype, rtol: float, scale: float = 0.25):
    """attend(q, k, v, pattern, selected) for a pattern with a topk part, over a random device layout (the
    same chosen blocks for the reference), batch 2, on inputs drawn from the spec's own seed: forward, dq, dk
    and dv against the float32 reference."""
    pattern = parse(spec)
    seed = zlib.crc32(spec.encode())
    inputs = random_inputs(seed, 2, seq_len, heads, kv_heads, head_dim, dtype)
    topk = pattern.block_selection()
    selected = random_selection(seed, 2, kv_heads, -(-seq_len // topk.size), topk.count)
    return assert_matches_reference_on(lambda q, k, v: attend(q, k, v, pattern, selected), pattern, inputs,
                                       scale=scale, rtol=rtol, label=spec, selected=selected)


def assert_jit_vmap_grad_matches_reference(attend, *, seq_len: int, spec: str = "repaired(16, 4, bridge)",
                                           head_dim: int = 16, dtype=jnp.float32, scale: float = 0.25,
                                           rtol: float = 1e-5):
    """attend(q, k, v, pattern, scale) for one sequence [1, seq, heads, d], vmapped over a leading axis of 5
    and differentiated under jit: its gradients against the float32 reference's."""
    pattern = parse(spec)
    q, k, v, _ = random_inputs(5, 2, seq_len, 2, 1, head_dim, dtype)  # the leading axis is vmapped
    weights = jax.random.normal(jax.random.key(6), q.shape)

    def loss(attend_one):
        batched = jax.vmap(lambda q, k, v: attend_one(q[None], k[None], v[None])[0])
        return lambda q, k, v: jnp.sum(batched(q, k, v).astype(jnp.float32) * weights)

    got = jax.jit(jax.grad(loss(lambda q, k, v: attend(q, k, v, pattern, scale)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference.attention(q, k, v, pattern, scale=scale)), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for g, w in zip(got, want):
        assert relative_error(g, w) < rtol


def assert_shard_map_matches_reference(kernel_attention):
    """kernel_attention(q, k, v, pattern, scale=...) inside shard_map over a (data, heads) mesh of one device,
    which checks that the kernel's results vary over the mesh axes its inputs do."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "heads"))
    spec = jax.sharding.PartitionSpec("data", None, "heads", None)
    pattern = parse("repaired(256, 32, prefix)")
    inputs = random_inputs(8, 2, 1024, 4, 2, 64, jnp.bfloat16)
    sharded = jax.shard_map(lambda q, k, v: kernel_attention(q, k, v, pattern, scale=0.125),
                            mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    assert_matches_reference_on(sharded, pattern, inputs, scale=0.125, rtol=2e-2, label="shard_map")


def assert_plan_covers_pattern(covered, full_only, pattern, seq_len: int, by_key: bool, rows):
    """covered int [padded, padded]: how often the plan visits each (row, column) position in its frame
    (query-major, or key-major when by_key); full_only: positions inside FULL tiles; rows: the plan's row
    order. Every active pair is visited exactly once, FULL tiles hold only active pairs, each row runs once."""
    positions = np.arange(covered.shape[0])
    q_pos, k_pos = (positions[None, :], positions[:, None]) if by_key else (positions[:, None], positions[None, :])
    active = pattern.mask(q_pos, k_pos) & (q_pos < seq_len) & (k_pos < seq_len)
    assert (covered[active] == 1).all(), "an active pair is missed or covered twice"
    assert (covered <= 1).all()
    valid_rows = (positions < seq_len)[:, None] if not by_key else (positions < seq_len)[None, :]
    assert active[full_only & valid_rows].all(), "a FULL tile holds an inactive pair"
    assert sorted(rows) == list(range(len(rows))), "every row runs exactly once"
