"""The Pallas (Triton) kernels against the dense reference: forward and dq/dk/dv, on fresh random inputs.

On CPU the kernels run in interpret mode at tiny sizes; `TestGpu` repeats the cases at real sizes when a
GPU is present. Every case draws new inputs from its own seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention import attention

from sparse_attention.kernels import triton
from sparse_attention.attention import resolve_impl
from sparse_attention.patterns import parse
from kernel_oracle import (HARDWARE_CASES, assert_jit_vmap_grad_matches_reference, assert_matches_reference_on,
                           assert_plan_covers_pattern, assert_shard_map_matches_reference,
                           assert_topk_matches_reference, random_inputs)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def tiles(block_q, block_k, sub_k, block_k_dkv=None, block_q_dkv=None, sub_q_dkv=None) -> triton.BlockSizes:
    """Small tiles for interpret mode; the dq pass shares the forward's tiles."""
    return triton.BlockSizes(
        block_q=block_q, block_k=block_k, block_k_partial=sub_k,
        block_q_dq=block_q, block_k_dq=block_k, block_k_partial_dq=sub_k,
        block_k_dkv=block_k_dkv or block_k, block_q_dkv=block_q_dkv or block_q,
        block_q_partial_dkv=sub_q_dkv or sub_k,
    )


def assert_matches_reference(spec, *, seq_len, heads=2, kv_heads=1, head_dim=32, dtype=jnp.float32, batch=1,
                             block_sizes=None, scale=None, seed=0, interpret=INTERPRET):
    pattern = parse(spec)
    q, k, v, d_out = random_inputs(seed, batch, seq_len, heads, kv_heads, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return assert_matches_reference_on(
        lambda q, k, v: triton.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                             block_sizes=block_sizes),
        pattern, (q, k, v, d_out), scale=scale, rtol=RTOL[dtype], label=spec)


def plan_kinds(spec, seq_len, sizes: triton.BlockSizes) -> tuple[bool, bool]:
    """Whether the forward plan (and the dk/dv plan) has full tiles and partial sub-tiles."""
    pattern = parse(spec)
    sizes = sizes.clipped(seq_len)
    forward = triton.tile_plan(pattern, seq_len, sizes.block_q, sizes.block_k, sizes.block_k_partial, False)
    dkdv = triton.tile_plan(pattern, seq_len, sizes.block_q_dkv, sizes.block_k_dkv,
                                sizes.block_q_partial_dkv, True)
    has_full = forward.num_full.sum() > 0 and dkdv.num_full.sum() > 0
    has_partial = forward.num_partial.sum() > 0 and dkdv.num_partial.sum() > 0
    return bool(has_full), bool(has_partial)


# (spec, seq_len, tiles, heads, kv_heads, head_dim, exercises full and partial tiles)
PATTERN_CASES = [
    ("dense", 100, tiles(32, 32, 16), 2, 1, 32, True),
    ("block(48)", 96, tiles(16, 32, 16, 16, 32, 16), 2, 2, 16, True),
    ("window(40)", 90, tiles(16, 16, 16), 2, 1, 32, True),
    ("repaired(48, 8, bridge)", 100, tiles(16, 32, 16, 16, 32, 16), 4, 2, 16, True),
    ("repaired(48, 12, prefix)", 100, tiles(16, 16, 16), 2, 1, 32, True),
    ("block(32, 16)", 77, tiles(16, 16, 16), 2, 1, 16, True),  # odd layers of shifted(32)
    ("strided(7)", 64, tiles(16, 32, 16), 2, 1, 16, False),  # strided tiles are never full
    ("dilated(6, 3)", 70, tiles(16, 16, 16), 2, 2, 16, False),
    ("sinks(40)", 70, tiles(16, 16, 16), 2, 1, 16, True),
    ("random_blocks(16, 2, 11)", 128, tiles(16, 16, 16, 32, 16, 16), 2, 1, 32, True),
    ("window(40) | sinks(4)", 100, tiles(16, 32, 16), 3, 1, 16, True),
    ("block(32) & strided(3)", 64, tiles(16, 16, 16), 2, 1, 16, False),
    ("repaired(48, 8, bridge) | strided(9)", 100, tiles(16, 16, 16), 2, 2, 16, True),
]


def test_pattern_cases_walk_both_list_forms():
    """Some case below walks each list (forward full and partial, dk/dv full and partial) as first + j,
    and some as an explicit list."""
    forms = set()
    for spec, seq_len, sizes, *_ in PATTERN_CASES:
        sizes = sizes.clipped(seq_len)
        forward = triton.tile_plan(parse(spec), seq_len, sizes.block_q, sizes.block_k, sizes.block_k_partial,
                                       False)
        dkdv = triton.tile_plan(parse(spec), seq_len, sizes.block_q_dkv, sizes.block_k_dkv,
                                    sizes.block_q_partial_dkv, True)
        forms |= {(name, kind, contiguous) for name, plan in (("forward", forward), ("dkdv", dkdv))
                  for kind, contiguous in zip(("full", "partial"), plan.contiguous)}
    assert len(forms) == 8, sorted(forms)


@pytest.mark.parametrize("case", PATTERN_CASES, ids=[c[0] for c in PATTERN_CASES])
def test_pattern_matches_reference_fp32(case):
    spec, seq_len, sizes, heads, kv_heads, head_dim, both_kinds = case
    if both_kinds:
        assert plan_kinds(spec, seq_len, sizes) == (True, True), "case must exercise full and partial tiles"
    assert_matches_reference(spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_sizes=sizes, seed=zlib.crc32(spec.encode()))


@pytest.mark.parametrize(
    "spec, seq_len, sizes, dtype",
    [
        ("repaired(96, 16, bridge)", 128, tiles(32, 32, 16), jnp.bfloat16),
        ("window(64)", 100, tiles(16, 32, 16, 32, 16, 16), jnp.float16),
    ],
)
def test_half_precision_matches_reference(spec, seq_len, sizes, dtype):
    assert plan_kinds(spec, seq_len, sizes) == (True, True)
    assert_matches_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, head_dim=64, dtype=dtype,
                             block_sizes=sizes, seed=seq_len)


def test_default_block_sizes_with_head_dim_128_and_unaligned_length():
    # Default tiles (clipped to 128 here) and head_dim 128, as on the GPU; seq 130 leaves a ragged tile.
    assert_matches_reference("window(48) | sinks(2)", seq_len=130, heads=2, kv_heads=1, head_dim=128,
                             dtype=jnp.bfloat16, seed=7)


def test_padded_head_dim():
    # head_dim 24 is zero-padded to 32 inside; out and grads keep 24.
    assert_matches_reference("dense", seq_len=40, head_dim=24, block_sizes=tiles(16, 16, 16), seed=3)


def test_rows_without_keys_give_zero_and_finite_grads():
    # sinks(4) & window(2): queries >= 5 see no key at all.
    out, dq, _, _ = assert_matches_reference("sinks(4) & window(2)", seq_len=40, block_sizes=tiles(16, 16, 16),
                                             seed=11)
    np.testing.assert_array_equal(np.asarray(out[:, 5:]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, 5:]), 0.0)


@pytest.mark.parametrize("scale", [0.37, -0.2])
def test_custom_scale(scale):
    assert_matches_reference("window(20)", seq_len=48, block_sizes=tiles(16, 16, 16), scale=scale,
                             seed=int(abs(scale) * 100))


def test_jit_vmap_grad():
    def attend(q, k, v, pattern, scale):
        return triton.attention(q, k, v, pattern, scale=scale, interpret=INTERPRET, block_sizes=tiles(16, 16, 16))

    assert_jit_vmap_grad_matches_reference(attend, seq_len=48)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from sparse_attention import reference
    from sparse_attention.kernels import triton
    from sparse_attention.patterns import parse
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    interpret = True
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "heads"))
    pattern = parse("window(12) | sinks(2)")
    keys = jax.random.split(jax.random.key(int(sys.argv[1])), 4)
    q = jax.random.normal(keys[0], (2, 40, 4, 16)); d_out = jax.random.normal(keys[3], q.shape)
    k, v = (jax.random.normal(key, (2, 40, 2, 16)) for key in keys[1:3])
    sizes = triton.BlockSizes(**json.loads(sys.argv[2]))
    spec = P("data", None, "heads", None)
    # Interpret mode slices blocks with unvarying grid indices, which check_vma rejects; the compiled
    # kernel runs with check_vma on (TestGpu.test_shard_map_checks_vma).
    sharded = jax.shard_map(
        lambda q, k, v: triton.attention(q, k, v, pattern, scale=0.25, interpret=interpret, block_sizes=sizes),
        mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def run(attend):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))
    got = jax.jit(lambda: run(sharded))()
    want = run(lambda q, k, v: reference.attention(q, k, v, pattern, scale=0.25))
    errors = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in zip(got, want)]
    print(json.dumps(errors))
    """
)


def test_shard_map_over_batch_and_heads():
    # A subprocess, so that the 4 host devices do not leak into other tests (or pytest-xdist workers).
    # Runs on 4 host devices (CPU, interpret mode) on any machine.
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    sizes = json.dumps(dataclasses.asdict(tiles(16, 16, 16)))
    result = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT, "21", sizes], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-5, errors


# ------------------------------------------------------------------------------------- plans and API


@pytest.mark.parametrize("spec", ["dense", "window(40)", "repaired(64, 16, bridge)", "repaired(64, 16, prefix)",
                                  "strided(5)", "random_blocks(32, 2, 3)", "sinks(4) & window(2)"])
@pytest.mark.parametrize("by_key", [False, True])
def test_plan_covers_each_active_pair_once(spec, by_key):
    """Full tiles hold only active pairs; full tiles plus partial sub-tiles cover every active pair once."""
    pattern, seq_len, tile, sub = parse(spec), 200, 64, 16
    plan = triton.tile_plan(pattern, seq_len, tile, tile, sub, by_key)
    padded = -(-seq_len // tile) * tile
    covered = np.zeros((padded, padded), np.int32)  # [row position, column position] in the plan's frame
    full_only = np.zeros_like(covered, dtype=bool)
    for program, row in enumerate(plan.rows):
        rows = slice(row * tile, (row + 1) * tile)
        for col in walked_tiles(plan.full, plan.num_full, plan.contiguous[0], program):
            covered[rows, col * tile : (col + 1) * tile] += 1
            full_only[rows, col * tile : (col + 1) * tile] = True
        for col in walked_tiles(plan.partial, plan.num_partial, plan.contiguous[1], program):
            covered[rows, col * sub : (col + 1) * sub] += 1
    assert_plan_covers_pattern(covered, full_only, pattern, seq_len, by_key, plan.rows)


def walked_tiles(tiles, counts, contiguous: bool, program: int) -> np.ndarray:
    """The tiles `_walk` visits for one program: first + j for a contiguous list, else the listed ones."""
    count = counts[program]
    return tiles[program, 0] + np.arange(count) if contiguous else tiles[program, :count]


@pytest.mark.parametrize("by_key", [False, True])
def test_dense_plan_at_one_million_tokens_stores_first_tiles_only(by_key):
    seq_len, tile, sub = 1 << 20, 128, 32
    plan = triton.tile_plan(parse("dense"), seq_len, tile, tile, sub, by_key)
    # As explicit padded lists the full tiles alone were [8192, 8191] int32 (256 MiB) of kernel inputs.
    assert plan.contiguous == (True, True)
    assert plan.full.shape == plan.partial.shape == (seq_len // tile, 1)
    # Heaviest row first: the last query tile (the first key tile) meets every other tile, plus the
    # diagonal tile's sub-tiles.
    assert plan.rows[0] == (0 if by_key else seq_len // tile - 1)
    assert plan.num_full[0] == seq_len // tile - 1 and plan.num_partial[0] == tile // sub
    assert plan.full[0, 0] == (1 if by_key else 0)


def test_block_sizes_validation_and_defaults():
    with pytest.raises(ValueError, match="block_q"):
        triton.BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="block_k_partial"):
        triton.BlockSizes(block_k=32, block_k_partial=64)
    with pytest.raises(ValueError, match="num_warps"):
        triton.BlockSizes(num_warps=0)
    long_rows = triton.BlockSizes.for_head_dim(128, triton.keys_per_query(parse("dense"), 32768))
    short_rows = triton.BlockSizes.for_head_dim(128, triton.keys_per_query(parse("block(512)"), 32768))
    assert short_rows.block_q < long_rows.block_q
    assert triton.BlockSizes().clipped(40).largest_block == 64


def test_unsupported_reasons():
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    pattern = parse("dense")
    assert triton.unsupported_reason(q, q, q, pattern, interpret=True) is None
    assert "dtype" in triton.unsupported_reason(q.astype(jnp.int32), q, q, pattern, interpret=True)
    if not ON_GPU:
        assert "GPU" in triton.unsupported_reason(q, q, q, pattern, interpret=False)
        with pytest.raises(ValueError, match="triton"):
            resolve_impl("triton", q, q, q, pattern)
    assert resolve_impl("triton", q, q, q, pattern, interpret=True) == ("triton", "requested")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the compiled Triton kernels at real sizes")
class TestGpu:
    @pytest.mark.parametrize("spec, seq_len, head_dim", HARDWARE_CASES, ids=[c[0] for c in HARDWARE_CASES])
    def test_bf16_default_tiles(self, spec, seq_len, head_dim):
        assert_matches_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, head_dim=head_dim,
                                 dtype=jnp.bfloat16, seed=seq_len + head_dim, interpret=False)

    def test_fp32_is_not_tf32(self):
        assert_matches_reference("window(300) | sinks(8)", seq_len=1000, heads=2, kv_heads=1, head_dim=64,
                                 dtype=jnp.float32, seed=1, interpret=False)

    @pytest.mark.parametrize("head_dim", [32, 96, 256])
    def test_other_head_dims(self, head_dim):
        assert_matches_reference("repaired(256, 32, bridge)", seq_len=1500, heads=2, kv_heads=1,
                                 head_dim=head_dim, dtype=jnp.bfloat16, seed=head_dim, interpret=False)

    def test_jit_vmap_grad(self):
        test_jit_vmap_grad()

    def test_shard_map_checks_vma(self):
        assert_shard_map_matches_reference(triton.attention)


# topk: (spec, seq_len, tiles, heads, kv_heads, dtype); the chosen blocks are random device layouts.
TOPK_CASES = [
    ("topk(32, 2)", 160, tiles(16, 16, 16), 2, 1, jnp.float32),
    ("topk(32, 3) | repaired(32, 4, prefix)", 150, tiles(16, 32, 16), 4, 2, jnp.float32),  # unaligned length
    ("topk(64, 1) | window(24)", 200, tiles(32, 32, 16), 2, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("spec, seq_len, sizes, heads, kv_heads, dtype", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_over_random_device_layouts(spec, seq_len, sizes, heads, kv_heads, dtype):
    """Forward and dq/dk/dv against the reference given the same chosen blocks; dk/dv walks their transpose,
    built on the device."""
    assert_topk_matches_reference(
        lambda q, k, v, pattern, selected: triton.attention(q, k, v, pattern, scale=0.25, interpret=INTERPRET,
                                                            block_sizes=sizes, selected=selected),
        spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype, rtol=RTOL[dtype])


def test_topk_through_the_dispatch_and_its_refusals():
    q, k, v, _ = random_inputs(1, 1, 256, 2, 1, 32, jnp.float32)
    # Default tiles of 128 walk a chosen block of 128 whole; the choice is made from q and k on the device.
    got = attention(q, k, v, "topk(128, 1)", impl="triton", interpret=INTERPRET)
    np.testing.assert_allclose(got, attention(q, k, v, "topk(128, 1)", impl="reference"), atol=2e-5)
    with pytest.raises(ValueError, match=r"block 32 is not a multiple of the largest tile \(128\)"):
        attention(q, k, v, "topk(32, 1)", impl="triton", interpret=INTERPRET)
    assert resolve_impl("auto", q, k, v, "topk(32, 1)", interpret=INTERPRET)[0] != "triton"
    with pytest.raises(ValueError, match="selected must be given exactly for patterns with a topk part"):
        triton.attention(q, k, v, parse("topk(128, 1)"), scale=0.25, interpret=INTERPRET)
