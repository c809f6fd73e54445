"""The Pallas Mosaic GPU kernels against the dense reference: forward and dq/dk/dv, on fresh random inputs.

On CPU the kernels run in Pallas' GPU interpreter (simulated warpgroups, TMA, barriers and wgmma) at tiny
sizes: 64-row tiles, the smallest a warpgroup's wgmma takes. The interpreter's wgmma reads only SMEM and
starts from zero, so there the kernels stage register operands in SMEM (`mosaic_gpu._accumulate`); the
hardware path is instead lowered to Mosaic GPU IR for sm90 on CPU (`test_hardware_path_lowers_for_sm90`),
which checks that every op, the pattern predicates included, has a Mosaic GPU lowering. Interpret-mode runs
happen in child processes (see INTERPRETER_ENV). On a GPU the same cases run compiled, in process, and
`TestGpu` adds real sizes on Hopper. Every case draws new inputs from its own seed.
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
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparse_attention.kernels import mosaic_gpu
from sparse_attention.attention import resolve_impl
from sparse_attention.patterns import parse
from kernel_oracle import (HARDWARE_CASES, assert_jit_vmap_grad_matches_reference, assert_matches_reference_on,
                           assert_plan_covers_pattern, assert_shard_map_matches_reference,
                           assert_topk_matches_reference, random_inputs, random_selection)

ON_GPU = jax.default_backend() == "gpu"
ON_HOPPER = ON_GPU and mosaic_gpu.unsupported_reason(
    jnp.zeros((1, 1, 1, 64), jnp.bfloat16), None, None, parse("dense"), interpret=False) is None
INTERPRET = not ON_GPU
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RTOL = {"bfloat16": 2e-2, "float16": 1e-2}
# Smallest tiles: forward and dq blocks own 2 x 64 query rows and stream 64-key tiles; dk/dv blocks own
# 2 x 64 keys and stream 64-query tiles. Two stages, so the SMEM rings wrap within a row. dq is computed in
# the dk/dv kernel at both head_dims (by default only where it measured faster: `fuses_dq`).
SMALL = mosaic_gpu.BlockSizes(block_q=64, block_k=64, block_q_dq=64, block_k_dq=64, block_k_dkv=64,
                              block_q_dkv=64, fused_dq=True)
# The GPU interpreter runs each simulated warpgroup as a compiled XLA computation on its own thread, and
# the warpgroups wait on each other inside host callbacks. XLA's CPU client runs some computations on a
# thread pool sized by the core count (PJRT_NPROC overrides it, read when the client starts); with 2
# cores, blocked warpgroups can fill the pool and deadlock the kernel. Interpret-mode runs therefore go to
# a child process whose pool has room for every warpgroup.
INTERPRETER_ENV = {"PJRT_NPROC": "16", "JAX_PLATFORMS": "cpu"}


def run_checked(check, **kwargs):
    """check(**kwargs) (a function of this module, JSON arguments): here on a GPU, else in a child process
    with INTERPRETER_ENV."""
    if ON_GPU:
        check(**kwargs)
        return
    script = (f"import json, sys; sys.path.insert(0, {TESTS_DIR!r}); import test_mosaic_gpu; "
              f"test_mosaic_gpu.{check.__name__}(**json.loads(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(kwargs)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT, **INTERPRETER_ENV), timeout=900,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


def block_sizes_from(sizes) -> mosaic_gpu.BlockSizes | None:
    """"small" -> SMALL, a dict -> BlockSizes(**dict), None -> the defaults."""
    if sizes == "small":
        return SMALL
    return None if sizes is None else mosaic_gpu.BlockSizes(**sizes)


def check_against_reference(spec, *, seq_len, heads=2, kv_heads=1, head_dim=64, dtype="bfloat16", batch=1,
                            block_sizes="small", scale=None, seed=0, interpret=INTERPRET, keyless_from=None,
                            detect_races=False):
    """Output and dq, dk, dv of the kernels against the float32 reference on the same rounded inputs.

    keyless_from: queries from there on see no key; their output and dq must be exactly 0.
    detect_races: run the interpreter's race detector, and require that it finds none.
    """
    pattern = parse(spec)
    q, k, v, d_out = random_inputs(seed, batch, seq_len, heads, kv_heads, head_dim, jnp.dtype(dtype))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if detect_races and interpret:
        interpret = plgpu.InterpretGPUParams(detect_races=True)
    sizes = block_sizes_from(block_sizes)
    got = assert_matches_reference_on(
        lambda q, k, v: mosaic_gpu.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                             block_sizes=sizes),
        pattern, (q, k, v, d_out), scale=scale, rtol=RTOL[dtype], label=spec)
    if keyless_from is not None:
        for name, g in zip(("out", "dq"), got[:2]):
            assert (np.asarray(g[:, keyless_from:], np.float32) == 0).all(), f"{name} of keyless queries"
    if detect_races and interpret:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

        assert not get_races().races_found, "the interpreter's race detector found a race"


def check_topk(spec, *, seq_len, heads, kv_heads, dtype, fused_dq=True, interpret=INTERPRET):
    """A topk pattern over a random device layout (the same chosen blocks for the reference): forward, and dq
    and dk/dv, whose blocks walk the choice's transpose built on the device."""
    sizes = dataclasses.replace(SMALL, fused_dq=fused_dq)
    assert_topk_matches_reference(
        lambda q, k, v, pattern, selected: mosaic_gpu.attention(q, k, v, pattern, scale=0.125, interpret=interpret,
                                                                block_sizes=sizes, selected=selected),
        spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=64, dtype=jnp.dtype(dtype),
        rtol=RTOL[dtype], scale=0.125)


def check_jit_vmap_grad(interpret=INTERPRET):
    assert_jit_vmap_grad_matches_reference(
        lambda q, k, v, pattern, scale: mosaic_gpu.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                                             block_sizes=SMALL),
        seq_len=100, spec="repaired(64, 8, prefix)", head_dim=64, dtype=jnp.bfloat16, scale=0.125,
        rtol=RTOL["bfloat16"])


def plan_kinds(spec, seq_len, sizes: mosaic_gpu.BlockSizes) -> tuple[bool, bool]:
    """Whether all three kernels' plans (forward, dq, dk/dv) have FULL tiles, and PARTIAL tiles."""
    pattern = parse(spec)
    plans = [mosaic_gpu.step_plan(pattern, seq_len, *sizes.forward_tile, False),
             mosaic_gpu.step_plan(pattern, seq_len, *sizes.dq_tile, False),
             mosaic_gpu.step_plan(pattern, seq_len, *sizes.dkdv_tile, True)]
    has_full = all(plan.num_full.sum() > 0 for plan in plans)
    has_partial = all(plan.num_partial.any() for plan in plans)
    return bool(has_full), bool(has_partial)


# (spec, seq_len, dtype, heads, kv_heads, whether FULL tiles exist: strided-like patterns have none). The
# patterns are scaled to the 128-row tiles of two warpgroups, so that FULL tiles exist at all.
PATTERN_CASES = [
    ("dense", 200, "bfloat16", 2, 1, True),
    ("block(256)", 300, "float16", 2, 2, True),
    ("block(256, 128)", 330, "bfloat16", 2, 1, True),  # the odd layers of shifted(256)
    ("window(200)", 300, "float16", 4, 2, True),
    ("repaired(256, 16, bridge)", 300, "bfloat16", 2, 1, True),
    ("repaired(256, 48, prefix)", 320, "float16", 2, 1, True),
    ("strided(5)", 150, "bfloat16", 2, 1, False),
    ("dilated(16, 3)", 170, "float16", 2, 1, False),
    ("sinks(128)", 200, "bfloat16", 2, 1, True),
    ("random_blocks(128, 1, 4)", 300, "float16", 2, 1, True),
    ("window(200) | sinks(4)", 300, "bfloat16", 3, 1, True),
    ("block(256) & strided(3)", 300, "float16", 2, 1, False),
]


@pytest.mark.parametrize("case", PATTERN_CASES, ids=[c[0] for c in PATTERN_CASES])
def test_pattern_matches_reference(case):
    spec, seq_len, dtype, heads, kv_heads, has_full = case
    assert plan_kinds(spec, seq_len, SMALL) == (has_full, True), "case must exercise its tile kinds"
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, heads=heads, kv_heads=kv_heads,
                seed=zlib.crc32(spec.encode()))


def test_head_dim_128_default_tiles_and_short_sequence():
    # Default tiles (a 128 x 128 forward tile, 2 stages at head_dim 128) on a sequence shorter than a tile.
    run_checked(check_against_reference, spec="window(30) | sinks(2)", seq_len=77, head_dim=128, block_sizes=None,
                seed=7)


def test_one_warpgroup_and_other_stage_counts():
    # One compute warpgroup (no ping-pong), one stage (no overlap) and three (the ring wraps mid-row).
    sizes = dict(block_q=64, block_k=64, warpgroups=1, stages=3, block_q_dq=64, block_k_dq=64, warpgroups_dq=1,
                 stages_dq=1, block_k_dkv=64, block_q_dkv=64, warpgroups_dkv=1, stages_dkv=3)
    assert plan_kinds("repaired(128, 32, bridge)", 300, mosaic_gpu.BlockSizes(**sizes)) == (True, True)
    run_checked(check_against_reference, spec="repaired(128, 32, bridge)", seq_len=300, dtype="float16",
                block_sizes=sizes, seed=13)


def test_persistent_kernels_with_one_row_buffer():
    # One warpgroup with 3 stages of 128 keys at head_dim 128 leaves no room for a second query buffer (on the
    # H200 it overflowed SMEM by 112 bytes), so each persistent row loads its queries at its start; so does
    # the fused dk/dv kernel its keys and values with 4 stages.
    sizes = dict(warpgroups=1, stages=3, warpgroups_dq=1, warpgroups_dkv=1, stages_dkv=4, persistent=True,
                 persistent_dkdv=True)
    queries, keys_values = 64 * 128 * 2, 2 * 3 * 128 * 128 * 2  # bytes: one warpgroup's, the 3-stage ring
    assert mosaic_gpu._resident_buffers(True, queries, keys_values, 64 * 4) == 1
    keys_values, ring, fused_dq = 2 * 64 * 128 * 2, 4 * 64 * (2 * 128 * 2 + 2 * 4), 2 * 64 * 64 * 2 + 64 * 128 * 4
    assert mosaic_gpu._resident_buffers(True, keys_values, ring, fused_dq) == 1
    run_checked(check_against_reference, spec="window(100) | sinks(3)", seq_len=300, head_dim=128,
                block_sizes=sizes, seed=19)


# Forward tiles of 128 keys, so that PARTIAL steps split into halves (`half_tile_codes`); between them, these
# cases give some warpgroup each code: no key (window(64)'s far edge, and rows past the end), one half, both.
HALF_TILE_CASES = [("window(64)", 300, "bfloat16", 2, 1), ("repaired(256, 16, bridge)", 300, "float16", 4, 2),
                   ("dense", 200, "bfloat16", 2, 1)]


@pytest.mark.parametrize("case", HALF_TILE_CASES, ids=[c[0] for c in HALF_TILE_CASES])
def test_half_tiles_match_reference(case):
    spec, seq_len, dtype, heads, kv_heads = case
    sizes = dict(dataclasses.asdict(SMALL), block_k=128)
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, heads=heads, kv_heads=kv_heads,
                block_sizes=sizes, seed=zlib.crc32(spec.encode()) + 2)


def test_half_tile_cases_give_every_code():
    codes = set()
    for spec, seq_len, *_ in HALF_TILE_CASES:
        plan = mosaic_gpu.step_plan(parse(spec), seq_len, 128, 128, False)
        halves = mosaic_gpu.half_tile_codes(parse(spec), seq_len, 64, 128, 2)
        steps = halves[plan.partial_steps]
        codes |= {int(code) >> (2 * warpgroup) & 3 for code in steps for warpgroup in (0, 1)}
    assert codes == {0, 1, 2, 3}


def test_pattern_cases_skip_steps_in_both_backward_kernels():
    # With SMALL's tiles (dq: 2 x 64 queries over 64 keys; dk/dv: 2 x 64 keys over 64 queries), the causal
    # diagonal leaves one warpgroup of each kernel without a pair in some PARTIAL steps, and windows the other,
    # so test_pattern_matches_reference runs both kernels' skipped steps (`empty_step_codes`) for each warpgroup.
    for by_key in (False, True):
        skipped = set()
        for spec, seq_len, *_ in PATTERN_CASES:
            plan = mosaic_gpu.step_plan(parse(spec), seq_len, *((64, 128) if by_key else (128, 64)), by_key)
            codes = mosaic_gpu.empty_step_codes(parse(spec), seq_len, 64, 64, 2, by_key)
            if mosaic_gpu.skips_empty_steps(None, plan, codes, 2):
                steps = codes[plan.partial_steps]
                skipped |= {warpgroup for warpgroup in (0, 1) if (steps >> warpgroup & 1 == 0).any()}
        assert skipped == {0, 1}


def test_empty_step_fraction_and_default():
    # dense at 1024 over dq tiles of 2 x 64 queries and 64 keys: query row r walks key tiles 0 to 2r + 1, and
    # its last one (the diagonal's upper half) is empty for warpgroup 0: 8 empty of 2 x 72 warpgroup steps.
    pattern = parse("dense")
    plan = mosaic_gpu.step_plan(pattern, 1024, 128, 64, False)
    codes = mosaic_gpu.empty_step_codes(pattern, 1024, 64, 64, 2, False)
    assert int((plan.num_full + plan.num_partial).sum()) == 72
    assert mosaic_gpu.empty_step_fraction(plan, codes, 2) == pytest.approx(8 / 144)
    assert mosaic_gpu.skips_empty_steps(None, plan, codes, 2)
    # At 32k dense leaves 0.2 % of its steps empty, below SKIP_MIN_FRACTION: it walks them all by default.
    long_plan = mosaic_gpu.step_plan(pattern, 32768, 128, 64, False)
    long_codes = mosaic_gpu.empty_step_codes(pattern, 32768, 64, 64, 2, False)
    assert mosaic_gpu.empty_step_fraction(long_plan, long_codes, 2) < mosaic_gpu.SKIP_MIN_FRACTION
    assert not mosaic_gpu.skips_empty_steps(None, long_plan, long_codes, 2)
    assert mosaic_gpu.skips_empty_steps(True, long_plan, long_codes, 2)
    assert not mosaic_gpu.skips_empty_steps(False, plan, codes, 2)
    assert not mosaic_gpu.skips_empty_steps(True, plan, None, 2)  # nothing to skip


@pytest.mark.parametrize("fused_dq", [True, False])
def test_whole_backward_steps(fused_dq):
    # skip_empty_steps off: every warpgroup multiplies every PARTIAL step, and its masked pairs give zeros.
    sizes = dict(dataclasses.asdict(SMALL), fused_dq=fused_dq, skip_empty_steps=False)
    run_checked(check_against_reference, spec="repaired(128, 32, bridge)", seq_len=300, dtype="bfloat16", heads=4,
                kv_heads=2, block_sizes=sizes, seed=23 + fused_dq)


# overlap_softmax: FULL forward steps issue each step's P V with the next step's Q Kᵀ. Rows of 2-5 FULL steps
# (the loop, its first and last step) and rows of none; two warpgroups with the ping-pong, persistent rows, and
# one warpgroup with one stage, whose K and V share the slot that the next K refills.
OVERLAP_CASES = [("dense", 300, "bfloat16", {}), ("window(300) | sinks(4)", 330, "float16", {"persistent": True}),
                 ("block(256)", 300, "bfloat16", {"warpgroups": 1, "stages": 1})]


@pytest.mark.parametrize("case", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_overlap_softmax(case):
    spec, seq_len, dtype, overrides = case
    sizes = dataclasses.replace(SMALL, overlap_softmax=True, **overrides)
    full_steps = mosaic_gpu.step_plan(parse(spec), seq_len, *sizes.forward_tile, False).num_full
    assert full_steps.max() >= 2 and full_steps.min() == 0
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, heads=4, kv_heads=2,
                block_sizes=dataclasses.asdict(sizes), seed=zlib.crc32(spec.encode()) + 5)


# Three forward warpgroups (192-row tiles, no ping-pong; sequences padded to 384 with the other tiles of 128):
# half tiles with the third warpgroup's codes, the overlapped softmax, persistent rows and one block per row.
THREE_WARPGROUP_CASES = [("window(300) | sinks(4)", 500, "bfloat16", {"block_k": 128, "overlap_softmax": True}),
                         ("repaired(256, 16, bridge)", 420, "float16", {"block_k": 128, "persistent": True}),
                         ("dense", 400, "bfloat16", {"overlap_softmax": False, "persistent": False})]


@pytest.mark.parametrize("case", THREE_WARPGROUP_CASES, ids=[c[0] for c in THREE_WARPGROUP_CASES])
def test_three_forward_warpgroups(case):
    spec, seq_len, dtype, overrides = case
    sizes = dataclasses.replace(SMALL, warpgroups=3, **overrides)
    assert sizes.forward_tile[0] == 192 and mosaic_gpu._forward_memory_registers(3) == 24
    assert mosaic_gpu._compute_registers(3, mosaic_gpu._forward_memory_registers(3)) == 160
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, heads=4, kv_heads=2,
                block_sizes=dataclasses.asdict(sizes), seed=zlib.crc32(spec.encode()) + 7)


# late_prefetch: persistent forward and dq blocks issue the next row's loads after the row's first step: in the
# overlapped FULL loop, after a first PARTIAL step (rows without FULL steps), after a first FULL step walked
# one by one, and at the end of rows without any step (queries >= 5 of sinks(4) & window(2) see no key).
LATE_PREFETCH_CASES = [("window(300) | sinks(4)", 330, "float16", {"overlap_softmax": True}),
                       ("block(256)", 300, "bfloat16", {"overlap_softmax": False}),
                       ("sinks(4) & window(2)", 300, "bfloat16", {})]


@pytest.mark.parametrize("case", LATE_PREFETCH_CASES, ids=[c[0] for c in LATE_PREFETCH_CASES])
def test_late_prefetch(case):
    spec, seq_len, dtype, overrides = case
    sizes = dataclasses.replace(SMALL, late_prefetch=True, persistent=True, fused_dq=False, persistent_dq=True,
                                **overrides)
    plan = mosaic_gpu.step_plan(parse(spec), seq_len, *sizes.forward_tile, False)
    rows_per_block = -(-len(plan.rows) * 2 // mosaic_gpu.INTERPRET_BLOCKS)  # 2 heads
    assert rows_per_block >= 2, "blocks must walk several rows, so that prefetches happen"
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, block_sizes=dataclasses.asdict(sizes),
                keyless_from=5 if "&" in spec else None, detect_races=spec == "block(256)",
                seed=zlib.crc32(spec.encode()) + 11)


def test_three_warpgroups_only_in_the_forward():
    with pytest.raises(ValueError, match="warpgroups_dkv must be 1 to 2"):
        mosaic_gpu.BlockSizes(warpgroups_dkv=3)
    with pytest.raises(ValueError, match="warpgroups must be 1 to 3"):
        mosaic_gpu.BlockSizes(warpgroups=4)


@pytest.mark.parametrize("overlaps", [dict(fused_dq=True, overlap_dkdv=True),
                                      dict(fused_dq=False, overlap_dq=True, overlap_dkdv=True),
                                      dict(fused_dq=False, overlap_dq=True)], ids=["fused", "both", "dq"])
def test_overlap_backward(overlaps):
    # overlap_dq, overlap_dkdv: the dq or dk/dv kernel issues a step's S and dP products at once; FULL and PARTIAL
    # steps, GQA (the dk/dv steps walk both q heads of a kv head), skipped empty steps.
    sizes = dataclasses.replace(SMALL, **overlaps)
    run_checked(check_against_reference, spec="window(300) | sinks(4)", seq_len=330, dtype="bfloat16", heads=4,
                kv_heads=2, block_sizes=dataclasses.asdict(sizes), seed=43 + len(overlaps))


def test_defer_backward_waits_default():
    # Deferred where the dk/dv kernel runs one block per row (it won there) and not where it is persistent (it
    # lost); the memory warpgroup gives up 16 registers only where the fused dq's product joins the deferred ones.
    assert mosaic_gpu.defers_backward_waits(None, False) and not mosaic_gpu.defers_backward_waits(None, True)
    assert mosaic_gpu.defers_backward_waits(True, True) and not mosaic_gpu.defers_backward_waits(False, False)
    registers = {(fused, deferred): mosaic_gpu._compute_registers(2, mosaic_gpu._dkdv_memory_registers(fused, deferred))
                 for fused in (True, False) for deferred in (True, False)}
    assert registers == {(True, True): 240, (True, False): 232, (False, True): 232, (False, False): 232}


def test_overlap_dq_default():
    # The separate dq kernel overlaps its products where it runs one block per row (it won there) and not where it
    # is persistent (level); the dk/dv kernel's overlap lost everywhere measured and stays off.
    assert mosaic_gpu.overlaps_dq(None, False) and not mosaic_gpu.overlaps_dq(None, True)
    assert mosaic_gpu.overlaps_dq(True, True) and not mosaic_gpu.overlaps_dq(False, False)
    assert mosaic_gpu.BlockSizes().overlap_dkdv is False


def test_late_prefetch_default():
    # Late where the forward overlaps its softmax (head_dim 128 with two warpgroups: it won there), not where its
    # steps run one by one (head_dim 64 with two: it lost).
    overlapped = mosaic_gpu.overlaps_softmax(None, 128, 2)
    assert overlapped and mosaic_gpu.prefetches_late(None, overlapped)
    assert not mosaic_gpu.prefetches_late(None, mosaic_gpu.overlaps_softmax(None, 64, 2))
    assert mosaic_gpu.prefetches_late(True, False) and not mosaic_gpu.prefetches_late(False, True)


def test_overlap_softmax_default():
    # By default where it measured faster: head_dim 128 with two warpgroups (or one), 64 with three.
    assert mosaic_gpu.overlaps_softmax(None, 128, 2) and not mosaic_gpu.overlaps_softmax(None, 64, 2)
    assert mosaic_gpu.overlaps_softmax(None, 64, 3) and not mosaic_gpu.overlaps_softmax(None, 128, 3)
    assert mosaic_gpu.overlaps_softmax(None, 128, 1)
    assert mosaic_gpu.overlaps_softmax(True, 64, 2) and not mosaic_gpu.overlaps_softmax(False, 128, 2)


@pytest.mark.parametrize("spec, seq_len, wide", [
    ("dense", 32768, True), ("dense", 16384, False),  # 127.5 and 63.5 FULL steps per row on average
    ("window(1024)", 32768, False), ("strided(64)", 32768, False),  # long rows, all masked
    ("window(16384)", 65536, True), ("topk(512, 2) | dense", 32768, False)])
def test_three_forward_warpgroups_by_default_on_long_unmasked_rows(spec, seq_len, wide):
    sizes = mosaic_gpu.BlockSizes.for_head_dim(64, parse(spec), seq_len)
    assert sizes.warpgroups == (3 if wide else 2) and sizes.stages == 3
    assert mosaic_gpu.BlockSizes.for_head_dim(128, parse(spec), seq_len).warpgroups == sizes.warpgroups
    assert mosaic_gpu.BlockSizes.for_head_dim(64).warpgroups == 2
    with pytest.raises(ValueError, match="pattern and seq_len together"):
        mosaic_gpu.BlockSizes.for_head_dim(64, parse(spec))


def test_rows_without_keys_give_zero_and_finite_grads():
    # sinks(4) & window(2): queries >= 5 see no key at all.
    run_checked(check_against_reference, spec="sinks(4) & window(2)", seq_len=100, keyless_from=5, seed=11)


@pytest.mark.parametrize("spec, seq_len, dtype, heads, kv_heads, persistent", [
    ("block(256, 128)", 330, "float16", 4, 2, False), ("repaired(256, 48, prefix)", 320, "bfloat16", 2, 1, False),
    ("window(200) | sinks(4)", 300, "bfloat16", 4, 2, True)])
def test_separate_dq_kernel(spec, seq_len, dtype, heads, kv_heads, persistent):
    # persistent: the dq and dk/dv kernels' 3 blocks walk 12 and 6 rows
    sizes = dict(dataclasses.asdict(SMALL), fused_dq=False, persistent_dq=persistent, persistent_dkdv=persistent)
    run_checked(check_against_reference, spec=spec, seq_len=seq_len, dtype=dtype, heads=heads, kv_heads=kv_heads,
                block_sizes=sizes, seed=zlib.crc32(spec.encode()) + 1)


@pytest.mark.parametrize("persistent", [True, False])
def test_batch_and_negative_scale(persistent):
    # A negative scale takes the forward's scale-then-max path on full tiles too. Persistent, the forward's
    # INTERPRET_BLOCKS (3) blocks walk the 8 rows (2 query tiles x 2 heads x batch 2) 3, 3 and 2, and the fused
    # dk/dv kernel's its 4 (2 key tiles x 1 kv head x batch 2); else one block per row.
    run_checked(check_against_reference, spec="block(256)", seq_len=140, batch=2, scale=-0.3, seed=17,
                block_sizes=dict(dataclasses.asdict(SMALL), persistent=persistent, persistent_dkdv=persistent))


@pytest.mark.parametrize("persistent", [True, False])
def test_heads_fastest(persistent):
    # Rows dealt out with (heads, batch) fastest: 3 query tiles x 4 q heads x batch 2 for the forward and dq
    # (GQA: 2 kv heads), 3 key tiles x 2 kv heads x batch 2 for dk/dv; persistent, over 3 blocks.
    sizes = dict(dataclasses.asdict(SMALL), heads_fastest=True, fused_dq=False, persistent=persistent,
                 persistent_dq=persistent, persistent_dkdv=persistent)
    run_checked(check_against_reference, spec="sinks(8) | window(100)", seq_len=330, heads=4, kv_heads=2, batch=2,
                seed=31, block_sizes=sizes)


def test_heads_fastest_default():
    # By default only kernels of one block per row whose longest row is far longer than the mean launch heads
    # fastest: at 32k sinks(64) | window(1024)'s dk/dv kernel (the sink keys' row walks 512 steps, 20 on
    # average), not its dq kernel, nor dense's (2x) or window(1024)'s; persistent kernels never by default.
    sinks, dense = parse("sinks(64) | window(1024)"), parse("dense")
    dkdv = mosaic_gpu.step_plan(sinks, 32768, 64, 128, True)
    assert mosaic_gpu.deals_heads_fastest(None, False, dkdv)
    assert not mosaic_gpu.deals_heads_fastest(None, True, dkdv)
    assert not mosaic_gpu.deals_heads_fastest(None, False, mosaic_gpu.step_plan(sinks, 32768, 128, 64, False))
    assert not mosaic_gpu.deals_heads_fastest(None, False, mosaic_gpu.step_plan(dense, 32768, 64, 128, True))
    assert mosaic_gpu.deals_heads_fastest(True, True, dkdv)
    assert not mosaic_gpu.deals_heads_fastest(False, False, dkdv)


def test_no_races():
    """The interpreter's race detector finds no unsynchronised SMEM access in the pipeline (ring slots,
    ping-pong, staging, the fused dq's double buffer, the persistent kernels' row buffers). The interpreter
    also fails any kernel in which a warpgroup that waits on a barrier misses one of its phases, in every
    test.

    In interpret mode the fused dq's reduce-add is a load, an add and a store in GMEM; the detector, which
    does not order thread blocks that the interpreter runs one after another, reports two blocks adding to
    one query tile as a race. So the many-blocks-per-tile case runs the separate dq kernel, and the fused one
    runs block-local (each query tile's dq comes from one dk/dv block, through both of its warpgroups)."""
    run_checked(check_against_reference, spec="window(200) | strided(9)", seq_len=260, dtype="float16",
                detect_races=True, seed=19,
                block_sizes=dict(dataclasses.asdict(SMALL), fused_dq=False, persistent_dq=True,
                                 persistent_dkdv=True))
    # head_dim 64: the warpgroups take turns adding dq's whole tile; 128: each adds its own columns.
    for head_dim in (64, 128):  # dk/dv persistent at 64, one block per row at 128
        run_checked(check_against_reference, spec="block(128)", seq_len=256, heads=4, kv_heads=2, dtype="bfloat16",
                    head_dim=head_dim, detect_races=True, seed=23,
                    block_sizes=dict(dataclasses.asdict(SMALL), persistent_dkdv=head_dim == 64))


def test_jit_vmap_grad():
    run_checked(check_jit_vmap_grad)


# --------------------------------------------------------------------------- the hardware path, lowered


# topk: (spec, seq_len, heads, kv_heads, dtype, fused_dq). SMALL's tiles make a block a multiple of 128.
TOPK_CASES = [
    ("topk(128, 2)", 400, 2, 1, "bfloat16", True),
    ("topk(128, 1) | repaired(128, 16, prefix)", 300, 4, 2, "float16", True),  # unaligned length, GQA
    ("topk(128, 1) | repaired(128, 16, bridge)", 300, 4, 2, "bfloat16", False),  # the separate dq kernel
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=[f"{c[0]} fused_dq={c[5]}" for c in TOPK_CASES])
def test_topk_over_random_device_layouts(case):
    spec, seq_len, heads, kv_heads, dtype, fused_dq = case
    run_checked(check_topk, spec=spec, seq_len=seq_len, heads=heads, kv_heads=kv_heads, dtype=dtype,
                fused_dq=fused_dq)


def test_topk_refusals(interpreter_pool, monkeypatch):
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    # The default tiles' sides have an lcm of 128: a block of 64 cannot be walked in whole tiles.
    assert "not a multiple of every tile side" in mosaic_gpu.unsupported_reason(q, q, q, parse("topk(64, 1)"),
                                                                               interpret=True)
    assert mosaic_gpu.unsupported_reason(q, q, q, parse("topk(128, 1)"), interpret=True) is None
    # On a GPU, auto takes mosaic_gpu for a topk pattern whose block it can walk, else the next in line.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto", q, q, q, "topk(128, 1)", interpret=True)[0] == "mosaic_gpu"
    chosen, why = resolve_impl("auto", q, q, q, "topk(64, 1)", interpret=True)
    assert chosen != "mosaic_gpu" and "mosaic_gpu: topk(64, 1)'s block 64 is not a multiple" in why
    assert resolve_impl("mosaic_gpu", q, q, q, "topk(128, 1)", interpret=True) == ("mosaic_gpu", "requested")
    with pytest.raises(ValueError, match="block 128 is not a multiple of every tile side"):
        mosaic_gpu.attention(q, q, q, parse("topk(128, 1)"), scale=1.0, interpret=True,
                             block_sizes=mosaic_gpu.BlockSizes(block_k=192), selected=random_selection(0, 1, 2, 2, 1))
    with pytest.raises(ValueError, match="selected must be given exactly for patterns with a topk part"):
        mosaic_gpu.attention(q, q, q, parse("topk(128, 1)"), scale=1.0, interpret=True)


LOWERING_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, jax.export, jax.numpy as jnp
    from sparse_attention.kernels import mosaic_gpu
    from sparse_attention.patterns import parse
    # Lowering needs no GPU: skip the device check so that the hardware kernels (not interpret mode) lower.
    mosaic_gpu._platform_reason = lambda interpret: None
    results = {}
    for spec, head_dim, dtype, overrides in json.loads(sys.argv[1]):
        pattern = parse(spec)
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), **overrides)
        q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), jnp.dtype(dtype))
        kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), jnp.dtype(dtype))
        # A topk pattern's choice is an input: [batch, kv_heads, query blocks, K].
        topk = pattern.block_selection()
        selected = None if topk is None else jax.ShapeDtypeStruct((2, 2, -(-1000 // topk.size), topk.count), jnp.int32)
        def run(q, k, v, d_out, selected):
            out, vjp = jax.vjp(lambda q, k, v: mosaic_gpu.attention(q, k, v, pattern, scale=0.1, selected=selected,
                                                                    block_sizes=sizes), q, k, v)
            return (out, *vjp(d_out))
        module = jax.export.export(jax.jit(run), platforms=["cuda"])(q, kv, kv, q, selected).mlir_module()
        results[f"{spec} {overrides}"] = module.count("custom_call @mosaic_gpu")
    print(json.dumps(results))
    """
)

# (spec, head_dim, dtype, BlockSizes overrides): the fused backward everywhere, the separate dq kernel on three.
# At 1,000 tokens the rows are short, so the kernels run persistent by default, except dk/dv on dense and
# strided(7) (two q heads per kv head); forced persistent dk/dv on four (with two dk/dv buffers, at head_dim
# 64, and one, at 128), one forward block per row on one, and one dq block per row on dense; the forward's
# overlapped softmax (`overlap_softmax`) on two, one of them with one compute warpgroup, with the backward's
# overlapped products (`overlap_dq`, `overlap_dkdv`), fused and separate. The dk/dv kernel defers its waits
# (`defer_backward_waits`) by default where it is not persistent (dense, strided(7)); explicitly also persistent
# with whole dq tiles and with the separate dq, and not on a fused dense with the overlapped products. Three
# forward warpgroups on two, with and without the overlapped softmax.
FUSED, SEPARATE = {"fused_dq": True}, {"fused_dq": False, "persistent_dq": False}
SEPARATE_PERSISTENT = {"fused_dq": False, "persistent_dq": True, "persistent_dkdv": True}
FUSED_PERSISTENT = {"fused_dq": True, "persistent_dkdv": True}
LOWERED_CASES = [
    ("dense", 64, "bfloat16", FUSED), ("block(256, 128)", 128, "float16", FUSED),
    ("window(300)", 64, "float16", FUSED_PERSISTENT), ("repaired(256, 32, bridge)", 128, "bfloat16", FUSED_PERSISTENT),
    ("repaired(256, 32, prefix)", 64, "bfloat16", FUSED), ("strided(7)", 128, "float16", FUSED),
    ("dilated(64, 3)", 64, "bfloat16", FUSED), ("sinks(4)", 64, "float16", FUSED),
    ("random_blocks(128, 2, 5)", 128, "bfloat16", dict(FUSED, persistent=False)),
    ("window(300) | sinks(4) & strided(2)", 64, "bfloat16", FUSED),
    ("topk(256, 2) | repaired(256, 32, bridge)", 128, "bfloat16", FUSED),
    ("dense", 128, "bfloat16", SEPARATE), ("repaired(256, 32, bridge)", 64, "float16", SEPARATE_PERSISTENT),
    ("dense", 128, "bfloat16", dict(FUSED, overlap_softmax=True, overlap_dkdv=True)),
    ("window(300)", 64, "float16",
     dict(SEPARATE, overlap_softmax=True, warpgroups=1, overlap_dq=True, overlap_dkdv=True)),
    ("topk(256, 2) | repaired(256, 32, bridge)", 128, "bfloat16", SEPARATE_PERSISTENT),
    ("window(300) | sinks(4)", 64, "bfloat16", dict(FUSED_PERSISTENT, defer_backward_waits=True)),
    ("dense", 128, "float16", dict(FUSED, overlap_dkdv=True, defer_backward_waits=False)),
    ("repaired(256, 32, prefix)", 128, "bfloat16", dict(SEPARATE, defer_backward_waits=True)),
    ("dense", 64, "bfloat16", dict(FUSED, warpgroups=3, overlap_softmax=True)),
    ("window(300)", 64, "float16", dict(FUSED, warpgroups=3)),
    ("window(300) | sinks(4)", 128, "bfloat16", dict(SEPARATE_PERSISTENT, persistent=True, late_prefetch=True)),
]


def test_hardware_path_lowers_for_sm90():
    """Forward and backward with wgmma from registers and in-place accumulators, lowered through Pallas'
    Mosaic GPU lowering and Mosaic's layout inference for sm90 (no ptxas: that needs the GPU)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", LOWERING_SCRIPT, json.dumps(LOWERED_CASES)], env=env,
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    # Mosaic GPU custom calls per case: forward and dk/dv, and a dq kernel unless dk/dv computes dq.
    assert counts == {f"{spec} {sizes}": 2 if sizes["fused_dq"] else 3 for spec, _, _, sizes in LOWERED_CASES}


# ------------------------------------------------------------------------------------- plans and API


@pytest.mark.parametrize("spec", ["dense", "window(40)", "repaired(64, 16, bridge)", "strided(5)",
                                  "random_blocks(32, 2, 3)", "sinks(4) & window(2)"])
@pytest.mark.parametrize("by_key", [False, True])
def test_step_plan_lists_full_then_partial_tiles_covering_each_pair_once(spec, by_key):
    pattern, seq_len, tile_q, tile_k = parse(spec), 300, 128, 64
    plan = mosaic_gpu.step_plan(pattern, seq_len, tile_q, tile_k, by_key)
    tiles, counts = plan.steps
    row_tile, col_tile = (tile_k, tile_q) if by_key else (tile_q, tile_k)
    padded = -(-seq_len // 128) * 128
    covered = np.zeros((padded, padded), np.int32)  # [row position, column position] in the plan's frame
    full_only = np.zeros_like(covered, dtype=bool)
    for block, row in enumerate(plan.rows):
        rows = slice(row * row_tile, (row + 1) * row_tile)
        num_full, num_steps = counts[block]
        if all(plan.contiguous):
            first_full, first_partial = tiles[block]
            steps = np.concatenate([first_full + np.arange(num_full), first_partial + np.arange(num_steps - num_full)])
        else:
            steps = tiles[block, :num_steps]
        for step, col in enumerate(steps):
            covered[rows, col * col_tile : (col + 1) * col_tile] += 1
            if step < num_full:
                full_only[rows, col * col_tile : (col + 1) * col_tile] = True
    assert_plan_covers_pattern(covered, full_only, pattern, seq_len, by_key, plan.rows)


def test_pattern_cases_walk_both_plan_forms():
    """Some kernel case below has contiguous plans (first tiles only) and some explicit tile lists."""
    forms = {all(mosaic_gpu.step_plan(parse(spec), seq_len, *tile, by_key).contiguous)
             for spec, seq_len, *_ in PATTERN_CASES
             for tile, by_key in ((SMALL.forward_tile, False), (SMALL.dq_tile, False), (SMALL.dkdv_tile, True))}
    assert forms == {False, True}


@pytest.mark.parametrize("by_key", [False, True])
def test_dense_plan_at_one_million_tokens_stores_first_tiles_only(by_key):
    seq_len, tile_q, tile_k = 1 << 20, 128, 64
    plan = mosaic_gpu.step_plan(parse("dense"), seq_len, tile_q, tile_k, by_key)
    tiles, counts = plan.steps
    assert all(plan.contiguous) and tiles.shape == (len(plan.rows), 2)
    # Heaviest row first: the last query tile sees every key tile (the diagonal's two are partial); the
    # first key tile is seen by every query tile (the diagonal one partially).
    if by_key:
        assert plan.rows[0] == 0 and list(counts[0]) == [seq_len // tile_q - 1, seq_len // tile_q]
        assert list(tiles[0]) == [1, 0]
    else:
        assert plan.rows[0] == seq_len // tile_q - 1
        assert list(counts[0]) == [seq_len // tile_k - 2, seq_len // tile_k]
        assert list(tiles[0]) == [0, seq_len // tile_k - 2]


PIECE_CODE_SPECS = ["dense", "window({})", "block({}, 7)", "repaired({}, 16, bridge)", "repaired({}, 40, prefix)",
                    "sinks(3) | window({})", "strided(5)", "dilated({}, 2)", "random_blocks(64, 1, 3)",
                    "block({}) & strided(3)"]


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(PIECE_CODE_SPECS), size=st.integers(40, 300), seq_len=st.integers(1, 700),
       warpgroups=st.integers(1, 2), pieces=st.sampled_from([1, 2]), by_key=st.booleans())
def test_piece_codes_match_the_mask(spec, size, seq_len, warpgroups, pieces, by_key):
    """Each PARTIAL step's code has warpgroup w's bit for a piece exactly where one of its 64 rows (queries, or
    keys `by_key`) pairs with one of the piece's columns in the mask; None only where every bit of every step
    is set. half_tile_codes (2 pieces of 128 keys) and empty_step_codes (1 piece) are its two uses."""
    pattern = parse(spec.format(size))
    part, column_tile = 64, 128
    tile = (column_tile, warpgroups * part) if by_key else (warpgroups * part, column_tile)
    plan = mosaic_gpu.step_plan(pattern, seq_len, *tile, by_key)
    padded = -(-seq_len // 128) * 128  # a multiple of every tile side here
    positions = np.arange(padded)
    mask = pattern.mask(positions[:, None], positions[None, :]) & (positions[:, None] < seq_len) & (
        positions[None, :] < seq_len)
    if by_key:
        mask = mask.T  # [keys, queries]: rows are the kernel's rows
    piece = column_tile // pieces
    expected = np.zeros(plan.partial_tiles.shape, np.int64)
    for program, row in enumerate(plan.rows):
        for step in range(plan.num_partial[program]):
            tile_start = plan.partial_tiles[program, step] * column_tile
            for warpgroup in range(warpgroups):
                rows = slice((row * warpgroups + warpgroup) * part, (row * warpgroups + warpgroup + 1) * part)
                for index in range(pieces):
                    columns = slice(tile_start + index * piece, tile_start + (index + 1) * piece)
                    expected[program, step] |= int(mask[rows, columns].any()) << (pieces * warpgroup + index)
    codes = mosaic_gpu.piece_codes(pattern, seq_len, part, column_tile, warpgroups, pieces, by_key)
    steps = np.arange(expected.shape[1])[None, :] < plan.num_partial[:, None]
    if codes is None:
        assert (expected[steps] == (1 << pieces * warpgroups) - 1).all()
    else:
        np.testing.assert_array_equal(codes[steps], expected[steps])


def test_half_tile_and_empty_step_codes_are_piece_codes():
    pattern = parse("window(200)")
    np.testing.assert_array_equal(mosaic_gpu.half_tile_codes(pattern, 700, 64, 128, 2),
                                  mosaic_gpu.piece_codes(pattern, 700, 64, 128, 2, 2, False))
    assert mosaic_gpu.half_tile_codes(pattern, 700, 64, 64, 2) is None  # 64-key tiles do not split
    np.testing.assert_array_equal(mosaic_gpu.empty_step_codes(pattern, 700, 64, 64, 2, True),
                                  mosaic_gpu.piece_codes(pattern, 700, 64, 64, 2, 1, True))


@pytest.fixture
def interpreter_pool(monkeypatch):
    """The thread pool the interpreter asks for, as these tests see it. They validate and trace only, never
    run the interpreter, so this process's real pool size does not matter to them."""
    monkeypatch.setenv("PJRT_NPROC", INTERPRETER_ENV["PJRT_NPROC"])


def test_block_sizes_validation_and_defaults(interpreter_pool):
    with pytest.raises(ValueError, match="block_q"):
        mosaic_gpu.BlockSizes(block_q=32)
    with pytest.raises(ValueError, match="block_k_dkv"):
        mosaic_gpu.BlockSizes(block_k_dkv=320)
    with pytest.raises(ValueError, match="warpgroups"):
        mosaic_gpu.BlockSizes(warpgroups=4)
    with pytest.raises(ValueError, match="stages_dq"):
        mosaic_gpu.BlockSizes(stages_dq=0)
    with pytest.raises(ValueError, match="fused_dq must be True, False or None, got 1"):
        mosaic_gpu.BlockSizes(fused_dq=1)
    assert mosaic_gpu.BlockSizes.for_head_dim(64).stages == 3
    assert mosaic_gpu.BlockSizes().forward_tile == (128, 128)
    assert mosaic_gpu.BlockSizes().sequence_multiple == 128
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_sizes"):
        mosaic_gpu.attention(q, q, q, "dense", scale=1.0, interpret=True, block_sizes={"block_q": 64})


def test_persistent_forward_where_it_measured_faster():
    """By default the forward runs one block per SM where its rows walk fewer than 64 steps on average (at
    32k: block(512) 2.5, window(1024) 9), and one block per row on dense (128); an explicit choice wins."""
    sizes = mosaic_gpu.BlockSizes()

    def persistent(spec, block_sizes=sizes):
        plan = mosaic_gpu.step_plan(parse(spec), 32768, *block_sizes.forward_tile, False)
        return mosaic_gpu.persists(block_sizes, plan)

    assert persistent("block(512)") and persistent("window(1024)") and persistent("repaired(512, 64, prefix)")
    assert not persistent("dense")
    assert persistent("dense", dataclasses.replace(sizes, persistent=True))
    assert not persistent("block(512)", dataclasses.replace(sizes, persistent=False))


def test_persistent_backward_where_it_measured_faster():
    """By default the dq and dk/dv kernels run one block per SM where their blocks walk fewer than 16 steps on
    average (at 32k: block(512) 5, and 20 for dk/dv with 4 q heads per kv head; window(1024) 18); an explicit
    choice wins."""
    sizes = mosaic_gpu.BlockSizes()

    def persistent(spec, tile, by_key, repeats=1, choice=None):
        plan = mosaic_gpu.step_plan(parse(spec), 32768, *tile, by_key)
        return mosaic_gpu.persists_backward(choice, plan, repeats)

    for tile, by_key in ((sizes.dq_tile, False), (sizes.dkdv_tile, True)):
        assert persistent("block(512)", tile, by_key) and persistent("repaired(512, 64, bridge)", tile, by_key)
        assert not persistent("window(1024)", tile, by_key) and not persistent("dense", tile, by_key)
        assert persistent("dense", tile, by_key, choice=True)
        assert not persistent("block(512)", tile, by_key, choice=False)
    assert not persistent("block(512)", sizes.dkdv_tile, True, repeats=4)


def test_fused_dq_where_it_measured_faster():
    """By default dq is computed in the dk/dv kernel at head_dim 64, and at 128 only where a dk/dv block walks
    at least 64 steps on average (dense at 32k: 257 steps; window(1024): 18 per q head, so 71 with 4 q heads
    per kv head); an explicit fused_dq wins."""
    sizes = mosaic_gpu.BlockSizes()

    def fused(spec, head_dim, group=1, block_sizes=sizes):
        plan = mosaic_gpu.step_plan(parse(spec), 32768, *block_sizes.dkdv_tile, True)
        return mosaic_gpu.fuses_dq(block_sizes, head_dim, group, plan)

    assert fused("block(512)", 64) and fused("window(1024)", 64)
    assert fused("dense", 128) and not fused("window(1024)", 128) and not fused("block(512)", 128)
    assert fused("window(1024)", 128, group=4) and not fused("block(512)", 128, group=4)
    assert fused("block(512)", 128, block_sizes=dataclasses.replace(sizes, fused_dq=True))
    assert not fused("dense", 64, block_sizes=dataclasses.replace(sizes, fused_dq=False))


def test_unsupported_reasons(interpreter_pool, monkeypatch):
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    pattern = parse("dense")
    assert mosaic_gpu.unsupported_reason(q, q, q, pattern, interpret=True) is None
    if not ON_GPU:
        monkeypatch.setenv("PJRT_NPROC", "4")
        assert "PJRT_NPROC=16" in mosaic_gpu.unsupported_reason(q, q, q, pattern, interpret=True)
        monkeypatch.setenv("PJRT_NPROC", INTERPRETER_ENV["PJRT_NPROC"])
    assert "dtype" in mosaic_gpu.unsupported_reason(q.astype(jnp.float32), q, q, pattern, interpret=True)
    assert "head_dim" in mosaic_gpu.unsupported_reason(q[..., :32], q, q, pattern, interpret=True)
    assert resolve_impl("mosaic_gpu", q, q, q, pattern, interpret=True) == ("mosaic_gpu", "requested")
    if not ON_GPU:
        assert "compute capability >= 9.0" in mosaic_gpu.unsupported_reason(q, q, q, pattern, interpret=False)
        with pytest.raises(ValueError, match="mosaic_gpu"):
            mosaic_gpu.attention(q, q, q, pattern, scale=1.0)
        assert resolve_impl("auto", q, q, q, pattern)[0] == "xla"


def test_shard_map_types_check():
    """Under shard_map with check_vma, forward and backward type-check (kernel results are marked varying).
    Traced only: the GPU interpreter does not run under shard_map over several host devices."""
    script = textwrap.dedent(
        """
        import json
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from sparse_attention.kernels import mosaic_gpu
        mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "heads"))
        spec = P("data", None, "heads", None)
        attend = lambda q, k, v: mosaic_gpu.attention(q, k, v, "window(70)", scale=0.1, interpret=True)
        sharded = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(sharded, q, k, v)
            return (out, *vjp(d_out))
        q = jax.ShapeDtypeStruct((2, 100, 4, 64), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2, 100, 2, 64), jnp.bfloat16)
        print(json.dumps([x.shape for x in jax.jit(run).trace(q, kv, kv, q).out_info]))
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               **INTERPRETER_ENV)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    assert shapes == [[2, 100, 4, 64], [2, 100, 4, 64], [2, 100, 2, 64], [2, 100, 2, 64]]


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not ON_HOPPER, reason="needs a CUDA GPU with compute capability >= 9.0: the compiled "
                                          "Mosaic GPU kernels at real sizes")
class TestGpu:
    @pytest.mark.parametrize("spec, seq_len, head_dim", HARDWARE_CASES, ids=[c[0] for c in HARDWARE_CASES])
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_default_tiles(self, spec, seq_len, head_dim, dtype):
        check_against_reference(spec, seq_len=seq_len, heads=4, kv_heads=2, head_dim=head_dim, dtype=dtype,
                                block_sizes=None, seed=seq_len + head_dim, interpret=False)

    def test_one_warpgroup_and_other_stage_counts(self):
        sizes = dict(warpgroups=1, stages=3, warpgroups_dq=1, stages_dq=1, warpgroups_dkv=1, stages_dkv=3)
        check_against_reference("repaired(256, 64, bridge)", seq_len=2000, heads=4, kv_heads=2, head_dim=128,
                                block_sizes=sizes, seed=3, interpret=False)

    @pytest.mark.parametrize("spec, head_dim, fused_dq", [
        ("window(1024)", 128, False), ("repaired(512, 64, bridge)", 64, False),  # the separate dq kernel
        ("dense", 128, True), ("repaired(512, 64, bridge)", 128, True)])  # fused, short rows at 128 included
    def test_explicit_fused_dq(self, spec, head_dim, fused_dq):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), fused_dq=fused_dq)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=29, interpret=False)

    @pytest.mark.parametrize("spec, head_dim", [("dense", 128), ("window(1024)", 64),
                                                ("repaired(512, 64, prefix)", 128)])
    def test_overlap_softmax(self, spec, head_dim):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), overlap_softmax=True)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=37, interpret=False)

    @pytest.mark.parametrize("spec, head_dim, overrides", [
        ("dense", 64, {"overlap_softmax": True}), ("window(1024)", 64, {"overlap_softmax": False}),
        ("repaired(512, 64, prefix)", 64, {"persistent": True})])
    def test_three_forward_warpgroups(self, spec, head_dim, overrides):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), warpgroups=3, **overrides)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=59, interpret=False)

    @pytest.mark.parametrize("spec, head_dim, overlaps", [
        ("dense", 128, {"fused_dq": True, "overlap_dkdv": True}),
        ("window(1024)", 128, {"fused_dq": False, "overlap_dq": True, "overlap_dkdv": True}),
        ("repaired(512, 64, prefix)", 128, {"fused_dq": False, "overlap_dq": True}),
        ("repaired(512, 64, bridge)", 64, {"fused_dq": True, "overlap_dkdv": True})])
    def test_overlap_backward(self, spec, head_dim, overlaps):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), **overlaps)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=47, interpret=False)

    @pytest.mark.parametrize("spec, head_dim, overrides", [
        ("dense", 128, {"fused_dq": True}), ("window(1024) | sinks(64)", 64, {"fused_dq": True}),  # split, whole dq
        ("repaired(512, 64, prefix)", 128, {"fused_dq": False}),
        ("window(1024)", 128, {"fused_dq": True, "overlap_dkdv": True})])
    def test_defer_backward_waits(self, spec, head_dim, overrides):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), defer_backward_waits=True,
                                    **overrides)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=53, interpret=False)

    @pytest.mark.parametrize("spec, head_dim", [("window(1024)", 128), ("block(512)", 64),
                                                ("repaired(512, 64, prefix)", 128)])
    def test_late_prefetch(self, spec, head_dim):
        sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim), late_prefetch=True, persistent=True,
                                    fused_dq=False, persistent_dq=True)
        check_against_reference(spec, seq_len=3000, heads=4, kv_heads=2, head_dim=head_dim,
                                block_sizes=dataclasses.asdict(sizes), seed=61, interpret=False)

    def test_shard_map_checks_vma(self):
        assert_shard_map_matches_reference(mosaic_gpu.attention)

    def test_topk_default_tiles(self):
        pattern = parse("topk(512, 3) | repaired(512, 64, bridge)")
        inputs = random_inputs(5, 2, 3000, 4, 2, 128, jnp.bfloat16)
        selected = random_selection(5, 2, 2, 6, 3)
        assert_matches_reference_on(
            lambda q, k, v: mosaic_gpu.attention(q, k, v, pattern, scale=0.1, selected=selected), pattern, inputs,
            scale=0.1, rtol=RTOL["bfloat16"], label=pattern.spec, selected=selected)
