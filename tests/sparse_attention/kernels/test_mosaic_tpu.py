"""The Pallas TPU (Mosaic) kernels against the dense reference: forward and dq/dk/dv, on fresh random inputs.

No TPU here: the kernels run in interpret mode at tiny sizes (Pallas's generic interpreter, and the TPU
simulator `pltpu.InterpretParams` for a few cases), and `test_kernels_lower_to_mosaic` lowers every pattern's
forward and backward kernels for a TPU target at real tile sizes. `TestTpu` repeats cases compiled when a
TPU is present. Every case draws new inputs from its own seed.
"""

from __future__ import annotations

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
from jax.experimental.pallas import tpu as pltpu

import optax
from flax import nnx

from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.model import DecoderLM
from sparse_attention import reference
from sparse_attention.kernels import mosaic_tpu
from sparse_attention.attention import attention as dispatch_attention
from sparse_attention.attention import resolve_impl
from sparse_attention.kernels.common import KernelStatic
from sparse_attention.layout import block_layout
from sparse_attention.patterns import EMPTY, FULL, PARTIAL, parse
from kernel_oracle import (HARDWARE_CASES, assert_jit_vmap_grad_matches_reference, assert_matches_reference_on,
                           assert_topk_matches_reference, random_inputs, random_selection, relative_error)

ON_TPU = jax.default_backend() == "tpu"
INTERPRET = not ON_TPU
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def tiles(block_q, block_k, block_q_dkv=None, block_k_dkv=None, block_q_dq=None, block_k_dq=None):
    """Small tiles for interpret mode; the dq pass shares the forward's unless given."""
    return mosaic_tpu.BlockSizes(
        block_q=block_q, block_k=block_k, block_q_dq=block_q_dq or block_q, block_k_dq=block_k_dq or block_k,
        block_q_dkv=block_q_dkv or block_q, block_k_dkv=block_k_dkv or block_k,
    )


def assert_matches_reference(spec, *, seq_len, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32, batch=1,
                             block_sizes=None, scale=None, seed=0, interpret=INTERPRET):
    pattern = parse(spec)
    q, k, v, d_out = random_inputs(seed, batch, seq_len, heads, kv_heads, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return assert_matches_reference_on(
        lambda q, k, v: mosaic_tpu.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                             block_sizes=block_sizes),
        pattern, (q, k, v, d_out), scale=scale, rtol=RTOL[dtype], label=spec)


def step_kinds(spec, seq_len, sizes: mosaic_tpu.BlockSizes) -> set[int]:
    """Tile kinds that every one of the three kernels visits (forward, dq, dk/dv)."""
    pattern = parse(spec)
    sizes = sizes.clipped(seq_len, mosaic_tpu.SUBLANES)
    lists = [mosaic_tpu.step_list(pattern, seq_len, sizes.block_q, sizes.block_k, False),
             mosaic_tpu.step_list(pattern, seq_len, sizes.block_q_dq, sizes.block_k_dq, False),
             mosaic_tpu.step_list(pattern, seq_len, sizes.block_q_dkv, sizes.block_k_dkv, True)]
    return set.intersection(*(set(steps.kinds.tolist()) for steps in lists))


# (spec, seq_len, tiles, heads, kv_heads, head_dim, exercises full and partial tiles)
PATTERN_CASES = [
    ("dense", 40, tiles(16, 16), 2, 1, 16, True),
    ("block(24)", 56, tiles(8, 16, 16, 8), 2, 2, 16, True),
    ("block(16, 8)", 45, tiles(8, 8), 2, 1, 16, True),  # odd layers of shifted(16)
    ("window(20)", 50, tiles(8, 8, 16, 8, 16, 16), 2, 1, 16, True),
    ("repaired(24, 4, bridge)", 60, tiles(8, 8, 8, 16), 4, 2, 16, True),
    ("repaired(24, 6, prefix)", 60, tiles(8, 8), 2, 1, 16, True),
    ("strided(5)", 40, tiles(8, 16), 2, 1, 16, False),  # strided tiles are never full
    ("dilated(4, 3)", 40, tiles(8, 8), 2, 2, 16, False),
    ("sinks(20)", 44, tiles(8, 8), 2, 1, 16, True),
    ("random_blocks(8, 2, 11)", 48, tiles(8, 8), 2, 1, 16, True),
    ("window(24) | sinks(4)", 50, tiles(8, 16), 3, 1, 16, True),
    ("block(16) & strided(3)", 40, tiles(8, 8), 2, 1, 16, False),
    ("repaired(24, 4, bridge) | strided(9)", 56, tiles(8, 8), 2, 2, 16, True),
]


@pytest.mark.parametrize("case", PATTERN_CASES, ids=[c[0] for c in PATTERN_CASES])
def test_pattern_matches_reference_fp32(case):
    spec, seq_len, sizes, heads, kv_heads, head_dim, both_kinds = case
    kinds = step_kinds(spec, seq_len, sizes)
    assert PARTIAL in kinds
    if both_kinds:
        assert FULL in kinds, "case must exercise full and partial tiles in every kernel"
    assert_matches_reference(spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_sizes=sizes, seed=zlib.crc32(spec.encode()))


@pytest.mark.parametrize("spec, seq_len, sizes", [
    ("repaired(32, 8, bridge)", 72, tiles(16, 16)),
    ("window(24) | sinks(2)", 50, tiles(16, 8, 8, 16)),
])
def test_bf16_matches_reference(spec, seq_len, sizes):
    assert step_kinds(spec, seq_len, sizes) >= {FULL, PARTIAL}
    assert_matches_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, head_dim=32, dtype=jnp.bfloat16,
                             block_sizes=sizes, seed=seq_len)


@pytest.mark.skipif(ON_TPU, reason="the TPU simulator is for machines without a TPU")
@pytest.mark.parametrize("spec, seq_len, sizes", [
    ("repaired(16, 4, prefix)", 37, tiles(8, 8, 8, 16)),
    ("sinks(4) & window(2)", 20, tiles(8, 8)),
])
def test_tpu_simulator(spec, seq_len, sizes):
    # The simulator raises on out-of-bounds reads and fills every buffer the kernels do not write with NaN,
    # so reading an unwritten accumulator or residual shows up as a non-finite result.
    assert_matches_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, block_sizes=sizes, seed=seq_len,
                             interpret=pltpu.InterpretParams())


def test_default_block_sizes_and_unaligned_length():
    # Default tiles, clipped to the sequence rounded up to 8; one partial tile per pass.
    assert_matches_reference("window(9) | sinks(2)", seq_len=21, heads=2, kv_heads=1, head_dim=32, seed=7)


def test_rows_without_keys_give_zero_and_finite_grads():
    # sinks(4) & window(2): queries >= 5 see no key at all; whole query tiles have no active tile.
    out, dq, _, _ = assert_matches_reference("sinks(4) & window(2)", seq_len=40, block_sizes=tiles(8, 8), seed=11)
    np.testing.assert_array_equal(np.asarray(out[:, 5:]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, 5:]), 0.0)
    steps = mosaic_tpu.step_list(parse("sinks(4) & window(2)"), 40, 8, 8, False)
    assert EMPTY in steps.kinds.tolist()


@pytest.mark.parametrize("scale", [0.37, -0.2])
def test_custom_scale(scale):
    assert_matches_reference("window(12)", seq_len=32, block_sizes=tiles(8, 8), scale=scale,
                             seed=int(abs(scale) * 100))


def test_dispatch_through_attention():
    pattern = parse("repaired(16, 4, bridge)")
    q, k, v, _ = random_inputs(4, 1, 40, 2, 1, 16, jnp.float32)
    got = dispatch_attention(q, k, v, pattern, impl="mosaic_tpu", interpret=True)
    want = reference.attention(q, k, v, pattern, scale=0.25)
    assert relative_error(got, want) < 1e-5


def test_decoder_lm_loss_and_grads_match_xla():
    # The model's path: attention(impl=...) inside nnx.jit, GQA, remat, a per-layer schedule.
    model_config = ModelConfig(vocab_size=260, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               mlp_hidden=48, tie_embeddings=False, remat=True, rope_base=10000.0,
                               compute_dtype="float32", param_dtype="float32")
    tokens = jax.random.randint(jax.random.key(12), (2, 41), 0, 256)

    def loss_and_grads(impl):
        attention = AttentionConfig(pattern="dense", schedule=("repaired(16, 4, bridge)", "block(16, 8)"), impl=impl,
                                    interpret=impl == "mosaic_tpu")
        model = DecoderLM(model_config, attention, rngs=nnx.Rngs(3))

        def loss_fn(m):
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
        return loss, nnx.to_pure_dict(grads)

    loss, grads = loss_and_grads("mosaic_tpu")
    want_loss, want_grads = loss_and_grads("xla")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want_grads)


def test_jit_vmap_grad():
    def attend(q, k, v, pattern, scale):
        return mosaic_tpu.attention(q, k, v, pattern, scale=scale, interpret=INTERPRET, block_sizes=tiles(8, 8))

    assert_jit_vmap_grad_matches_reference(attend, seq_len=32)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from sparse_attention import reference
    from sparse_attention.kernels import mosaic_tpu
    from sparse_attention.patterns import parse
    pattern = parse("window(12) | sinks(2)")
    sizes = mosaic_tpu.BlockSizes(8, 8, 8, 8, 8, 8)
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    seed = int(sys.argv[1])

    def inputs(batch):
        keys = jax.random.split(jax.random.key(seed + batch), 4)
        q = jax.random.normal(keys[0], (batch, 28, 4, 16))
        k, v = (jax.random.normal(key, (batch, 28, 2, 16)) for key in keys[1:3])
        return q, k, v, jax.random.normal(keys[3], q.shape)

    def errors_against_reference(attend, q, k, v, d_out, wrap=lambda f: f()):
        def run(attend):
            out, vjp = jax.vjp(attend, q, k, v)
            return (out, *vjp(d_out))
        got = wrap(jax.jit(lambda: run(attend)))
        want = run(lambda q, k, v: reference.attention(q, k, v, pattern, scale=0.25))
        return [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in zip(got, want)]

    errors = {}
    # The training mesh (batch over data x fsdp), and batch x heads.
    for name, axes, batch_axes, head_axis, batch in [("data_fsdp", ("data", "fsdp"), ("data", "fsdp"), None, 4),
                                                     ("data_heads", ("data", "heads"), "data", "heads", 2)]:
        mesh = Mesh(devices, axes)
        errors[name] = errors_against_reference(lambda q, k, v: mosaic_tpu.sharded_attention(
            q, k, v, pattern, mesh, batch_axes=batch_axes, head_axis=head_axis, scale=0.25, interpret=True,
            block_sizes=sizes), *inputs(batch))
    # Under a context mesh, plain `attention` (what the model calls) splits the batch over every axis.
    mesh = Mesh(devices, ("data", "fsdp"))
    attend = lambda q, k, v: mosaic_tpu.attention(q, k, v, pattern, scale=0.25, interpret=True, block_sizes=sizes)
    q, k, v, d_out = inputs(4)

    def under_mesh(f):
        with jax.set_mesh(mesh):
            return f()

    errors["uses_shard_map"] = under_mesh(lambda: "shard_map" in str(jax.make_jaxpr(attend)(q, k, v)))
    errors["context_mesh"] = errors_against_reference(attend, q, k, v, d_out, under_mesh)
    # A topk pattern's chosen blocks [batch, kv_heads, blocks, K] are split with the batch and the heads.
    topk, rng = parse("topk(8, 2)"), np.random.default_rng(seed)
    chosen = np.full((2, 2, 4, 2), -1, np.int32)
    for b, h, i in np.ndindex(2, 2, 4):
        chosen[b, h, i, :min(2, i)] = rng.choice(i, min(2, i), replace=False)
    chosen, mesh = jnp.asarray(chosen), Mesh(devices, ("data", "heads"))
    q, k, v, d_out = inputs(2)

    def run(attend):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))
    got = jax.jit(lambda: run(lambda q, k, v: mosaic_tpu.sharded_attention(
        q, k, v, topk, mesh, batch_axes="data", head_axis="heads", scale=0.25, interpret=True, block_sizes=sizes,
        selected=chosen)))()
    want = run(lambda q, k, v: reference.attention(q, k, v, topk, scale=0.25, selected=chosen))
    errors["topk"] = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in zip(got, want)]
    try:
        mosaic_tpu.sharded_attention(q[:, :, :3], k[:, :, :1], v[:, :, :1], pattern, Mesh(devices, ("data", "heads")),
                                     batch_axes="data", head_axis="heads", interpret=True)
    except ValueError as error:
        errors["refused"] = str(error)
    print(json.dumps(errors))
    """
)


def test_sharded_attention_over_batch_and_heads_and_context_mesh():
    # A subprocess, so that the 4 host devices do not leak into other tests (or pytest-xdist workers).
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT, "21"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for case in ("data_fsdp", "data_heads", "context_mesh", "topk"):
        assert max(errors[case]) < 1e-5, errors
    assert errors["uses_shard_map"]
    assert "head_axis" in errors["refused"] and "kv_heads=1" in errors["refused"]


# ------------------------------------------------------------------------------- topk: device layouts

# (spec, seq_len, tiles, heads, kv_heads, dtype); the chosen blocks are random device layouts.
TOPK_CASES = [
    ("topk(16, 2)", 80, tiles(8, 8), 2, 1, jnp.float32),
    ("topk(32, 3) | repaired(32, 4, prefix)", 150, tiles(16, 8, 8, 16, 16, 16), 4, 2, jnp.float32),  # unaligned
    ("topk(16, 1) | window(12)", 100, tiles(8, 16, 16, 8), 2, 2, jnp.bfloat16),
    ("topk(16, 2) | sinks(3)", 70, tiles(16, 16, 8, 8), 2, 1, jnp.float32),
]


@pytest.mark.parametrize("spec, seq_len, sizes, heads, kv_heads, dtype", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_over_random_device_layouts(spec, seq_len, sizes, heads, kv_heads, dtype):
    """Forward and dq/dk/dv against the reference given the same chosen blocks; every pass walks step lists
    merged on the device, the dk/dv pass their transpose."""
    assert_topk_matches_reference(
        lambda q, k, v, pattern, selected: mosaic_tpu.attention(q, k, v, pattern, scale=0.25, interpret=INTERPRET,
                                                                block_sizes=sizes, selected=selected),
        spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype, rtol=RTOL[dtype])


@pytest.mark.skipif(ON_TPU, reason="the simulator stands in for a TPU")
def test_topk_in_the_tpu_simulator():
    # The simulator raises on out-of-bounds reads and fills unwritten memory with NaN.
    pattern = parse("topk(16, 2) | repaired(16, 4, bridge)")
    inputs = random_inputs(7, 1, 56, 2, 1, 16, jnp.float32)
    selected = random_selection(7, 1, 1, 4, 2)
    assert_matches_reference_on(
        lambda q, k, v: mosaic_tpu.attention(q, k, v, pattern, scale=0.25, interpret=pltpu.InterpretParams(),
                                             block_sizes=tiles(8, 8), selected=selected),
        pattern, inputs, scale=0.25, rtol=1e-5, label=pattern.spec, selected=selected)


@pytest.mark.parametrize("by_key", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_chosen_steps_visit_static_and_chosen_tiles_once_per_row(by_key, seed):
    pattern, seq_len, size, block_q, block_k = parse("topk(32, 3) | repaired(32, 8, prefix)"), 200, 32, 16, 8
    padded = 224  # a multiple of the block: chosen blocks are whole
    selected = random_selection(seed, 2, 3, padded // size, 3)
    steps = mosaic_tpu.step_list(pattern, padded, block_q, block_k, by_key)
    rows, cols, flags = (np.asarray(x).reshape(6, -1) for x in mosaic_tpu.chosen_steps(
        steps, selected, size, block_q, block_k, by_key))
    classes = block_layout(pattern, padded, block_q, block_k).dense_tile_classes()
    for lane in range(6):
        chose = np.zeros_like(classes, bool)  # [query tile, key tile]
        for block, picked in enumerate(np.asarray(selected).reshape(6, -1, 3)[lane]):
            for c in picked[picked >= 0]:
                chose[block * 2:(block + 1) * 2, c * 4:(c + 1) * 4] = True
        want = {(r, c, int(k)) for (r, c), k in np.ndenumerate(classes) if k != EMPTY}
        want |= {(r, c, mosaic_tpu.CHOSEN) for r, c in zip(*np.nonzero(chose))}
        if by_key:
            want = {(c, r, k) for r, c, k in want}
        kinds = flags[lane] & 3
        got = [(r, c, k) for r, c, k in zip(rows[lane], cols[lane], kinds) if k != EMPTY]
        assert len(got) == len(set(got)) and set(got) == want
        assert (np.diff(rows[lane]) >= 0).all()  # a row's steps are contiguous
        first, last = (flags[lane] & 4) != 0, (flags[lane] & 8) != 0
        np.testing.assert_array_equal(first, np.r_[True, rows[lane][1:] != rows[lane][:-1]])
        np.testing.assert_array_equal(last, np.r_[rows[lane][:-1] != rows[lane][1:], True])
        # Within a row the static steps come first, and an EMPTY step reloads the column before it.
        for row in np.unique(rows[lane]):
            row_kinds = kinds[rows[lane] == row]
            chosen_at = np.flatnonzero(row_kinds == mosaic_tpu.CHOSEN)
            assert not chosen_at.size or (row_kinds[chosen_at[0]:] != FULL).all()
        empty = np.flatnonzero(kinds == EMPTY)
        assert (cols[lane][empty[empty > 0]] == cols[lane][empty[empty > 0] - 1]).all()


def test_topk_through_the_dispatch_and_its_refusals():
    # The choice is made from q and k on the device; default tiles (256) walk a chosen block of 256 whole.
    q, k, v, _ = random_inputs(2, 1, 600, 2, 1, 16, jnp.float32)
    chosen = dispatch_attention(q, k, v, "topk(256, 1)", impl="mosaic_tpu", interpret=True)
    np.testing.assert_allclose(chosen, dispatch_attention(q, k, v, "topk(256, 1)", impl="reference"), atol=2e-5)
    assert "not a multiple of every tile" in mosaic_tpu.unsupported_reason(q, k, v, parse("topk(64, 1)"),
                                                                           interpret=True)
    q, k, v = q[:, :100], k[:, :100], v[:, :100]
    sizes = tiles(8, 8)
    with pytest.raises(ValueError, match="block 16 is not a multiple of every tile"):
        mosaic_tpu.attention(q, k, v, parse("topk(16, 1)"), scale=0.25, interpret=True, block_sizes=tiles(24, 8),
                             selected=random_selection(0, 1, 1, 7, 1))
    with pytest.raises(ValueError, match="selected must be given exactly for patterns with a topk part"):
        mosaic_tpu.attention(q, k, v, parse("topk(16, 1)"), scale=0.25, interpret=True, block_sizes=sizes)
    with pytest.raises(ValueError, match="selected must be given exactly"):
        mosaic_tpu.attention(q, k, v, parse("block(16)"), scale=0.25, interpret=True, block_sizes=sizes,
                             selected=random_selection(0, 1, 1, 7, 1))


# --------------------------------------------------------------------------- lowering for TPU hardware

LOWERING_CASES = ["dense", "block(256)", "block(256, 128)", "window(300)", "repaired(256, 64, bridge)",
                  "repaired(256, 64, prefix)", "strided(7)", "dilated(6, 3)", "sinks(4)",
                  "random_blocks(128, 2, 5)", "window(300) | sinks(4)", "block(256) & strided(3)",
                  "sinks(4) & window(2)"]


@pytest.mark.parametrize("dtype, head_dim", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_kernels_lower_to_mosaic(dtype, head_dim):
    """Forward, dq and dk/dv of every pattern pass Pallas's Mosaic lowering for a TPU v5p at 128 tiles.

    This checks every in-kernel op and block shape against the Mosaic lowering rules without a TPU; the
    Mosaic compiler itself (libtpu) runs only on hardware. The private `_flash` skips the backend check.
    """
    device = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    for spec in LOWERING_CASES:
        static = KernelStatic(parse(spec), 0.125, False, mosaic_tpu.BlockSizes(128, 128, 128, 128, 128, 128))
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(mosaic_tpu._flash(q, k, v, static).astype(jnp.float32)),
                                 argnums=(0, 1, 2)))
        with jax.sharding.use_abstract_mesh(mesh):
            text = grads.trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 3, spec
    # A topk pattern's kernels, whose step lists are built on the device and read at a per-(batch, kv head)
    # offset in SMEM.
    static = KernelStatic(parse("topk(256, 2) | repaired(256, 64, bridge)"), 0.125, False,
                          mosaic_tpu.BlockSizes(128, 128, 128, 128, 128, 256))
    selected = jax.ShapeDtypeStruct((2, 2, 4, 2), jnp.int32)
    grads = jax.jit(jax.grad(lambda q, k, v, chosen: jnp.sum(mosaic_tpu._flash(q, k, v, static, chosen)
                                                             .astype(jnp.float32)), argnums=(0, 1, 2)))
    with jax.sharding.use_abstract_mesh(mesh):
        text = grads.trace(q, kv, kv, selected).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


# ------------------------------------------------------------------------------- step lists and API


@pytest.mark.parametrize("spec", ["dense", "window(40)", "repaired(64, 16, bridge)", "repaired(64, 16, prefix)",
                                  "strided(5)", "random_blocks(32, 2, 3)", "sinks(4) & window(2)"])
@pytest.mark.parametrize("by_key", [False, True])
def test_step_list_visits_each_active_tile_once(spec, by_key):
    pattern, seq_len, block_q, block_k = parse(spec), 200, 32, 16
    steps = mosaic_tpu.step_list(pattern, seq_len, block_q, block_k, by_key)
    classes = block_layout(pattern, seq_len, block_q, block_k).dense_tile_classes()
    if by_key:
        classes = classes.T
    kinds, first, last = steps.kinds, (steps.flags & 4) != 0, (steps.flags & 8) != 0
    assert (np.diff(steps.rows) >= 0).all() and sorted(set(steps.rows.tolist())) == list(range(len(classes)))
    visited = np.zeros_like(classes)
    for row, col, kind in zip(steps.rows, steps.cols, kinds):
        if kind != EMPTY:
            assert visited[row, col] == EMPTY, "a tile is visited twice"
            visited[row, col] = kind
    np.testing.assert_array_equal(visited, classes)
    # One first and one last step per row, at its ends; an empty row is a single step.
    starts = np.flatnonzero(np.diff(steps.rows, prepend=-1) != 0)
    np.testing.assert_array_equal(np.flatnonzero(first), starts)
    np.testing.assert_array_equal(np.flatnonzero(last), np.append(starts[1:] - 1, len(steps.rows) - 1))
    for row in np.flatnonzero(~classes.astype(bool).any(axis=1)):
        at = np.flatnonzero(steps.rows == row)
        assert len(at) == 1 and kinds[at[0]] == EMPTY
        assert at[0] == 0 or steps.cols[at[0]] == steps.cols[at[0] - 1], "an empty step loads a new tile"
    # Within a row, full tiles come before partial ones.
    for row in range(len(classes)):
        row_kinds = kinds[steps.rows == row]
        assert (np.diff((row_kinds == PARTIAL).astype(int)) >= 0).all()


def test_block_sizes_validation_and_clipping():
    with pytest.raises(ValueError, match="block_q"):
        mosaic_tpu.BlockSizes(block_q=12)
    with pytest.raises(ValueError, match="block_k_dkv"):
        mosaic_tpu.BlockSizes(block_k_dkv=0)
    with pytest.raises(ValueError, match="block_k"):
        mosaic_tpu.BlockSizes(block_k=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        mosaic_tpu.BlockSizes(block_q=64).check_hardware()
    mosaic_tpu.BlockSizes().check_hardware()
    clipped = mosaic_tpu.BlockSizes().clipped(130, 128)
    assert clipped.block_q == 256 and mosaic_tpu.BlockSizes().clipped(100, 128).block_q == 128
    assert tiles(16, 8, 24).clipped(20, 8).sequence_multiple == 48


def test_step_lists_beyond_smem_are_refused():
    static = KernelStatic(parse("dense"), 1.0, False, mosaic_tpu.BlockSizes(128, 128, 128, 128, 128, 128))
    with pytest.raises(ValueError, match="SMEM"):
        mosaic_tpu._kernel_steps(static, 300 * 128, 128, 128, False, None, 1)
    # A topk pattern's lists, one per (batch, kv head), count against the same budget; its static part fits.
    static = KernelStatic(parse("topk(512, 8)"), 1.0, False, mosaic_tpu.BlockSizes(128, 128, 128, 128, 128, 128))
    mosaic_tpu._kernel_steps(static, 64 * 1024, 128, 128, False, None, 1)
    with pytest.raises(ValueError, match="SMEM"):
        mosaic_tpu._kernel_steps(static, 64 * 1024, 128, 128, False, jnp.zeros((2, 8, 128, 8), jnp.int32), 1)


def test_unsupported_reasons():
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    pattern = parse("dense")
    assert mosaic_tpu.unsupported_reason(q, q, q, pattern, interpret=True) is None
    assert mosaic_tpu.unsupported_reason(q, q, q, pattern, interpret=pltpu.InterpretParams()) is None
    assert "float16" in mosaic_tpu.unsupported_reason(q.astype(jnp.float16), q, q, pattern, interpret=True)
    if not ON_TPU:
        assert "TPU" in mosaic_tpu.unsupported_reason(q, q, q, pattern, interpret=False)
        with pytest.raises(ValueError, match="mosaic_tpu"):
            resolve_impl("mosaic_tpu", q, q, q, pattern)
    assert resolve_impl("mosaic_tpu", q, q, q, pattern, interpret=True) == ("mosaic_tpu", "requested")
    with pytest.raises(ValueError, match="block_sizes"):
        mosaic_tpu.attention(q, q, q, pattern, scale=1.0, interpret=True, block_sizes=(8, 8))


# ---------------------------------------------------------------------------------------------- TPU


@pytest.mark.skipif(not ON_TPU, reason="needs a TPU: the compiled Mosaic kernels at real sizes")
class TestTpu:
    @pytest.mark.parametrize("spec, seq_len, head_dim", HARDWARE_CASES, ids=[c[0] for c in HARDWARE_CASES])
    def test_bf16_default_tiles(self, spec, seq_len, head_dim):
        assert_matches_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, head_dim=head_dim,
                                 dtype=jnp.bfloat16, seed=seq_len + head_dim, interpret=False)

    def test_fp32_full_precision(self):
        assert_matches_reference("window(300) | sinks(8)", seq_len=1000, heads=2, kv_heads=1, head_dim=128,
                                 dtype=jnp.float32, seed=1, interpret=False)
