"""Shared by the kernel test files: fresh random inputs, one jitted forward + VJP, the error measure, and the
check that a kernel's tile plan covers the pattern."""

import jax
import numpy as np


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


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


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
