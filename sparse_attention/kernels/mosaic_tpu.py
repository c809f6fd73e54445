"""Block-sparse flash attention for TPUs: Pallas kernels lowered through Mosaic.

The block layout travels as scalar-prefetch operands (SMEM), and the BlockSpec index maps read the tile
of each grid step from it, so the pipeline DMAs only active tiles; empty tiles are never loaded.

Each kernel's grid is (batch, heads, steps). The step axis walks a flat list of (row tile, column tile)
pairs, every row's active tiles one after another (`StepList`): the forward and dq passes walk query-tile
rows over their FULL key tiles then their PARTIAL ones; the dk/dv pass walks key-tile rows over the
transposed layout (`layout.backward`), each step loading the query tiles of all the q heads that share
the kv head (GQA) and looping over them in-kernel. A row's first step resets the VMEM accumulators and
its last step writes the row's output block, which Pallas copies back to HBM when the block index
changes. FULL tiles skip masking; PARTIAL tiles evaluate `pattern.mask(q_pos, k_pos) & (k_pos < seq_len)`
in-kernel on int32 iotas. A row with no active tile gets one EMPTY step that writes zeros. Consecutive
steps that name the same block reuse it without a new DMA.

Backward is a custom VJP from the saved logsumexp (`common.padded_flash`): a dq kernel over the forward
layout and a dk/dv kernel over the backward layout. docs/mosaic_tpu.md gives the design choices, the
defaults and what ran where.

A `topk` pattern's chosen blocks (`selected`, computed on the device) become steps of kind CHOSEN, merged
into each row's static steps on the device (`chosen_steps`): one step list per (batch, kv head), flattened.
A CHOSEN tile attends the keys its static part does not, so no pair counts twice. The dk/dv pass walks the
transpose of the same entries (key tile rows, chooser query tiles as columns): the choice has q_blocks x K
entries whatever it chose, so the transposed list has a fixed length too.

Shapes: q [batch, seq, q_heads, head_dim], k/v [batch, seq, kv_heads, head_dim] outside; the kernels see
[batch, heads, padded_seq, head_dim] (sequences padded to a tile multiple inside, sliced outside).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from sparse_attention.kernels.common import (ROW_MAX_INIT, KernelStatic, check_block_fields, check_selected,
                                            checked_block_sizes, dtype_reason, padded_flash, refuse_unsupported,
                                            selection_reason)
from sparse_attention.layout import TileLists, block_layout
from sparse_attention.patterns import EMPTY, FULL, PARTIAL, Pattern, as_pattern

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
LANES = 128  # vector lane width: tile sizes on hardware, and the width of the row-statistics scratch
SUBLANES = 8  # smallest tile size accepted in interpret mode
# Step flags: bits 0-1 the tile kind (EMPTY / PARTIAL / FULL / CHOSEN), then first and last step of the row.
_KIND_MASK = 3
# A tile of a block a `topk` pattern chose: it attends the keys the static part does not (no pair twice).
CHOSEN = 3
_FIRST = 4
_LAST = 8
# The step lists live in SMEM (1 MiB per core on v4 and later) as three int32 arrays; longer lists ask
# for larger blocks.
SMEM_BUDGET_BYTES = 512 * 1024


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels: [block_q, block_k] tiles of the attention matrix.

    On TPU hardware every block must be a multiple of 128 (the lane width: key tiles are lanes of the
    logits, and the dk/dv pass reads logsumexp rows of block_q_dkv lanes); interpret mode takes any
    multiple of 8. Blocks longer than the (rounded-up) sequence are clipped to it.
    """

    block_q: int = 256
    block_k: int = 256
    block_q_dq: int = 256
    block_k_dq: int = 256
    block_q_dkv: int = 256
    block_k_dkv: int = 256

    def __post_init__(self):
        check_block_fields(self, {"block_": (lambda block: block % SUBLANES == 0, f"a multiple of {SUBLANES}")})

    def check_hardware(self):
        """Raises ValueError unless every block is a multiple of the lane width (compiled kernels)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value % LANES:
                raise ValueError(
                    f"BlockSizes.{field.name} must be a multiple of {LANES} on TPU hardware, got {value} "
                    f"(smaller multiples of {SUBLANES} run only with interpret=True)"
                )

    def clipped(self, seq_len: int, multiple: int) -> "BlockSizes":
        """Every block limited to seq_len rounded up to `multiple`."""
        limit = -(-seq_len // multiple) * multiple
        return dataclasses.replace(self, **{f.name: min(getattr(self, f.name), limit)
                                            for f in dataclasses.fields(self)})

    @property
    def sequence_multiple(self) -> int:
        """The padded sequence length is a multiple of every block."""
        return math.lcm(*(getattr(self, f.name) for f in dataclasses.fields(self)))


# ------------------------------------------------------------------------------------------- step lists


@dataclasses.dataclass(frozen=True, eq=False)
class StepList:
    """The step axis of one kernel's grid: the (row tile, column tile) pair of every step, in order.

    rows:  int32 [steps] row tile (query tile for forward/dq, key tile for dk/dv), nondecreasing
    cols:  int32 [steps] column tile (key tile, or query tile for dk/dv)
    flags: int32 [steps] kind | first | last (see the constants above)

    A row's steps are contiguous: its FULL tiles, then its PARTIAL tiles, or a single EMPTY step when it
    has none. An EMPTY step names the previous step's column tile, so it loads nothing new.
    """

    rows: np.ndarray
    cols: np.ndarray
    flags: np.ndarray

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.rows, self.cols, self.flags

    @property
    def kinds(self) -> np.ndarray:
        return self.flags & _KIND_MASK


def _step_list(lists: TileLists) -> StepList:
    num_rows = lists.num_rows
    counts = lists.num_full.astype(np.int64) + lists.num_partial
    row_ids = np.arange(num_rows, dtype=np.int64)
    empty_rows = np.flatnonzero(counts == 0)
    # Every row's steps: full tiles, then partial tiles, then (for rows with none) one empty step; a
    # stable sort by row keeps that order within each row.
    rows = np.concatenate([np.repeat(row_ids, lists.num_full), np.repeat(row_ids, lists.num_partial), empty_rows])
    cols = np.concatenate([lists.full_indices, lists.partial_indices, np.full(len(empty_rows), -1)])
    kinds = np.concatenate([np.full(len(lists.full_indices), FULL), np.full(len(lists.partial_indices), PARTIAL),
                            np.full(len(empty_rows), EMPTY)])
    order = np.argsort(rows, kind="stable")
    rows, cols, kinds = rows[order], cols[order], kinds[order]
    # Empty steps take the column of the step before them (or 0), so that nothing new is loaded.
    total = len(rows)
    last_real = np.maximum.accumulate(np.where(cols >= 0, np.arange(total), 0))
    cols = np.maximum(cols[last_real], 0)
    first = np.ones(total, bool)
    first[1:] = rows[1:] != rows[:-1]
    last = np.ones(total, bool)
    last[:-1] = rows[:-1] != rows[1:]
    flags = kinds | first * _FIRST | last * _LAST
    return StepList(rows.astype(np.int32), cols.astype(np.int32), flags.astype(np.int32))


def chosen_steps(steps: StepList, selected, size: int, block_q: int, block_k: int, by_key: bool):
    """The step arrays of a `topk` case, built on the device: `steps` (the static part's) merged with a
    CHOSEN step for every (query tile, key tile) pair of every block each query block chose; (rows, cols,
    flags), int32 [batch * kv_heads * total steps], one list per (batch, kv head) after another.

    selected: int32 [batch, kv_heads, query blocks, K] (-1: none), blocks of `size`, a multiple of both
    tiles. Rows are query tiles (by_key=False) or key tiles (by_key=True; the chooser's query tiles are
    then the columns). Every list has len(steps.rows) + query blocks x K x (size / block_q) x (size /
    block_k) steps: an unchosen slot is an EMPTY step of row 0 that loads nothing new.
    """
    batch, kv_heads, blocks, count = selected.shape
    q_per, k_per = size // block_q, size // block_k
    shape = (batch, kv_heads, blocks, count, q_per, k_per)
    query_tile = (jnp.arange(blocks)[:, None, None, None] * q_per + jnp.arange(q_per)[None, None, :, None])
    key_tile = selected[..., None, None] * k_per + jnp.arange(k_per)  # [batch, kv_heads, blocks, K, 1, k_per]
    query_tile, key_tile = jnp.broadcast_to(query_tile, shape), jnp.broadcast_to(key_tile, shape)
    valid = jnp.broadcast_to((selected >= 0)[..., None, None], shape)
    row_tile, col_tile = (key_tile, query_tile) if by_key else (query_tile, key_tile)
    lanes = batch * kv_heads
    rows = jnp.concatenate([jnp.broadcast_to(steps.rows, (lanes, len(steps.rows))),
                            jnp.where(valid, row_tile, 0).reshape(lanes, -1)], axis=1)
    cols = jnp.concatenate([jnp.broadcast_to(steps.cols, (lanes, len(steps.cols))),
                            jnp.where(valid, col_tile, 0).reshape(lanes, -1)], axis=1)
    kinds = jnp.concatenate([jnp.broadcast_to(steps.kinds, (lanes, len(steps.rows))),
                             jnp.where(valid, CHOSEN, EMPTY).reshape(lanes, -1)], axis=1)
    # Stable: a row keeps its static steps first, in their order, then its chosen ones.
    order = jnp.argsort(rows, axis=1, stable=True)
    rows, cols, kinds = (jnp.take_along_axis(x, order, axis=1) for x in (rows, cols, kinds))
    # An EMPTY step names the column of the last real step before it, so it loads nothing new.
    positions = jnp.arange(rows.shape[1])
    last_real = lax.cummax(jnp.where(kinds != EMPTY, positions, 0), axis=1)
    cols = jnp.take_along_axis(cols, last_real, axis=1)
    first = jnp.concatenate([jnp.ones((lanes, 1), bool), rows[:, 1:] != rows[:, :-1]], axis=1)
    last = jnp.concatenate([rows[:, :-1] != rows[:, 1:], jnp.ones((lanes, 1), bool)], axis=1)
    flags = kinds | jnp.where(first, _FIRST, 0) | jnp.where(last, _LAST, 0)
    return tuple(x.astype(jnp.int32).reshape(-1) for x in (rows, cols, flags))


@functools.lru_cache(maxsize=128)
def step_list(pattern: Pattern, seq_len: int, block_q: int, block_k: int, by_key: bool) -> StepList:
    """The steps of the forward/dq pass (by_key=False: rows are query tiles over their key tiles) or of
    the dk/dv pass (by_key=True: rows are key tiles over their query tiles, from `layout.backward`)."""
    layout = block_layout(pattern, seq_len, block_q, block_k)
    return _step_list(layout.backward if by_key else layout.forward)


@dataclasses.dataclass(frozen=True)
class StepIndex:
    """Where the program (batch, head) of a kernel's grid finds its steps in the flattened step arrays: one
    shared list (static patterns) or one list per (batch, kv head) (topk)."""

    steps: int
    lanes_per_batch: int  # kv heads with a list each, or 0: every program walks the one static list
    group: int  # q heads per kv head of the grid's head axis (1 for the dk/dv pass, which runs per kv head)

    def offset(self, b, h):
        """Index of the first step of the program (b, h) in the flattened arrays."""
        if not self.lanes_per_batch:
            return 0
        return (b * self.lanes_per_batch + h // self.group) * self.steps


def _kernel_steps(static: KernelStatic, seq_len: int, block_q: int, block_k: int, by_key: bool, selected,
                  group: int) -> tuple[tuple, StepIndex]:
    """The step arrays (rows, cols, flags) a kernel's grid walks, and its StepIndex."""
    steps = step_list(static.pattern, seq_len, block_q, block_k, by_key)
    if selected is None:
        arrays, lanes_per_batch, lanes = steps.arrays, 0, 1
    else:
        arrays = chosen_steps(steps, selected, static.pattern.block_selection().size, block_q, block_k, by_key)
        lanes_per_batch, lanes = selected.shape[1], selected.shape[0] * selected.shape[1]
    total = arrays[0].size // lanes  # steps per list
    smem_bytes = 4 * 3 * arrays[0].size  # three int32 arrays
    if not static.interpret and smem_bytes > SMEM_BUDGET_BYTES:
        raise ValueError(
            f"block_sizes: {lanes} x {total} steps of {block_q} x {block_k} tiles at seq_len={seq_len} need "
            f"{smem_bytes} bytes of SMEM (budget {SMEM_BUDGET_BYTES}); use larger blocks"
        )
    return arrays, StepIndex(total, lanes_per_batch, group)


# ---------------------------------------------------------------------------------------------- kernels


def _lanes(stats, width: int):
    """Row statistics [rows, LANES] (every lane equal) as [rows, width]."""
    if width <= LANES:
        return stats[:, :width]
    if width % LANES == 0:
        return jnp.concatenate([stats] * (width // LANES), axis=1)
    return jnp.broadcast_to(stats[:, :1], (stats.shape[0], width))


def _dot(a, b, contract_b: int):
    """a @ b (contract_b=0) or a @ b.T (contract_b=1), accumulated in float32; float32 inputs multiply in
    full precision (fp32 contract precision), not in bfloat16 passes."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _column(size: int, start):
    """int32 [size, 1]: start, start + 1, ... down the sublanes."""
    return start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)


def _row(size: int, start):
    """int32 [1, size]: start, start + 1, ... along the lanes."""
    return start + lax.broadcasted_iota(jnp.int32, (1, size), 1)


def _active(pattern: Pattern, seq_len: int, q_pos, k_pos, chosen: bool = False):
    """Token mask of a partial tile (or, `chosen`, of a CHOSEN tile: the keys the static part does not
    attend); padded keys (k >= seq_len) never attend.

    Positions come as a column and a row that broadcast to the tile, so whatever the pattern computes
    from one side alone (an interval pattern's lo(q), random_blocks' hash of the query block) costs one
    vector op per row or column instead of one per element; integer division is slow on the vector unit.
    """
    static = pattern.mask(q_pos, k_pos)
    return (~static if chosen else static) & (k_pos < seq_len)


def _forward_kernel(rows_ref, cols_ref, flags_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
                    row_max_ref, row_sum_ref, acc_ref, *, pattern, seq_len, scale, index: StepIndex):
    step = index.offset(pl.program_id(0), pl.program_id(1)) + pl.program_id(2)
    row, col, flags = rows_ref[step], cols_ref[step], flags_ref[step]
    kind = flags & _KIND_MASK
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when((flags & _FIRST) != 0)
    def _start_row():
        row_max_ref[...] = jnp.full(row_max_ref.shape, ROW_MAX_INIT, jnp.float32)
        row_sum_ref[...] = jnp.zeros(row_sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(masked: bool, chosen: bool = False):
        v = v_ref[...]
        logits = _dot(q_ref[...], k_ref[...], 1) * scale  # [block_q, block_k]
        if masked:
            active = _active(pattern, seq_len, _column(block_q, row * block_q), _row(block_k, col * block_k), chosen)
            logits = jnp.where(active, logits, -jnp.inf)
        row_max = row_max_ref[...]  # [block_q, LANES]
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
        probs = jnp.exp(logits - _lanes(new_max, block_k))
        correction = jnp.exp(row_max - new_max)
        row_sum_ref[...] = correction * row_sum_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        row_max_ref[...] = new_max
        acc_ref[...] = _lanes(correction, acc_ref.shape[1]) * acc_ref[...] + _dot(probs.astype(v.dtype), v, 0)

    pl.when(kind == FULL)(lambda: accumulate(False))
    pl.when(kind == PARTIAL)(lambda: accumulate(True))
    if pattern.block_selection() is not None:
        pl.when(kind == CHOSEN)(lambda: accumulate(True, chosen=True))

    @pl.when((flags & _LAST) != 0)
    def _finish_row():
        row_sum = row_sum_ref[...]
        seen = row_sum > 0  # rows with no active key give 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out_ref[...] = (acc_ref[...] / _lanes(safe_sum, acc_ref.shape[1])).astype(out_ref.dtype)
        # +inf for keyless rows: the backward's exp(logit - lse) is then 0 on any tile.
        lse_ref[...] = jnp.where(seen, row_max_ref[...] + jnp.log(safe_sum), jnp.inf)


def _dq_kernel(rows_ref, cols_ref, flags_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref,
               acc_ref, *, pattern, seq_len, scale, index: StepIndex):
    step = index.offset(pl.program_id(0), pl.program_id(1)) + pl.program_id(2)
    row, col, flags = rows_ref[step], cols_ref[step], flags_ref[step]
    kind = flags & _KIND_MASK
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when((flags & _FIRST) != 0)
    def _start_row():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(masked: bool, chosen: bool = False):
        k = k_ref[...]
        lse = lse_ref[0][:, None]  # [block_q, 1] from a [1, block_q] row
        delta = delta_ref[0][:, None]
        probs = jnp.exp(_dot(q_ref[...], k, 1) * scale - lse)  # [block_q, block_k]
        if masked:
            active = _active(pattern, seq_len, _column(block_q, row * block_q), _row(block_k, col * block_k), chosen)
            probs = jnp.where(active, probs, 0.0)
        d_probs = _dot(d_out_ref[...], v_ref[...], 1)
        d_logits = probs * (d_probs - delta)
        acc_ref[...] += _dot(d_logits.astype(k.dtype), k, 0)

    pl.when(kind == FULL)(lambda: accumulate(False))
    pl.when(kind == PARTIAL)(lambda: accumulate(True))
    if pattern.block_selection() is not None:
        pl.when(kind == CHOSEN)(lambda: accumulate(True, chosen=True))

    @pl.when((flags & _LAST) != 0)
    def _finish_row():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(rows_ref, cols_ref, flags_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, dk_acc_ref, dv_acc_ref, *, pattern, seq_len, scale, index: StepIndex):
    """Transposed tiles: rows are key tiles of one kv head, columns query tiles of its group of q heads
    (q_ref, d_out_ref: [group, block_q, d]; lse_ref, delta_ref: [group, 1, block_q])."""
    step = index.offset(pl.program_id(0), pl.program_id(1)) + pl.program_id(2)
    row, col, flags = rows_ref[step], cols_ref[step], flags_ref[step]
    kind = flags & _KIND_MASK
    group, block_q = q_ref.shape[0], q_ref.shape[1]
    block_k = k_ref.shape[0]

    @pl.when((flags & _FIRST) != 0)
    def _start_row():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def accumulate(masked: bool, chosen: bool = False):
        k, v = k_ref[...], v_ref[...]
        if masked:
            active = _active(pattern, seq_len, _row(block_q, col * block_q), _column(block_k, row * block_k), chosen)

        def head(g, carry):
            q, d_out = q_ref[g], d_out_ref[g]  # [block_q, d]
            probs_t = jnp.exp(_dot(k, q, 1) * scale - lse_ref[g])  # [block_k, block_q]
            if masked:
                probs_t = jnp.where(active, probs_t, 0.0)
            dv_acc_ref[...] += _dot(probs_t.astype(d_out.dtype), d_out, 0)
            d_logits_t = probs_t * (_dot(v, d_out, 1) - delta_ref[g])
            dk_acc_ref[...] += _dot(d_logits_t.astype(q.dtype), q, 0)
            return carry

        lax.fori_loop(0, group, head, 0)

    pl.when(kind == FULL)(lambda: accumulate(False))
    pl.when(kind == PARTIAL)(lambda: accumulate(True))
    if pattern.block_selection() is not None:
        pl.when(kind == CHOSEN)(lambda: accumulate(True, chosen=True))

    @pl.when((flags & _LAST) != 0)
    def _finish_row():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------- launchers


def _result(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """A kernel result varying over every manual mesh axis its inputs vary over (shard_map's check_vma)."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _compiler_params():
    # Batch and head programs are independent (megacore may split them); the step axis carries the
    # accumulators from one step of a row to the next.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_t(q, k, v, static: KernelStatic, seq_len: int, selected=None):
    """out [batch, q_heads, padded_seq, d], lse [batch, q_heads, 1, padded_seq] (natural log, float32)."""
    batch, q_heads, padded_len, head_dim = q.shape
    group = q_heads // k.shape[1]
    sizes = static.block_sizes
    block_q, block_k = sizes.block_q, sizes.block_k
    steps, at = _kernel_steps(static, seq_len, block_q, block_k, False, selected, group)
    q_block = pl.BlockSpec((None, None, block_q, head_dim),
                           lambda b, h, s, rows, cols, flags: (b, h, rows[at.offset(b, h) + s], 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim),
                            lambda b, h, s, rows, cols, flags: (b, h // group, cols[at.offset(b, h) + s], 0))
    # The row max and logsumexp are kept with every lane equal ([block_q, LANES]), as JAX's own TPU
    # attention kernels keep row statistics; only lane 0 of the logsumexp is kept.
    lse_block = pl.BlockSpec((None, None, block_q, LANES),
                             lambda b, h, s, rows, cols, flags: (b, h, rows[at.offset(b, h) + s], 0))
    inputs = (q, k, v)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, pattern=static.pattern, seq_len=seq_len, scale=static.scale, index=at),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, q_heads, at.steps),
            in_specs=[q_block, kv_block, kv_block],
            out_specs=[q_block, lse_block],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, head_dim), jnp.float32)],
        ),
        out_shape=[_result(q.shape, q.dtype, *inputs),
                   _result((batch, q_heads, padded_len, LANES), jnp.float32, *inputs)],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="sparse_attention_forward",
    )(*steps, q, k, v)
    return out, lse[..., 0][:, :, None, :]


def _backward_t(q, k, v, d_out, lse, delta, static: KernelStatic, seq_len: int, selected=None):
    batch, q_heads, padded_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    sizes = static.block_sizes
    kernel_args = dict(pattern=static.pattern, seq_len=seq_len, scale=static.scale)
    inputs = (q, k, v, d_out, lse, delta)

    block_q, block_k = sizes.block_q_dq, sizes.block_k_dq
    steps, at = _kernel_steps(static, seq_len, block_q, block_k, False, selected, group)
    q_block = pl.BlockSpec((None, None, block_q, head_dim),
                           lambda b, h, s, rows, cols, flags: (b, h, rows[at.offset(b, h) + s], 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim),
                            lambda b, h, s, rows, cols, flags: (b, h // group, cols[at.offset(b, h) + s], 0))
    stats_block = pl.BlockSpec((None, None, 1, block_q),
                               lambda b, h, s, rows, cols, flags: (b, h, 0, rows[at.offset(b, h) + s]))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_args, index=at),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, q_heads, at.steps),
            in_specs=[q_block, kv_block, kv_block, q_block, stats_block, stats_block],
            out_specs=q_block,
            scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
        ),
        out_shape=_result(q.shape, q.dtype, *inputs),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="sparse_attention_dq",
    )(*steps, q, k, v, d_out, lse, delta)

    # The dk/dv pass sees the q side as [batch, kv_heads, group, padded_seq, ...]: each step loads the
    # query tile of every q head sharing the kv head, and the kernel loops over them.
    grouped = [x.reshape(batch, kv_heads, group, *x.shape[2:]) for x in (q, d_out, lse, delta)]
    block_q, block_k = sizes.block_q_dkv, sizes.block_k_dkv
    steps, at = _kernel_steps(static, seq_len, block_q, block_k, True, selected, 1)
    kv_block = pl.BlockSpec((None, None, block_k, head_dim),
                            lambda b, h, s, rows, cols, flags: (b, h, rows[at.offset(b, h) + s], 0))
    q_block = pl.BlockSpec((None, None, group, block_q, head_dim),
                           lambda b, h, s, rows, cols, flags: (b, h, 0, cols[at.offset(b, h) + s], 0))
    stats_block = pl.BlockSpec((None, None, group, 1, block_q),
                               lambda b, h, s, rows, cols, flags: (b, h, 0, 0, cols[at.offset(b, h) + s]))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **kernel_args, index=at),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, at.steps),
            in_specs=[q_block, kv_block, kv_block, q_block, stats_block, stats_block],
            out_specs=[kv_block, kv_block],
            scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                            pltpu.VMEM((block_k, head_dim), jnp.float32)],
        ),
        out_shape=[_result(k.shape, k.dtype, *inputs), _result(v.shape, v.dtype, *inputs)],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="sparse_attention_dkdv",
    )(*steps, grouped[0], k, v, grouped[1], grouped[2], grouped[3])
    return dq, dk, dv


def _to_kernel_layout(x):
    """[batch, seq, heads, d] -> [batch, heads, seq, d]."""
    return jnp.swapaxes(x, 1, 2)


def _real_rows(padded_len: int, seq_len: int):
    """bool [1, 1, 1, padded_seq]: real (not padded) sequence positions."""
    return (jnp.arange(padded_len) < seq_len)[None, None, None, :]


def _forward(q, k, v, static: KernelStatic, seq_len: int, selected=None):
    """`padded_flash`'s forward: out [batch, padded_seq, q_heads, d], lse [batch, q_heads, 1, padded_seq]."""
    out_t, lse = _forward_t(*map(_to_kernel_layout, (q, k, v)), static, seq_len, selected)
    # Padded query rows (some never written when the passes' tiles differ) must not reach the backward:
    # +inf makes their probabilities 0 in every tile.
    lse = jnp.where(_real_rows(q.shape[1], seq_len), lse, jnp.inf)
    return jnp.swapaxes(out_t, 1, 2), lse


def _backward(q, k, v, out, lse, d_out, static: KernelStatic, seq_len: int, selected=None):
    """`padded_flash`'s backward: dq, dk, dv in the caller's (padded) layout."""
    q_t, k_t, v_t, out_t, d_out_t = map(_to_kernel_layout, (q, k, v, out, d_out))
    # delta = rowsum(dO * O): [batch, q_heads, 1, padded_seq], one fused XLA reduction; 0 on padded rows,
    # whose out the forward may never have written.
    delta = jnp.einsum("bhsd,bhsd->bhs", d_out_t.astype(jnp.float32), out_t.astype(jnp.float32))[:, :, None, :]
    delta = jnp.where(_real_rows(q.shape[1], seq_len), delta, 0.0)
    dq, dk, dv = _backward_t(q_t, k_t, v_t, d_out_t, lse, delta, static, seq_len, selected)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))


_flash = padded_flash(_forward, _backward, sequence_multiple=lambda static: static.block_sizes.sequence_multiple)


# ------------------------------------------------------------------------------------------------- API


def unsupported_reason(q, k, v, pattern: Pattern, *, interpret: bool | pltpu.InterpretParams) -> str | None:
    """None when this kernel can run the case here (with its default tiles), else why not."""
    del k, v  # shapes and patterns are validated by attention.check_inputs / as_pattern
    return _input_reason(q, interpret) or _selection_reason(
        pattern, BlockSizes().clipped(q.shape[1], SUBLANES if interpret else LANES))


def _input_reason(q, interpret) -> str | None:
    if reason := dtype_reason(q.dtype, SUPPORTED_DTYPES):
        return reason
    if interpret or jax.default_backend() == "tpu":
        return None
    return "needs a TPU or interpret=True"


def _selection_reason(pattern: Pattern, block_sizes: BlockSizes) -> str | None:
    return selection_reason(pattern, block_sizes.sequence_multiple, "every tile")


def attention(q, k, v, pattern: Pattern | str, *, scale: float, interpret: bool | pltpu.InterpretParams = False,
              block_sizes: BlockSizes | None = None, selected=None):
    """Causal block-sparse attention of q [batch, seq, q_heads, d] over k, v [batch, seq, kv_heads, d].

    Differentiable (custom VJP); works under jit, vmap and shard_map. Under a context mesh (`jax.set_mesh`)
    whose axes are not manual yet, the batch is split over all of them (`sharded_attention`), since XLA
    cannot partition a Mosaic kernel by itself. `block_sizes` defaults to `BlockSizes()`; blocks longer
    than the sequence are clipped to it.
    `interpret` runs the kernels on any backend instead of compiling them with Mosaic: True takes Pallas's
    generic interpreter (fast; also under shard_map on several devices), a `pltpu.InterpretParams` the TPU
    simulator (slower; raises on out-of-bounds reads and fills unwritten memory with NaN).
    `selected`: the blocks a `topk` pattern chose (int32 [batch, kv_heads, query blocks, K], -1: none;
    `selection.select_blocks`), required exactly when the pattern has a topk part; its block must be a
    multiple of every tile.
    """
    pattern = as_pattern(pattern)
    refuse_unsupported("mosaic_tpu", _input_reason(q, interpret))
    check_selected(pattern, selected)
    block_sizes = checked_block_sizes(block_sizes, BlockSizes, BlockSizes)
    if not interpret:
        block_sizes.check_hardware()
    batch_axes = _context_batch_axes()
    if batch_axes:
        return sharded_attention(q, k, v, pattern, jax.sharding.get_abstract_mesh(), batch_axes=batch_axes,
                                 scale=scale, interpret=interpret, block_sizes=block_sizes, selected=selected)
    block_sizes = block_sizes.clipped(q.shape[1], SUBLANES if interpret else LANES)
    refuse_unsupported("mosaic_tpu", _selection_reason(pattern, block_sizes))
    static = KernelStatic(pattern, float(scale), interpret, block_sizes)
    return _flash(q, k, v, static, selected)


def _context_batch_axes() -> tuple[str, ...]:
    """Axes of the context mesh with more than one device that are not manual (inside shard_map) yet."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind != AxisType.Manual and mesh.shape[name] > 1)


def sharded_attention(q, k, v, pattern: Pattern | str, mesh: jax.sharding.Mesh, *,
                      batch_axes: str | tuple[str, ...] | None, head_axis: str | None = None,
                      scale: float | None = None, interpret: bool | pltpu.InterpretParams = False,
                      block_sizes: BlockSizes | None = None, selected=None):
    """`attention` with the batch split over `batch_axes` and the heads over `head_axis` of `mesh` (and a
    `topk` pattern's `selected` blocks with them).

    XLA cannot partition a Mosaic kernel (a plain jit over sharded inputs fails to compile on TPU);
    shard_map runs it on each device's own rows and heads. The product of the batch axes' sizes must
    divide the batch, and the head axis's size must divide kv_heads (each shard then holds whole GQA
    groups). `batch_axes` has no default: the library does not know the caller's axis names (the LM's
    training mesh splits the batch over ("data", "fsdp")); None leaves the batch whole. `mesh` may be
    abstract.
    """
    pattern = as_pattern(pattern)
    axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(mesh.shape[name] for name in axes)
    if q.shape[0] % shards:
        raise ValueError(f"batch_axes {axes} split the batch into {shards} shards, which must divide "
                         f"batch={q.shape[0]}")
    if head_axis is not None and k.shape[2] % mesh.shape[head_axis]:
        raise ValueError(f"head_axis {head_axis!r} of size {mesh.shape[head_axis]} must divide "
                         f"kv_heads={k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    spec = P(axes or None, None, head_axis, None)
    local = functools.partial(attention, pattern=pattern, scale=scale, interpret=interpret,
                              block_sizes=block_sizes)
    if selected is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v), mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec)(q, k, v)
    selected_spec = P(axes or None, head_axis, None, None)
    # The step lists built from the choice vary over the mesh axes; Pallas's interpreter slices them with
    # program ids that do not, which the varying-axes check rejects.
    return jax.shard_map(lambda q, k, v, chosen: local(q, k, v, selected=chosen), mesh=mesh,
                         in_specs=(spec, spec, spec, selected_spec), out_specs=spec,
                         check_vma=not interpret)(q, k, v, selected)
