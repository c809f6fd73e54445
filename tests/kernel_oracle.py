"""Shared by the kernel test files: fresh random inputs, one jitted forward + VJP, and the error measure."""

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
