"""Block-sparse flash attention for CUDA GPUs (sm80+): Pallas kernels lowered through Triton.

Three kernels, each a grid of (row tiles, batch x heads) programs that walk their row's active tiles:

  forward  rows = query tiles; online softmax (float32 row max and sum, exp2 with log2(e) folded into
           the scale) over FULL key tiles (no masking) and then over the key sub-tiles of PARTIAL tiles
           (the pattern's predicate evaluated in-kernel on int32 iotas, no mask read from memory);
           saves the base-2 logsumexp per row.
  dq       the same rows and tiles; recomputes probabilities from the saved logsumexp.
  dk/dv    rows = key tiles, over the transposed layout (each key tile's full and partial query tiles);
           for GQA a program owns one kv head and loops over the q heads of its group.

Partial tiles are walked in sub-tiles (`block_k_partial`, `block_q_partial_dkv`) and empty sub-tiles are
skipped, so a mostly-empty partial tile (a repair bridge, a window edge) costs a fraction of a full tile.
Rows are launched heaviest first so that short rows fill the tail of the launch. Tile lists are int32
kernel inputs, read one entry per iteration; a list of consecutive tiles in every row (dense, block,
window) is stored as its first tiles and walked as first + j. docs/triton.md explains the choices.

Shapes: q [batch, seq, q_heads, head_dim], k/v [batch, seq, kv_heads, head_dim]. Sequences are padded to a
tile multiple inside and sliced outside; head_dim 64 and 128 run natively, others are zero-padded.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_attention.kernels.common import (LOG2_E, ROW_MAX_INIT, KernelStatic, RowPlan, check_block_fields,
                                            check_selected, checked_block_sizes, choosers, cuda_capability_reason,
                                            dtype_reason, padded_flash, refuse_unsupported, row_plan, selection_reason)
from sparse_attention.layout import TileLists, block_layout
from sparse_attention.patterns import EMPTY, Pattern, TileGrid, as_pattern

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
MIN_BLOCK = 16  # smallest matrix-multiply tile Triton accepts
# Rows attending fewer keys than this on average (block-local patterns) get the short-row forward tiles.
SHORT_ROW_KEYS = 768
# jax 0.11.2 warns on every lowering of a Triton pallas_call; the warning fires when the caller's jit
# lowers, after `attention` has returned, so a scoped catch_warnings cannot reach it.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes, warps and pipeline stages of the three kernels; docs/triton.md gives the reasons.

    Forward and dq walk query-tile rows: [block_q, block_k] full tiles, [block_q, block_k_partial]
    sub-tiles of partial tiles. dk/dv walks key-tile rows: [block_q_dkv, block_k_dkv] full tiles,
    [block_q_partial_dkv, block_k_dkv] sub-tiles. Blocks are powers of two >= 16; a partial sub-tile
    divides its tile. Blocks larger than the (power-of-two rounded) sequence are clipped to it.
    """

    block_q: int = 128
    block_k: int = 128
    block_k_partial: int = 32
    num_warps: int = 8
    num_stages: int = 3

    block_q_dq: int = 128
    block_k_dq: int = 64
    block_k_partial_dq: int = 32
    num_warps_dq: int = 8
    num_stages_dq: int = 3

    block_k_dkv: int = 64
    block_q_dkv: int = 64
    block_q_partial_dkv: int = 32
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2

    def __post_init__(self):
        check_block_fields(self, {"block_": (lambda block: block >= MIN_BLOCK and _power_of_two(block),
                                             f"a power of two >= {MIN_BLOCK}")})
        for tile, sub in (("block_k", "block_k_partial"), ("block_k_dq", "block_k_partial_dq"),
                          ("block_q_dkv", "block_q_partial_dkv")):
            if getattr(self, sub) > getattr(self, tile):
                raise ValueError(f"BlockSizes.{sub}={getattr(self, sub)} must be <= {tile}={getattr(self, tile)}")

    @classmethod
    def for_head_dim(cls, head_dim: int, keys_per_query: float | None = None) -> "BlockSizes":
        """Defaults for a (padded) head_dim. `keys_per_query`, the mean number of keys a query row attends
        (None: long rows), picks smaller forward tiles for short rows. Reasons: docs/triton.md."""
        short_rows = keys_per_query is not None and keys_per_query < SHORT_ROW_KEYS
        if head_dim <= 64:
            if short_rows:
                return cls(block_k=64, num_warps=4, num_warps_dq=4)
            return cls(num_warps=4, num_stages_dkv=3)
        if head_dim <= 128:
            if short_rows:
                return cls(block_q=64, block_k=64, num_warps=4)
            return cls()
        return cls(block_k=64, num_stages=2,
                   block_q_dq=64, block_k_dq=32, block_k_partial_dq=16, num_stages_dq=2,
                   block_k_dkv=64, block_q_dkv=32, block_q_partial_dkv=16, num_warps_dkv=8)

    def clipped(self, seq_len: int) -> "BlockSizes":
        """Every block limited to the sequence rounded up to a power of two (at least 16)."""
        limit = max(MIN_BLOCK, 1 << max(seq_len - 1, 0).bit_length())
        return dataclasses.replace(
            self, **{f.name: min(getattr(self, f.name), limit) for f in dataclasses.fields(self)
                     if f.name.startswith("block_")}
        )

    @property
    def largest_block(self) -> int:
        return max(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("block_"))


# ------------------------------------------------------------------------------------------------ plans


def _split_partial(coarse: TileLists, pattern: Pattern, fine: TileGrid, ratio: int, by_key: bool) -> TileLists:
    """`coarse` with each partial tile replaced by its non-empty sub-tiles on the `fine` grid.

    Fine column c lies in coarse column c // ratio. Only the sub-tiles of partial tiles are classified, so
    this costs O(partial tiles x ratio), not O(rows x tiles). A sub-tile that is FULL inside a partial
    coarse tile is still listed as partial (masking it costs little there).
    """
    if ratio == 1:
        return coarse
    rows = np.repeat(np.arange(coarse.num_rows, dtype=np.int64), coarse.num_partial.astype(np.int64) * ratio)
    cols = (np.repeat(coarse.partial_indices.astype(np.int64) * ratio, ratio)
            + np.tile(np.arange(ratio, dtype=np.int64), len(coarse.partial_indices)))
    on_grid = cols < (fine.num_q_tiles if by_key else fine.num_k_tiles)  # drops sub-tiles past the sequence end
    rows, cols = rows[on_grid], cols[on_grid]
    q_tiles, k_tiles = (cols, rows) if by_key else (rows, cols)
    nonempty = pattern.classify_tiles(fine, q_tiles, k_tiles) != EMPTY
    offsets = np.zeros(coarse.num_rows + 1, np.int64)
    np.cumsum(np.bincount(rows[nonempty], minlength=coarse.num_rows), out=offsets[1:])
    return TileLists(coarse.full_offsets, coarse.full_indices, offsets, cols[nonempty].astype(np.int32))


@functools.lru_cache(maxsize=128)
def tile_plan(pattern: Pattern, seq_len: int, block_q: int, block_k: int, sub_block: int,
              by_key: bool) -> RowPlan:
    """The plan of the forward/dq pass (by_key=False: rows are [block_q] query tiles, partial tiles split
    into [sub_block] key sub-tiles) or of the dk/dv pass (by_key=True: rows are [block_k] key tiles,
    partial tiles split into [sub_block] query sub-tiles)."""
    layout = block_layout(pattern, seq_len, block_q, block_k)
    if by_key:
        fine = TileGrid(seq_len, sub_block, block_k)
        lists = _split_partial(layout.backward, pattern, fine, block_q // sub_block, by_key)
        tile, sub = block_q, sub_block
    else:
        fine = TileGrid(seq_len, block_q, sub_block)
        lists = _split_partial(layout.forward, pattern, fine, block_k // sub_block, by_key)
        tile, sub = block_k, sub_block
    return row_plan(lists, tile, sub)


# ---------------------------------------------------------------------------------------------- kernels


def _iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _walk(plan_refs, program, carry, step, tile: int, sub: int, contiguous: tuple[bool, bool]):
    """Runs step(carry, start, size, mask) over the program's full tiles (mask None), then its partial
    sub-tiles (mask PATTERN).

    A contiguous list is walked as first + j, so tile addresses are affine in the loop index. An explicit
    list is read one entry ahead: the loop carries the index, so the index of iteration j+1 is in a
    register before iteration j's loads are issued (padding repeats the last entry, and the read is
    clamped to the width).
    """
    _, full_ref, num_full_ref, partial_ref, num_partial_ref = plan_refs

    def loop(carry, list_ref, count, size, masked, consecutive):
        if consecutive:
            first = list_ref[program, 0]

            def affine_body(j, carry):
                return step(carry, pl.multiple_of((first + j) * size, size), size, masked)

            return lax.fori_loop(0, count, affine_body, carry)
        width = list_ref.shape[1]

        def body(j, state):
            carry, index = state
            upcoming = list_ref[program, jnp.minimum(j + 1, width - 1)]
            return step(carry, pl.multiple_of(index * size, size), size, masked), upcoming

        return lax.fori_loop(0, count, body, (carry, list_ref[program, 0]))[0]

    carry = loop(carry, full_ref, num_full_ref[program], tile, None, contiguous[0])
    return loop(carry, partial_ref, num_partial_ref[program], sub, PATTERN, contiguous[1])


def _walk_chosen(lists_ref, row_block, carry, step, tile: int, size: int, count, seq_len: int):
    """Runs step(carry, start, tile, CHOSEN) over the tiles of the blocks lists_ref[row_block, j], j < count
    (a traced int or a static K; entries < 0 are skipped) that start before seq_len: the blocks a `topk`
    pattern chose for this row's block (forward, dq), or the query blocks that chose this row's key block
    (dk/dv; the last block's tiles past the sequence were never computed by the forward)."""

    def block(j, carry):
        chosen = lists_ref[row_block, j]
        first = chosen * size

        def body(t, carry):
            return step(carry, pl.multiple_of(first + t * tile, tile), tile, CHOSEN)

        tiles = jnp.clip((seq_len - first + tile - 1) // tile, 0, size // tile)
        return lax.fori_loop(0, jnp.where(chosen >= 0, tiles, 0), body, carry)

    return lax.fori_loop(0, count, block, carry)


def _dot(a, b, trans_b: bool = False):
    """a @ b (or a @ b.T) accumulated in float32; float32 inputs multiply in full precision, not TF32."""
    return plgpu.dot(a, b, trans_b=trans_b, precision=lax.Precision.HIGHEST)


# What a step masks: nothing (FULL tiles), the pattern (PARTIAL tiles), or, on a tile of a block a `topk`
# pattern chose, the keys its static part attends already (so no pair counts twice).
PATTERN, CHOSEN = "pattern", "chosen"


def _active(pattern: Pattern, seq_len: int, q_pos, k_pos, mask: str):
    """Token mask of a masked tile; padded keys (k >= seq_len) never attend."""
    static = pattern.mask(q_pos, k_pos)
    return (static if mask == PATTERN else ~static) & (k_pos < seq_len)


def _split_refs(refs, pattern: Pattern, plans: int, chosen_arrays: int = 1):
    """(plan refs, the chosen-block refs or None, the rest): a `topk` pattern's kernels take `chosen_arrays`
    more inputs after the plan (one list for forward and dq; lists and counts for dk/dv)."""
    if pattern.block_selection() is None:
        return refs[:plans], None, refs[plans:]
    chosen = refs[plans:plans + chosen_arrays]
    return refs[:plans], chosen[0] if chosen_arrays == 1 else chosen, refs[plans + chosen_arrays:]


def _forward_kernel(*refs, pattern, seq_len, scale_log2, block_q, block_k, block_k_partial, contiguous):
    plan_refs, chosen_ref, (q_ref, k_ref, v_ref, out_ref, lse_ref) = _split_refs(refs, pattern, 5)
    program = pl.program_id(0)  # read here: interpret mode substitutes it only at the kernel's top level
    row = plan_refs[0][program]
    q_start = pl.multiple_of(row * block_q, block_q)
    q = q_ref[pl.ds(q_start, block_q), :]  # [block_q, head_dim]
    if scale_log2 < 0:  # logits = (-q) . k * |scale|: the row max can then be taken before scaling
        q = -q
    scale_log2 = abs(scale_log2)
    q_pos = q_start + _iota(block_q)
    head_dim = q.shape[-1]

    def step(carry, k_start, width, mask):
        acc, row_max, row_sum = carry
        k = k_ref[pl.ds(k_start, width), :]
        v = v_ref[pl.ds(k_start, width), :]
        dots = _dot(q, k, trans_b=True)  # [block_q, width]; logits in base-2 units are dots * scale_log2
        if mask is not None:
            active = _active(pattern, seq_len, q_pos[:, None], (k_start + _iota(width))[None, :], mask)
            logits = jnp.where(active, dots * scale_log2, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
            probs = jnp.exp2(logits - new_max[:, None])
        else:  # max before scaling, then one fused multiply-add per logit
            new_max = jnp.maximum(row_max, jnp.max(dots, axis=1) * scale_log2)
            probs = jnp.exp2(dots * scale_log2 - new_max[:, None])
        correction = jnp.exp2(row_max - new_max)
        row_sum = row_sum * correction + jnp.sum(probs, axis=1)
        acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
        return acc, new_max, row_sum

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), ROW_MAX_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, row_max, row_sum = _walk(plan_refs, program, init, step, block_k, block_k_partial, contiguous)
    if chosen_ref is not None:
        topk = pattern.block_selection()
        acc, row_max, row_sum = _walk_chosen(chosen_ref, q_start // topk.size, (acc, row_max, row_sum), step,
                                             block_k, topk.size, topk.count, seq_len)
    seen = row_sum > 0  # rows with no active key give 0
    out = acc / jnp.where(seen, row_sum, 1.0)[:, None]
    out_ref[pl.ds(q_start, block_q), :] = out.astype(out_ref.dtype)
    # +inf for keyless and padded rows: the backward's exp2(logit - lse) is then 0 on any tile.
    lse = jnp.where(seen & (q_pos < seq_len), row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), jnp.inf)
    lse_ref[pl.ds(q_start, block_q)] = lse


def _dq_kernel(*refs, pattern, seq_len, scale_log2, scale, block_q, block_k, block_k_partial, contiguous):
    plan_refs, chosen_ref, (q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref) = _split_refs(refs, pattern, 5)
    program = pl.program_id(0)  # read here: interpret mode substitutes it only at the kernel's top level
    row = plan_refs[0][program]
    q_start = pl.multiple_of(row * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q = q_ref[rows, :]
    d_out = d_out_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    q_pos = q_start + _iota(block_q)

    def step(dq, k_start, width, mask):
        k = k_ref[pl.ds(k_start, width), :]
        v = v_ref[pl.ds(k_start, width), :]
        probs = jnp.exp2(_dot(q, k, trans_b=True) * scale_log2 - lse[:, None])
        if mask is not None:
            active = _active(pattern, seq_len, q_pos[:, None], (k_start + _iota(width))[None, :], mask)
            probs = jnp.where(active, probs, 0.0)
        d_probs = _dot(d_out, v, trans_b=True)
        d_logits = probs * (d_probs - delta[:, None])
        return dq + _dot(d_logits.astype(k.dtype), k)

    dq = _walk(plan_refs, program, jnp.zeros(q.shape, jnp.float32), step, block_k, block_k_partial,
               contiguous)
    if chosen_ref is not None:
        topk = pattern.block_selection()
        dq = _walk_chosen(chosen_ref, q_start // topk.size, dq, step, block_k, topk.size, topk.count, seq_len)
    dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, pattern, seq_len, scale_log2, scale, group, block_k, block_q, block_q_partial,
                 contiguous):
    plan_refs, chooser_refs, (q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref) = (
        _split_refs(refs, pattern, 5, chosen_arrays=2))
    program = pl.program_id(0)  # read here: interpret mode substitutes it only at the kernel's top level
    row = plan_refs[0][program]
    k_start = pl.multiple_of(row * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k = k_ref[keys, :]  # [block_k, head_dim]
    v = v_ref[keys, :]
    k_pos = k_start + _iota(block_k)

    def head(g, carry):
        """Accumulates the contribution of q head g of this kv head's group (transposed tiles)."""

        def step(carry, q_start, height, mask):
            dk, dv = carry
            queries = pl.ds(q_start, height)
            q = q_ref[queries, g, :]  # [height, head_dim]
            d_out = d_out_ref[queries, g, :]
            lse = lse_ref[g, queries]
            delta = delta_ref[g, queries]
            probs_t = jnp.exp2(_dot(k, q, trans_b=True) * scale_log2 - lse[None, :])  # [block_k, height]
            if mask is not None:
                active = _active(pattern, seq_len, (q_start + _iota(height))[None, :], k_pos[:, None], mask)
                probs_t = jnp.where(active, probs_t, 0.0)
            dv = dv + _dot(probs_t.astype(d_out.dtype), d_out)
            d_probs_t = _dot(v, d_out, trans_b=True)
            d_logits_t = probs_t * (d_probs_t - delta[None, :])
            dk = dk + _dot(d_logits_t.astype(q.dtype), q)
            return dk, dv

        carry = _walk(plan_refs, program, carry, step, block_q, block_q_partial, contiguous)
        if chooser_refs is None:
            return carry
        choosers_ref, count_ref = chooser_refs
        size = pattern.block_selection().size
        return _walk_chosen(choosers_ref, k_start // size, carry, step, block_q, size, count_ref[k_start // size],
                            seq_len)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = head(0, init) if group == 1 else lax.fori_loop(0, group, head, init)
    dk_ref[keys, :] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[keys, :] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------- launchers


def _result(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """A kernel result varying over every manual mesh axis its inputs vary over (shard_map's check_vma)."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _plan_specs(plan: RowPlan):
    """BlockSpecs handing each program the whole plan (tiny int32 arrays, read a scalar at a time)."""
    return [pl.BlockSpec(a.shape, lambda r, bh, n=a.ndim: (0,) * n) for a in plan.arrays]


def _chosen_inputs(selected, q_heads: int, group: int):
    """The forward/dq kernels' view of a `topk` choice: ([int32 [batch * kv_heads, query blocks, K]], [its
    BlockSpec for a (row, batch x q head) program]); ([], []) without one."""
    if selected is None:
        return [], []
    batch, kv_heads, blocks, count = selected.shape
    spec = pl.BlockSpec((None, blocks, count),
                        lambda r, bh: ((bh // q_heads) * kv_heads + (bh % q_heads) // group, 0, 0))
    return [selected.reshape(batch * kv_heads, blocks, count)], [spec]


def _chooser_inputs(selected):
    """The dk/dv kernel's view of a `topk` choice, the transpose built on the device: for each (batch x kv
    head) and key block, the query blocks that chose it, in order (int32 [batch * kv_heads, blocks, blocks],
    padded with -1), and their count (int32 [batch * kv_heads, blocks]); with their BlockSpecs."""
    if selected is None:
        return [], []
    batch, kv_heads, blocks, _ = selected.shape
    lists, counts = (x.reshape(batch * kv_heads, *x.shape[2:]) for x in choosers(selected))
    specs = [pl.BlockSpec((None, blocks, blocks), lambda r, bh: (bh, 0, 0)),
             pl.BlockSpec((None, blocks), lambda r, bh: (bh, 0))]
    return [lists, counts], specs


def _forward(q, k, v, static: KernelStatic, seq_len: int, selected=None):
    """out [batch, padded_seq, q_heads, d], lse [batch, q_heads, padded_seq] (base 2, float32)."""
    batch, padded_len, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    chosen, chosen_specs = _chosen_inputs(selected, q_heads, group)
    sizes = static.block_sizes
    plan = tile_plan(static.pattern, seq_len, sizes.block_q, sizes.block_k, sizes.block_k_partial, False)
    per_q_head = pl.BlockSpec((None, padded_len, None, head_dim), lambda r, bh: (bh // q_heads, 0, bh % q_heads, 0))
    per_kv_head = pl.BlockSpec(
        (None, padded_len, None, head_dim), lambda r, bh: (bh // q_heads, 0, (bh % q_heads) // group, 0)
    )
    kernel = functools.partial(
        _forward_kernel, pattern=static.pattern, seq_len=seq_len, scale_log2=static.scale * LOG2_E,
        block_q=sizes.block_q, block_k=sizes.block_k, block_k_partial=sizes.block_k_partial,
        contiguous=plan.contiguous,
    )
    return pl.pallas_call(
        kernel,
        grid=(len(plan.rows), batch * q_heads),
        in_specs=_plan_specs(plan) + chosen_specs + [per_q_head, per_kv_head, per_kv_head],
        out_specs=[per_q_head, pl.BlockSpec((None, None, padded_len), lambda r, bh: (bh // q_heads, bh % q_heads, 0))],
        out_shape=[_result(q.shape, q.dtype, q, k, v), _result((batch, q_heads, padded_len), jnp.float32, q, k, v)],
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages),
        interpret=static.interpret,
        name="sparse_attention_forward",
    )(*plan.arrays, *chosen, q, k, v)


def _backward(q, k, v, out, lse, d_out, static: KernelStatic, seq_len: int, selected=None):
    batch, padded_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    chosen, chosen_specs = _chosen_inputs(selected, q_heads, group)
    choosers, chooser_specs = _chooser_inputs(selected)
    sizes = static.block_sizes
    # delta = rowsum(dO * O): [batch, q_heads, padded_seq], one fused XLA reduction.
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    common = dict(pattern=static.pattern, seq_len=seq_len, scale_log2=static.scale * LOG2_E, scale=static.scale)

    dq_plan = tile_plan(static.pattern, seq_len, sizes.block_q_dq, sizes.block_k_dq, sizes.block_k_partial_dq, False)
    per_q_head = pl.BlockSpec((None, padded_len, None, head_dim), lambda r, bh: (bh // q_heads, 0, bh % q_heads, 0))
    per_kv_head_of_q = pl.BlockSpec(
        (None, padded_len, None, head_dim), lambda r, bh: (bh // q_heads, 0, (bh % q_heads) // group, 0)
    )
    row_stats = pl.BlockSpec((None, None, padded_len), lambda r, bh: (bh // q_heads, bh % q_heads, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common, block_q=sizes.block_q_dq, block_k=sizes.block_k_dq,
                          block_k_partial=sizes.block_k_partial_dq, contiguous=dq_plan.contiguous),
        grid=(len(dq_plan.rows), batch * q_heads),
        in_specs=_plan_specs(dq_plan) + chosen_specs + [per_q_head, per_kv_head_of_q, per_kv_head_of_q,
                                                        per_q_head, row_stats, row_stats],
        out_specs=per_q_head,
        out_shape=_result(q.shape, q.dtype, q, k, v, d_out, lse, delta),
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps_dq, num_stages=sizes.num_stages_dq),
        interpret=static.interpret,
        name="sparse_attention_dq",
    )(*dq_plan.arrays, *chosen, q, k, v, d_out, lse, delta)

    dkdv_plan = tile_plan(static.pattern, seq_len, sizes.block_q_dkv, sizes.block_k_dkv,
                          sizes.block_q_partial_dkv, True)
    # Programs own one kv head; the q-side blocks hold that head's whole group of q heads.
    group_of_q_heads = pl.BlockSpec(
        (None, padded_len, group, head_dim), lambda r, bh: (bh // kv_heads, 0, bh % kv_heads, 0)
    )
    group_stats = pl.BlockSpec((None, group, padded_len), lambda r, bh: (bh // kv_heads, bh % kv_heads, 0))
    per_kv_head = pl.BlockSpec((None, padded_len, None, head_dim), lambda r, bh: (bh // kv_heads, 0, bh % kv_heads, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **common, group=group, block_k=sizes.block_k_dkv,
                          block_q=sizes.block_q_dkv, block_q_partial=sizes.block_q_partial_dkv,
                          contiguous=dkdv_plan.contiguous),
        grid=(len(dkdv_plan.rows), batch * kv_heads),
        in_specs=_plan_specs(dkdv_plan) + chooser_specs + [group_of_q_heads, per_kv_head, per_kv_head,
                                                           group_of_q_heads, group_stats, group_stats],
        out_specs=[per_kv_head, per_kv_head],
        out_shape=[_result(k.shape, k.dtype, q, k, v, d_out, lse, delta),
                   _result(v.shape, v.dtype, q, k, v, d_out, lse, delta)],
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps_dkv, num_stages=sizes.num_stages_dkv),
        interpret=static.interpret,
        name="sparse_attention_dkdv",
    )(*dkdv_plan.arrays, *choosers, q, k, v, d_out, lse, delta)
    return dq, dk, dv


def _padded_head_dim(head_dim: int) -> int:
    """The next power of two >= 16 (Triton tiles are powers of two)."""
    return max(MIN_BLOCK, 1 << (head_dim - 1).bit_length())


_flash = padded_flash(_forward, _backward, sequence_multiple=lambda static: static.block_sizes.largest_block,
                      padded_head_dim=_padded_head_dim)


# ------------------------------------------------------------------------------------------------- API


def keys_per_query(pattern: Pattern, seq_len: int) -> float:
    """Mean keys per query row, counted in whole 128-key tiles (the work a row costs, from the layout)."""
    tile = min(128, max(MIN_BLOCK, 1 << max(seq_len - 1, 0).bit_length()))
    lists = block_layout(pattern, seq_len, tile, tile).forward
    return tile * (len(lists.full_indices) + len(lists.partial_indices)) / lists.num_rows


def _default_block_sizes(q, pattern: Pattern) -> BlockSizes:
    return BlockSizes.for_head_dim(_padded_head_dim(q.shape[3]), keys_per_query(pattern, q.shape[1]))


def _selection_reason(pattern: Pattern, block_sizes: BlockSizes) -> str | None:
    return selection_reason(pattern, block_sizes.largest_block, "the largest tile")


def _input_reason(q, interpret: bool) -> str | None:
    if reason := dtype_reason(q.dtype, SUPPORTED_DTYPES):
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported"
    return None if interpret else cuda_capability_reason(8)


def unsupported_reason(q, k, v, pattern: Pattern, *, interpret: bool) -> str | None:
    """None when this kernel can run the case here (with its default tiles), else why not."""
    del k, v  # shapes and patterns are validated by attention.check_inputs / as_pattern
    return _input_reason(q, interpret) or _selection_reason(pattern, _default_block_sizes(q, pattern).clipped(
        q.shape[1]))


def attention(q, k, v, pattern: Pattern | str, *, scale: float, interpret: bool = False,
              block_sizes: BlockSizes | None = None, selected=None):
    """Causal block-sparse attention of q [batch, seq, q_heads, d] over k, v [batch, seq, kv_heads, d].

    Differentiable (custom VJP); works under jit, vmap and shard_map. `block_sizes` defaults to
    `BlockSizes.for_head_dim(d, keys_per_query(pattern, seq))`; blocks larger than the sequence are clipped.
    `selected`: the blocks a `topk` pattern chose (int32 [batch, kv_heads, query blocks, K], -1: none;
    `selection.select_blocks`), required exactly when the pattern has a topk part.
    """
    pattern = as_pattern(pattern)
    refuse_unsupported("triton", _input_reason(q, interpret))
    check_selected(pattern, selected)
    block_sizes = checked_block_sizes(block_sizes, BlockSizes, lambda: _default_block_sizes(q, pattern))
    block_sizes = block_sizes.clipped(q.shape[1])
    refuse_unsupported("triton", _selection_reason(pattern, block_sizes))
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    static = KernelStatic(pattern, float(scale), bool(interpret), block_sizes)
    return _flash(q, k, v, static, selected)
