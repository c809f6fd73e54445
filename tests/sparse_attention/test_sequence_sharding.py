"""Sequence-sharded attention: with 2, 4 and 8 shards (virtual CPU devices, in a subprocess) the output and
dq/dk/dv equal one device's for every pattern kind; the halo and the bytes sent follow the halo arithmetic."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sparse_attention.sequence_sharding import plan

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SPECS = ("dense", "block(16)", "window(12)", "repaired(16, 4, bridge)", "repaired(16, 4, prefix)", "block(16, 8)",
         "sinks(2) | window(8)", "strided(5)", "dilated(3, 4)", "random_blocks(16, 1, 3)", "topk(16, 1)",
         "block(16) | window(20)", "block(8) & block(16, 4)")

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from sparse_attention import attention
    from sparse_attention.sequence_sharding import sharded_attention

    results = {}
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 256, 4, 16)); d_out = jax.random.normal(keys[3], (2, 256, 4, 16))
    k = jax.random.normal(keys[1], (2, 256, 2, 16)); v = jax.random.normal(keys[2], (2, 256, 2, 16))

    def run(attend):
        out, vjp = jax.vjp(attend, q, k, v)
        return [out, *vjp(d_out)]

    for spec in json.loads(sys.argv[1]):
        want = run(lambda q, k, v: attention(q, k, v, spec, impl="xla"))
        for shards in (2, 4, 8):
            mesh = Mesh(np.array(jax.devices()[:shards]), ("seq",))
            sharded = jax.shard_map(lambda q, k, v: sharded_attention(q, k, v, spec, axis_name="seq", impl="xla"),
                                    mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
            got = run(jax.jit(sharded))
            results[f"{spec} {shards}"] = max(float(jnp.abs(g - w).max()) for g, w in zip(got, want))
    print("RESULT " + json.dumps(results))
""")


def test_sharded_output_and_gradients_equal_one_device():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    process = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SPECS)], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-4000:]
    errors = json.loads(process.stdout.split("RESULT ", 1)[1])
    assert len(errors) == 3 * len(SPECS)
    assert all(error < 1e-5 for error in errors.values()), errors


@pytest.mark.parametrize("spec, method, halo, window", [
    ("block(64)", "halo", 0, 0),  # shard edges on block edges: nothing to send
    ("repaired(64, 8, bridge)", "halo", 8, 64),
    ("repaired(64, 8, prefix)", "halo", 8, 64),
    ("window(32)", "halo", 31, 31),
    ("block(64, 32)", "halo", 32, 64),
    ("dense", "all_gather", 0, 0), ("sinks(4) | window(8)", "all_gather", 0, 0), ("topk(64, 1)", "all_gather", 0, 0),
])
def test_halo_arithmetic(spec, method, halo, window):
    sharded = plan(spec, 256, 4)
    assert (sharded.method, sharded.halo, sharded.window) == (method, halo, window)
    if method == "halo":
        # k and v of the halo: 2 * halo * batch * kv_heads * head_dim * itemsize.
        assert sharded.sent_bytes(2, 8, 4, 64, 2) == 2 * halo * 2 * 4 * 64 * 2
    else:
        assert sharded.sent_bytes(2, 8, 4, 64, 2) == 3 * 256 * 2 * (8 + 2 * 4) * 64 * 2


@pytest.mark.parametrize("spec, shard_len, message", [
    ("block(64)", 96, "mesh.seq: a shard of 96 positions must be a multiple of 64"),
    ("window(300)", 256, "mesh.seq: window\\(300\\) needs a halo of 299 keys, longer than a shard of 256"),
])
def test_bad_shardings_name_the_field(spec, shard_len, message):
    with pytest.raises(ValueError, match=message):
        plan(spec, shard_len, 4)
