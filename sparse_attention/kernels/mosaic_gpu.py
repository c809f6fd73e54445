"""Block-sparse flash attention for Hopper and later GPUs (sm90+): Pallas Mosaic GPU kernels.

Warp-specialized kernels: forward, dk/dv (which also computes dq, by default), and optionally a separate
dq kernel. Each thread block owns one row tile of the block layout at a time (a query tile for the forward
and dq passes, a key tile for dk/dv; one row per block, or, persistent, rows in turn) and runs `warpgroups`
compute warpgroups, each on its own 64-row slice of that tile, plus one memory warpgroup:

  memory warpgroup    walks the row's list of tiles (FULL tiles first, then PARTIAL ones, read as int32
                      scalars from GMEM) and issues the TMA loads of the streamed operands (K and V, or
                      Q, dO and the row statistics) into a ring of `stages` SMEM slots. Each load completes
                      on that slot's `loaded` barrier; a slot is refilled only after every compute
                      warpgroup has arrived on its `consumed` barrier.
  compute warpgroups  load their resident operands once (TMA), then for every step wait on the slot's
                      `loaded` barriers, multiply on the tensor cores (wgmma), apply the online softmax or
                      its gradient, and arrive on the `consumed` barriers. FULL tiles run unmasked; PARTIAL
                      tiles evaluate `pattern.mask(q_pos, k_pos) & (k_pos < seq_len)` on int32 iotas.
                      In the forward pass two compute warpgroups also take turns on the tensor cores
                      (a schedule barrier), so one's softmax overlaps the other's matrix multiplies.

  forward  rows = query tiles of warpgroups x block_q; saves the base-2 logsumexp per row. Where rows are
           short, persistent: one block per SM walks row after row, the K/V ring and a double query
           buffer running on from one row to the next (`persists`); so do dq and dk/dv where their rows are
           shorter still (`persists_backward`). A warpgroup multiplies only the 64-key halves of a PARTIAL
           tile that it attends (`half_tile_codes`).
  dk/dv    rows = key tiles of warpgroups x block_k_dkv, over the transposed layout; with GQA a block owns
           one kv head and streams the query tiles of every q head of its group. With `fused_dq` each step
           also multiplies its dS by the block's keys and reduce-adds that into a float32 dq (TMA), as
           FlashAttention-3's Hopper backward does: 5 matrix multiplies per tile pair.
  dq       (fused_dq=False) rows as the forward's; recomputes S and dP from the saved logsumexp: 7 in all.
           In both backward kernels a warpgroup skips the PARTIAL steps in which it has no pair
           (`empty_step_codes`), and a kernel whose rows are very unequal launches every head's longest row
           first (`deals_heads_fastest`).

Shapes: q [batch, seq, q_heads, head_dim], k/v [batch, seq, kv_heads, head_dim]; bfloat16 or float16,
head_dim 64 or 128. Sequences are zero-padded to a tile multiple inside and sliced outside.

A `topk` pattern's chosen blocks (`selected`, computed on the device) extend each row's steps: after its
static tiles, a forward or dq block walks the tiles of the blocks chosen for its query block (read from
the choice, valid entries first, in GMEM), and a dk/dv block the query tiles of the blocks that chose its
key block (`common.choosers`, the transpose built on the device). A chosen tile attends the keys the static
part does not, so no pair counts twice.

Interpret mode (CPU tests) runs the same kernels through Pallas' GPU interpreter, whose wgmma reads only
SMEM operands and cannot start from a given accumulator, and which has no TMA reduce-add: there
`_accumulate` stores register operands to an SMEM staging buffer first and adds each product to its
accumulator, and `_reduce_add` loads, adds and stores. docs/mosaic_gpu.md has the details.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparse_attention.kernels.common import (LOG2_E, ROW_MAX_INIT, KernelStatic, RowPlan, check_block_fields,
                                            check_selected, checked_block_sizes, choosers, cuda_capability_reason,
                                            dtype_reason, padded_flash, refuse_unsupported, row_plan, selection_reason)
from sparse_attention.layout import block_layout
from sparse_attention.patterns import EMPTY, Pattern, TileGrid, as_pattern

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128)
# Pallas' GPU interpreter runs each simulated warpgroup as a computation on XLA's CPU thread pool, and the
# warpgroups block on each other; with too few threads a training step deadlocks (on a 2-core CPU it hangs
# with SIGTERM ignored). The pool has PJRT_NPROC threads, else one per core, fixed when JAX starts; 16 is
# what the tests run the interpreter with.
INTERPRETER_MIN_THREADS = 16
WGMMA_ROWS = 64  # rows of one warpgroup's wgmma; every block is a multiple
HALF_TILE_KEYS = 64  # a PARTIAL forward step of 128 keys multiplies only the halves a warpgroup attends
MAX_BLOCK = 256
MAX_WARPGROUPS = 2  # per block of the dq and dk/dv kernels
# The forward may run three, FlashAttention-3's choice at head_dim 64 (192-row tiles, without ping-pong), each
# with 160 registers while its memory warpgroup keeps 24 (`_forward_memory_registers`).
MAX_FORWARD_WARPGROUPS = 3
# From this mean number of FULL steps per forward row (at two warpgroups' tiles) on, the default forward runs
# three warpgroups (`widens_forward`): it won on dense at 32k (127.5) and lost on rows of 0.5-7.
WIDE_FORWARD_MIN_FULL_STEPS = 64
MAX_STAGES = 4
# CUDA runtimes [12.8.0, 12.9.1): jax.experimental.pallas.ops.gpu.attention_mgpu refuses masked (causal)
# attention on them for a ptxas miscompilation; the partial tiles here are masked the same way.
MISCOMPILING_CUDA = (12080, 12091)
MEMORY_REGISTERS = 40  # per-thread registers left to the memory warpgroup, which only issues TMA
# The memory warpgroup's registers where the compute warpgroups need more: in the dk/dv kernel with the fused dq
# and deferred waits, whose compute warpgroups spilled 244-392 bytes at head_dim 128 with 232 registers each (24
# gives them 240, `_dkdv_memory_registers`), and in a forward of three compute warpgroups (160 each).
LEAN_MEMORY_REGISTERS = 24
DQ_SLICE_MULTIPLE = 64  # columns of one 128-byte swizzle tile of 16-bit keys: a wgmma B operand's slice unit
# From this mean number of steps per dk/dv block (row steps x q heads per kv head) on, the fused dq is the
# default at head_dim 128 (`fuses_dq`): it lost at 5 to 20 steps and won at 71 to 1,025.
FUSED_DQ_MIN_STEPS = 64
# Below this mean number of steps per forward row, the persistent forward is the default (`persists`): it
# won at 2.5 to 10 steps and did not at 128 (dense).
PERSISTENT_MAX_STEPS = 64
# Below this mean number of steps per dq or dk/dv block (dk/dv: row steps x q heads per kv head), those kernels
# run persistent by default (`persists_backward`): they won at 5-7 steps and lost at 18 and beyond.
PERSISTENT_BACKWARD_MAX_STEPS = 16
# From this fraction of a dq or dk/dv kernel's warpgroup steps without a pair on, the kernel skips them by default
# (`skips_empty_steps`): it won at 5.6 % and more (window, block, repairs) and lost at 0.2 % (dense).
SKIP_MIN_FRACTION = 0.01
# From this ratio of a kernel's longest row to its mean row on, a kernel of one block per row launches heads
# fastest by default (`deals_heads_fastest`): it won 22 % at 26x (a sink's dk/dv row), 2 % at 2x (dense, at 32k,
# and is suspected of dense's slowdown at 128k), nothing at 1x and 4.5x.
HEADS_FASTEST_MIN_SKEW = 8
_FLAT_GRID = "block"  # every kernel's grid: one block per row, or per SM (persistent)
SMEM_BYTES = 227 * 1024  # the most SMEM a Hopper thread block may have
# Beyond the buffers, for barriers and alignment: Mosaic GPU counted 2,928 bytes more than the buffers of one
# forward (one warpgroup, 3 stages, head_dim 128).
SMEM_MARGIN = 8 * 1024
HOPPER_SMS = 132  # an H100 or H200 SXM: the persistent forward's block count where no GPU is visible
# Blocks of the persistent forward in interpret mode: few, so that the tests walk several rows per block.
INTERPRET_BLOCKS = 3
_WARPGROUP = "warpgroup"
# 128-byte swizzle with (8, 64) tiles: the SMEM layout wgmma reads without bank conflicts (16-bit data).
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles, compute warpgroups and pipeline depth of the three kernels; docs/mosaic_gpu.md gives reasons.

    Forward: a thread block works on warpgroups x block_q query rows at a time (block_q per compute
    warpgroup) and streams [block_k] key tiles through `stages` SMEM slots; `persistent`: True, one block
    per SM walks row after row, False, one block per row, None, whichever was faster in the measurements
    (`persists`). dk/dv: a block owns warpgroups_dkv x
    block_k_dkv keys and streams [block_q_dkv] query tiles. `fused_dq`: True, the dk/dv blocks also compute
    dq and add it into a float32 buffer (5 matrix multiplies per tile pair); False, a dq kernel, with the
    *_dq fields laid out as the forward's, computes it (7); None, whichever was faster in the measurements
    (`fuses_dq`). `persistent_dq`, `persistent_dkdv`: the dq and dk/dv kernels persistent as the forward,
    True, False, or None, whichever was faster in the measurements (`persists_backward`). `half_tiles`: a
    forward warpgroup multiplies only the 64-key halves of a PARTIAL 128-key tile that it attends
    (`half_tile_codes`). `skip_empty_steps`: a dq or dk/dv warpgroup skips the multiplies of a PARTIAL step in
    which it has no pair (`empty_step_codes`); True, False, or None, where the measurements say it pays
    (`skips_empty_steps`). `heads_fastest`: a kernel's rows launch (or, persistent, are dealt out) with heads
    and batch entries fastest, so that every head's longest row starts first, rather than row tiles fastest
    (`_block_rows`); True, False, or None, whichever was faster (`deals_heads_fastest`). `overlap_softmax`: on
    FULL forward steps a warpgroup issues each step's P V together with the next step's Q Kᵀ and takes that
    step's softmax while P V runs; True, False, or None, where it was faster (`overlaps_softmax`).
    `overlap_dq`, `overlap_dkdv`: a warpgroup of the separate dq kernel, or of the dk/dv kernel, issues a step's
    S and dP products at once and takes the probabilities while dP runs: in the dq kernel True, False, or None,
    where it was faster (`overlaps_dq`); in the dk/dv kernel off by default (it lost 0.6-22 %).
    `defer_backward_waits`: a dk/dv warpgroup waits for a product only where it reads it:
    it takes dS while dV's product runs, and stores dS and multiplies the fused dq while dK's runs; True, False,
    or None, where it was faster (`defers_backward_waits`). `late_prefetch`: a forward or dq block that walks
    several rows with two buffers issues the next row's resident loads after the row's first step rather than at
    its start, so that the wait for the last row's results to leave SMEM overlaps that step (`_walk_rows`); True,
    False, or None, where it was faster (`prefetches_late`). Blocks are multiples of 64 up to 256, warpgroups 1
    to 3 in the forward (two take turns on the tensor cores; one or three do not) and 1 or 2 in the others, stages
    1 to 4.
    """

    block_q: int = 64
    block_k: int = 128
    warpgroups: int = 2
    stages: int = 2

    block_q_dq: int = 64
    block_k_dq: int = 64
    warpgroups_dq: int = 2
    stages_dq: int = 2

    block_k_dkv: int = 64
    block_q_dkv: int = 64
    warpgroups_dkv: int = 2
    stages_dkv: int = 2

    fused_dq: bool | None = None
    persistent: bool | None = None
    persistent_dq: bool | None = None
    persistent_dkdv: bool | None = None
    half_tiles: bool = True
    skip_empty_steps: bool | None = None
    heads_fastest: bool | None = None
    overlap_softmax: bool | None = None
    overlap_dq: bool | None = None
    overlap_dkdv: bool = False
    defer_backward_waits: bool | None = None
    late_prefetch: bool | None = None

    def __post_init__(self):
        check_block_fields(self, {
            "block_": (lambda block: block % WGMMA_ROWS == 0 and block <= MAX_BLOCK,
                       f"a multiple of {WGMMA_ROWS} up to {MAX_BLOCK}"),
            "warpgroups": (lambda count: count <= MAX_FORWARD_WARPGROUPS, f"1 to {MAX_FORWARD_WARPGROUPS}"),
            "warpgroups_": (lambda count: count <= MAX_WARPGROUPS, f"1 to {MAX_WARPGROUPS}"),
            "stages": (lambda count: count <= MAX_STAGES, f"1 to {MAX_STAGES}"),
        })

    @classmethod
    def for_head_dim(cls, head_dim: int, pattern: Pattern | None = None, seq_len: int | None = None) -> "BlockSizes":
        """Defaults for head_dim 64 or 128: a third forward stage fits in SMEM at 64. Given the pattern and the
        sequence length, also three forward warpgroups where its rows are long and unmasked (`widens_forward`)."""
        if (pattern is None) != (seq_len is None):
            raise ValueError("BlockSizes.for_head_dim: give the pattern and seq_len together, or neither")
        sizes = cls(stages=3) if head_dim <= 64 else cls()
        if pattern is not None and widens_forward(sizes, pattern, seq_len):
            sizes = dataclasses.replace(sizes, warpgroups=MAX_FORWARD_WARPGROUPS)
        return sizes

    @property
    def forward_tile(self) -> tuple[int, int]:
        """(query rows, keys) of one forward layout tile."""
        return self.block_q * self.warpgroups, self.block_k

    @property
    def dq_tile(self) -> tuple[int, int]:
        return self.block_q_dq * self.warpgroups_dq, self.block_k_dq

    @property
    def dkdv_tile(self) -> tuple[int, int]:
        return self.block_q_dkv, self.block_k_dkv * self.warpgroups_dkv

    @property
    def sequence_multiple(self) -> int:
        """Sequences are padded to a multiple of every tile side."""
        return math.lcm(*self.forward_tile, *self.dq_tile, *self.dkdv_tile)


# ------------------------------------------------------------------------------------------------ plans


@functools.lru_cache(maxsize=128)
def step_plan(pattern: Pattern, seq_len: int, block_q: int, block_k: int, by_key: bool) -> RowPlan:
    """The plan of the forward/dq pass (by_key=False: rows are [block_q] query tiles over [block_k] key
    tiles) or of the dk/dv pass (by_key=True: rows are [block_k] key tiles over [block_q] query tiles),
    from `block_layout` with whole tiles, rows with the most tiles first. The kernels walk each row's
    tiles as one sequence of steps: they read `RowPlan.steps`."""
    layout = block_layout(pattern, seq_len, block_q, block_k)
    column_tile = block_q if by_key else block_k
    return row_plan(layout.backward if by_key else layout.forward, column_tile, column_tile)


@functools.lru_cache(maxsize=128)
def piece_codes(pattern: Pattern, seq_len: int, part: int, column_tile: int, parts: int, pieces: int,
                by_key: bool) -> np.ndarray | None:
    """Which pieces of each PARTIAL step's column tile each compute warpgroup attends: int32 [programs, width]
    over the PARTIAL steps of `step_plan`'s programs (rows of `parts` warpgroups of `part` positions each, queries
    or, `by_key`, keys; columns of `column_tile`, cut into `pieces` equal pieces). Warpgroup w's bit for piece h
    is bit pieces * w + h, set where one of its rows' pairs with one of the piece's columns attends. None where
    every warpgroup attends every piece of every PARTIAL step, so that no step would change."""
    piece = column_tile // pieces
    if by_key:
        plan = step_plan(pattern, seq_len, column_tile, parts * part, True)
        grid = TileGrid(seq_len, piece, part)
    else:
        plan = step_plan(pattern, seq_len, parts * part, column_tile, False)
        grid = TileGrid(seq_len, part, piece)
    tiles = plan.partial_tiles
    programs, steps = np.nonzero(plan.partial_steps)
    codes = np.zeros(tiles.shape, np.int32)
    for warpgroup in range(parts):
        row_parts = plan.rows[programs].astype(np.int64) * parts + warpgroup
        for index in range(pieces):
            column_pieces = tiles[programs, steps].astype(np.int64) * pieces + index
            q_units, k_units = (column_pieces, row_parts) if by_key else (row_parts, column_pieces)
            inside = (q_units * grid.block_q < seq_len) & (k_units * grid.block_k < seq_len)
            attends = np.zeros(len(programs), bool)
            attends[inside] = pattern.classify_tiles(grid, q_units[inside], k_units[inside]) != EMPTY
            codes[programs, steps] |= attends.astype(np.int32) << (pieces * warpgroup + index)
    return None if (codes[programs, steps] == (1 << pieces * parts) - 1).all() else codes


def half_tile_codes(pattern: Pattern, seq_len: int, block_q: int, block_k: int,
                    warpgroups: int) -> np.ndarray | None:
    """Which halves of each PARTIAL forward step's key tile each compute warpgroup attends, so that it multiplies
    only those: `piece_codes` of the forward's plan in two pieces (warpgroup w's low half at bit 2w, high half at
    2w + 1; 0: it has no key in the tile).

    The causal diagonal gives warpgroup 0 only the low half of its tile, a window's far edge gives the last
    warpgroup only the high half, and a 64-key bridge is one half: at 32k, whole tiles would multiply 6 % more
    than these halves on window(1024)'s rows (9 tiles), 11 % more on block(512)'s, 19 % on bridge's. None
    where no step would be split: `block_k` is not two halves of HALF_TILE_KEYS, or every warpgroup attends
    both halves of every PARTIAL step."""
    if block_k != 2 * HALF_TILE_KEYS:
        return None
    return piece_codes(pattern, seq_len, block_q, block_k, warpgroups, 2, False)


def empty_step_codes(pattern: Pattern, seq_len: int, part: int, column_tile: int, warpgroups: int,
                     by_key: bool) -> np.ndarray | None:
    """Which compute warpgroups of the dq kernel (by_key False: `part` queries each over [column_tile] key
    tiles) or of the dk/dv kernel (by_key True: `part` keys each over [column_tile] query tiles) have a pair in
    each PARTIAL step: `piece_codes` in one piece, warpgroup w's bit at w. A warpgroup whose bit is clear skips
    the step's multiplies (`BlockSizes.skip_empty_steps`): the causal diagonal leaves dq's warpgroup 0 and dk/dv's
    last warpgroup without a pair, as does a window's far edge the others. None where every warpgroup has a pair
    in every PARTIAL step."""
    return piece_codes(pattern, seq_len, part, column_tile, warpgroups, 1, by_key)


def fuses_dq(block_sizes: BlockSizes, head_dim: int, group: int, dkdv_plan: RowPlan) -> bool:
    """Whether the backward computes dq in the dk/dv kernel: `block_sizes.fused_dq`, or if that is None, at
    head_dim 64 always, and at 128 where a dk/dv block walks FUSED_DQ_MIN_STEPS steps or more on average:
    its row's steps (`dkdv_plan`) for each of the `group` q heads that share its kv head.

    On the H200 (docs/benchmarks.md, "The fused dq") the fused backward took 0.91-0.95x the separate dq
    kernel's forward+backward time at head_dim 64 on every pattern measured. At 128 it won on dense (257
    and 1,025 steps per block: 0.93-0.97x) and on window(1024) with 4 q heads per kv head (71 steps:
    0.95-0.99x), and lost on window(1024) with one (18 steps: 0.99-1.07x) and on block(512) and the repairs
    (5-7 steps, 20 for block(512) with 4 q heads per kv head: 1.19-1.40x), whose short blocks cannot repay
    the two passes over the float32 buffer and a barrier per step."""
    if block_sizes.fused_dq is not None:
        return block_sizes.fused_dq
    return head_dim <= 64 or group * _mean_steps(dkdv_plan) >= FUSED_DQ_MIN_STEPS


def widens_forward(defaults: BlockSizes, pattern: Pattern, seq_len: int) -> bool:
    """Whether the default forward takes three compute warpgroups (192-row tiles) rather than two: where the
    rows of the two-warpgroup tiles walk at least WIDE_FORWARD_MIN_FULL_STEPS FULL (unmasked) steps on average,
    and the pattern chooses no blocks on the device (whose block must be a multiple of every tile side).

    On the H200 at 32k (results/kernel_bench/three_warpgroups/) three warpgroups took dense's forward to 0.874x
    (head_dim 64, with the overlapped softmax) and 0.925x (128, without it) of two's, but 1.31-1.83x on
    window(1024), 1.50x on window(256), 1.83-1.98x on block(512) and the prefix repair, whose rows are short and
    a large share of their steps masked."""
    if pattern.block_selection() is not None:
        return False
    plan = step_plan(pattern, seq_len, *defaults.forward_tile, False)
    return float(np.mean(plan.num_full)) >= WIDE_FORWARD_MIN_FULL_STEPS


def overlaps_softmax(choice: bool | None, head_dim: int, warpgroups: int) -> bool:
    """Whether the forward overlaps a step's softmax with the step before's P V (`BlockSizes.overlap_softmax`):
    `choice`, or if that is None, at head_dim 128 with one or two compute warpgroups and at 64 with three.

    On the H200 at 32k (docs/benchmarks.md, "The overlapped softmax") with two it took 0.961-0.981x the forward
    time of the plain steps on dense and window(1024) at head_dim 128, with 16 and 4 kv heads, and 0.991-0.998x
    on block(512) and the prefix repair, whose rows have 2-3 FULL steps; at head_dim 64 1.055-1.058x on dense
    and window(1024): there P V is half as long while the softmax is as long as at 128, and the softmax's
    exponentials are the bottleneck already. With three (160 registers each; results/kernel_bench/
    three_warpgroups/) it took dense's forward from 0.940x to 0.874x two warpgroups' time at head_dim 64, and from
    0.925x to 1.310x at 128, where the two score tiles it holds do not fit."""
    if choice is not None:
        return choice
    return (head_dim > 64) != (warpgroups == MAX_FORWARD_WARPGROUPS)


def persists(block_sizes: BlockSizes, forward_plan: RowPlan) -> bool:
    """Whether the forward runs one persistent block per SM: `block_sizes.persistent`, or if that is None,
    where its rows (`forward_plan`) walk fewer than PERSISTENT_MAX_STEPS steps on average.

    On the H200 at 32k (docs/benchmarks.md, "The persistent forward") one block per SM took 0.69-0.92x the
    time of one block per row on rows of 2.5-10 steps (block(512), the repairs, window(1024), with GQA and at
    head_dim 64 too): a short row's start (its queries' load, the pipeline's fill) and end (the output's
    store) no longer leave the tensor cores idle. On dense (128 steps on average) it was level to 6 % slower:
    rows that long hide their ends already, and the hardware's own scheduling of one block per row balances
    rows of unequal length better than a fixed round-robin."""
    if block_sizes.persistent is not None:
        return block_sizes.persistent
    return _mean_steps(forward_plan) < PERSISTENT_MAX_STEPS


def defers_backward_waits(choice: bool | None, persistent_dkdv: bool) -> bool:
    """Whether the dk/dv kernel defers its waits (`BlockSizes.defer_backward_waits`): `choice`, or if that is None,
    where the kernel is not persistent.

    On the H200 at 32k (results/kernel_bench/defer_backward_waits/) the defaults with it took 0.93-0.94x the
    forward+backward time of those without on dense (16 and 4 kv heads, head_dim 128 and 64), 0.94-0.98x on
    window(1024), 0.92x on random_blocks(512, 3, 0) and 0.96-0.97x on window(256) and the prefix repair with the
    `small` preset's 3 q heads per kv head, whose dk/dv kernels run one block per row; explicitly deferred, it
    took 1.01x of block(512), 1.03x of the prefix repair and 1.13x of the bridge with 16 kv heads, whose short
    dk/dv rows run persistent."""
    return choice if choice is not None else not persistent_dkdv


def prefetches_late(choice: bool | None, overlapped_forward: bool) -> bool:
    """Whether persistent forward and dq blocks issue a row's next loads after its first step
    (`BlockSizes.late_prefetch`): `choice`, or if that is None, where the forward overlaps its softmax
    (`overlaps_softmax`).

    On the H200 at 32k (results/kernel_bench/late_prefetch/) it took 0.944-0.983x the forward time of the
    defaults on block(512), the prefix repair, window(1024) and sinks(64) | window(1024) at head_dim 128, where the
    forward overlaps, and 0.978-1.000x their forward+backward time; at head_dim 64, where it does not, 1.009-1.018x
    on block(512) and window(1024)'s forward: there the hook runs in every step of the loop (`_walk`)."""
    if choice is not None:
        return choice
    return overlapped_forward


def overlaps_dq(choice: bool | None, persistent_dq: bool) -> bool:
    """Whether the separate dq kernel overlaps its products (`BlockSizes.overlap_dq`): `choice`, or if that is
    None, where the kernel is not persistent.

    On the H200 at 32k with head_dim 128 (results/kernel_bench/overlap_by_kernel/) it took 0.978-0.989x the
    forward+backward time of window(1024), sinks(64) | window(1024) and random_blocks(512, 3, 0), whose dq
    kernels run one block per row, and 0.998x and 1.011x (level) of block(512) and the prefix repair, whose run
    persistent. The dk/dv kernel's own overlap (`overlap_dkdv`) lost 0.6-22 % in the same runs."""
    return choice if choice is not None else not persistent_dq


def _dkdv_memory_registers(fused: bool, deferred: bool) -> int:
    """The dk/dv kernel's memory warpgroup's registers: LEAN_MEMORY_REGISTERS where its compute
    warpgroups hold dk, dv and the fused dq's product with deferred waits, else MEMORY_REGISTERS. At 32k on the
    H200 (with 24 in every kernel) that took 0.89-0.96x the deferred forward+backward time of dense and of
    window(1024) with 4 kv heads, whose dk/dv kernels fuse dq, and 1.02x of window(1024) with 16, whose does
    not; without deferred waits 0.97-1.03x."""
    return LEAN_MEMORY_REGISTERS if fused and deferred else MEMORY_REGISTERS


def _forward_memory_registers(warpgroups: int) -> int:
    """The forward's memory warpgroup's registers: LEAN_MEMORY_REGISTERS beside three compute warpgroups, so
    that each gets 160 (as in FlashAttention-3's three-warpgroup forward), else MEMORY_REGISTERS."""
    return LEAN_MEMORY_REGISTERS if warpgroups == MAX_FORWARD_WARPGROUPS else MEMORY_REGISTERS


def persists_backward(choice: bool | None, plan: RowPlan, repeats: int = 1) -> bool:
    """Whether the dq kernel (`plan` its plan, repeats 1) or the dk/dv kernel (its plan, `repeats` the q heads
    per kv head, each of which a row walks) runs one persistent block per SM: `choice`
    (`BlockSizes.persistent_dq`, `persistent_dkdv`), or if that is None, where its blocks walk fewer than
    PERSISTENT_BACKWARD_MAX_STEPS steps on average.

    On the H200 at 32k (results/kernel_bench/persistent_backward/) both persistent took 0.86x the
    forward+backward time of block(512) and 0.93x of bridge at head_dim 128 (dk/dv rows of 5-7 steps), 0.94x
    of block(512) at head_dim 64; 1.01-1.02x of window(1024) (18 steps), 1.26x of dense, and with 4 q heads
    per kv head (dk/dv rows of 20 and 72 steps) 1.04x of block(512) and 1.26x of window(1024)."""
    if choice is not None:
        return choice
    return repeats * _mean_steps(plan) < PERSISTENT_BACKWARD_MAX_STEPS


def skips_empty_steps(choice: bool | None, plan: RowPlan, codes: np.ndarray | None, warpgroups: int) -> bool:
    """Whether the dq or dk/dv kernel (`plan`, and `codes` its `empty_step_codes` over `warpgroups`) skips the
    steps in which a warpgroup has no pair: never where no warpgroup lacks a pair (codes None); else `choice`
    (`BlockSizes.skip_empty_steps`), or if that is None, where at least SKIP_MIN_FRACTION of its warpgroups'
    steps have no pair (`empty_step_fraction`).

    On the H200 at 32k (results/kernel_bench/empty_steps/) walking every step took 1.03-1.08x the
    forward+backward time of skipping on block(512), window(1024) and the repairs at head_dim 128 (5.6-21 % of
    warpgroup steps skipped), 1.00-1.07x at head_dim 64 and with 4 q heads per kv head; on dense (0.2 %) it took
    0.98x: there the switch between the two step bodies costs more than the steps it saves."""
    if codes is None:
        return False
    if choice is not None:
        return choice
    return empty_step_fraction(plan, codes, warpgroups) >= SKIP_MIN_FRACTION


def empty_step_fraction(plan: RowPlan, codes: np.ndarray, warpgroups: int) -> float:
    """The fraction of a kernel's warpgroup steps (rows' steps x warpgroups) in which the warpgroup has no pair,
    from its `empty_step_codes`."""
    partial = codes[plan.partial_steps]
    empty = sum(int((partial >> warpgroup & 1 == 0).sum()) for warpgroup in range(warpgroups))
    return empty / max(warpgroups * int((plan.num_full + plan.num_partial).sum()), 1)


def deals_heads_fastest(choice: bool | None, persistent: bool, plan: RowPlan) -> bool:
    """Whether a kernel's rows go out with (heads, batch) fastest rather than row tiles fastest (`_block_rows`):
    `choice` (`BlockSizes.heads_fastest`), or if that is None, where the kernel runs one block per row and its
    longest row (`plan`) walks at least HEADS_FASTEST_MIN_SKEW times the mean row's steps.

    On the H200 at 32k (results/kernel_bench/row_order/) heads fastest took 0.78x the forward+backward time of
    sinks(64) | window(1024): its dk/dv row of the sink keys walks every query tile (512 steps, 20 on average,
    26x), and with row tiles fastest the last heads' such rows launched near the kernel's end and ran on after
    the rest. It took 0.98x of dense's forward+backward (2x), 0.99-1.00x of window(1024)'s (1x) and
    random_blocks(512, 3, 0)'s (4.5x); but 1.10x of block(512)'s forward and 1.05x of its forward+backward,
    whose kernels are all persistent. At 128k, with heads fastest for every kernel of one block per row, dense's
    forward+backward took 1.19x cuDNN's time, against 1.08x before (results/kernel_bench/h200_128k_all/; the
    GPU ran at its power cap). Row tiles fastest, where the blocks at work share one head's stream of keys and
    values in L2, was not timed against it at 128k, so only rows far more unequal than dense's go heads
    fastest."""
    if choice is not None:
        return choice
    steps = plan.num_full + plan.num_partial
    return not persistent and int(steps.max(initial=0)) >= HEADS_FASTEST_MIN_SKEW * _mean_steps(plan)


def _mean_steps(plan: RowPlan) -> float:
    return float((plan.num_full + plan.num_partial).sum()) / max(len(plan.rows), 1)


def _step_tile(tiles_ref, program, step, num_full, contiguous: bool):
    """The tile of one of the block's steps (see `RowPlan.steps`)."""
    if not contiguous:
        return tiles_ref[program, step]
    return jnp.where(step < num_full, tiles_ref[program, 0] + step, tiles_ref[program, 1] + (step - num_full))


# What a step masks: nothing (FULL tiles), the pattern (PARTIAL tiles), or, on a tile of a block a `topk`
# pattern chose, the keys its static part attends already (so no pair counts twice).
UNMASKED, PATTERN, CHOSEN = None, "pattern", "chosen"


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The steps of one block: its row's static tiles (`RowPlan.steps`), then, for a `topk` pattern, the
    tiles of the blocks in `chosen` (lists_ref[batch, head, row_block, :count], each `per_block` tiles)."""

    tiles_ref: Any
    program: Any
    num_full: Any
    num_steps: Any  # static steps
    contiguous: bool
    chosen: tuple | None = None  # (lists_ref, counts_ref, batch, head, row_block, per_block)

    @property
    def total(self):
        if self.chosen is None:
            return self.num_steps
        _, counts_ref, batch, head, row_block, per_block = self.chosen
        return self.num_steps + counts_ref[batch, head, row_block] * per_block

    def tile(self, step):
        """The column tile of any step: static, or chosen (step >= num_steps)."""
        if self.chosen is None:
            return _step_tile(self.tiles_ref, self.program, step, self.num_full, self.contiguous)
        last_static = jnp.maximum(jnp.minimum(step, self.num_steps - 1), 0)  # in bounds for either kind
        static = _step_tile(self.tiles_ref, self.program, last_static, self.num_full, self.contiguous)
        lists_ref, _, batch, head, row_block, per_block = self.chosen
        index = jnp.maximum(step - self.num_steps, 0)
        slot = jnp.minimum(lax.div(index, jnp.int32(per_block)), lists_ref.shape[-1] - 1)
        chosen = lists_ref[batch, head, row_block, slot] * per_block + lax.rem(index, jnp.int32(per_block))
        return jnp.where(step < self.num_steps, static, chosen)


def _chosen_view(static: KernelStatic, refs, column_tile: int, batch, head, row_start):
    """(the refs after a `topk` choice's two, the `_Steps.chosen` of a block whose row starts at row_start);
    (refs, None) for a static pattern. The row lies in one block: `_selection_reason` checks the tiles."""
    topk = static.pattern.block_selection()
    if topk is None:
        return refs, None
    lists_ref, counts_ref, *rest = refs
    return rest, (lists_ref, counts_ref, batch, head, lax.div(row_start, jnp.int32(topk.size)),
                  topk.size // column_tile)


def _step_code(codes_ref, steps: _Steps, index, warpgroup, bits: int):
    """Warpgroup `warpgroup`'s `bits`-bit code of the row's PARTIAL step `index`, from `piece_codes`."""
    code = codes_ref[steps.program, index - steps.num_full]
    return lax.rem(lax.shift_right_logical(code, bits * warpgroup), 1 << bits)


def _walk(steps: _Steps, step, carry, full: bool = True, after_first=None):
    """carry through step(mask, index, carry) over the block's FULL (unless not `full`: walked already),
    PARTIAL and chosen steps. after_first(), if given, runs once: after step 0 where it is walked here, or at the
    end of a row without steps."""
    if after_first is not None:
        inner = step

        def step(mask, index, carry):
            carry = inner(mask, index, carry)
            pl.when(index == 0)(after_first)
            return carry

    carry = _walk_kinds(steps, step, carry, full)
    if after_first is not None:
        pl.when(steps.total == 0)(after_first)
    return carry


def _walk_kinds(steps: _Steps, step, carry, full: bool):
    if full:
        carry = lax.fori_loop(0, steps.num_full, functools.partial(step, UNMASKED), carry)
    carry = lax.fori_loop(steps.num_full, steps.num_steps, functools.partial(step, PATTERN), carry)
    if steps.chosen is None:
        return carry
    return lax.fori_loop(steps.num_steps, steps.total, functools.partial(step, CHOSEN), carry)


# ------------------------------------------------------------------------------------ kernel building blocks


def _matmul(a, b, *, while_running=None):
    """a @ b in float32 on the tensor cores (wgmma); a [m, k] and b [k, n] are SMEM refs.

    `while_running()` runs after the wgmma is issued and before its result is read.
    """

    def issue_and_read(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if while_running is not None:
            while_running()
        return acc_ref[...]

    return pl.run_scoped(issue_and_read, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))


def _matmul_pair(first, second, then, interpreted: bool):
    """(then(a1 @ b1), a2 @ b2) in float32 for first = (a1, b1) and second = (a2, b2), SMEM refs: both products
    are issued at once, and then() runs on the first while the second is still on the tensor cores. In interpret
    mode (whose wgmma is synchronous) the same, in order."""
    if interpreted:
        return then(_matmul(*first)), _matmul(*second)

    def issue_both(first_ref, second_ref):
        plgpu.wgmma(first_ref, *first)
        plgpu.wgmma(second_ref, *second)
        return then(plgpu.wgmma_accumulator_load(first_ref, wait_n=1)), second_ref[...]

    return pl.run_scoped(issue_both, *[plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32) for a, b in (first, second)])


def _accumulate(acc, a, b, stage):
    """acc + a @ b in float32 on the tensor cores; a [m, k] is a value in registers (probabilities or
    their gradient), b [k, n] an SMEM ref.

    On the hardware (stage None) `a` feeds wgmma from registers and the product accumulates in place. In
    interpret mode `stage` is an [m, k] SMEM buffer: the interpreter's wgmma reads only SMEM operands and
    starts from a zero accumulator, so `a` is stored there first and the product is added afterwards.
    """
    if stage is None:
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))
    stage[...] = a
    plgpu.commit_smem()  # make the stores visible to wgmma's (async proxy) reads
    return acc + _matmul(stage, b)


def _tile_mask(pattern: Pattern, seq_len: int, shape, q_start, k_start, transposed: bool = False,
               chosen: bool = False):
    """bool [rows, cols] in the wgmma accumulator layout: which pairs of a partial (or, `chosen`, a CHOSEN)
    tile attend.

    Rows are queries from q_start and columns keys from k_start, or the reverse when `transposed`. The
    positions are int32 iotas made where they are used (cheaper than keeping them live in registers);
    padded keys (k >= seq_len) never attend.
    """
    rows, cols = (plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA) for axis in (0, 1))
    if transposed:
        k_pos, q_pos = k_start + rows, q_start + cols
    else:
        q_pos, k_pos = q_start + rows, k_start + cols
    static = pattern.mask(q_pos, k_pos)
    if chosen:  # a select, not ~static: Mosaic GPU cannot lower a bool negation (jax 0.11.2)
        return jnp.where(static, False, k_pos < seq_len)
    return static & (k_pos < seq_len)


def _rows(vector, shape):
    """[rows] -> [rows, cols], repeated along the columns."""
    return lax.broadcast_in_dim(vector, shape, [0])


def _columns(vector, shape):
    """[cols] -> [rows, cols], repeated along the rows."""
    return lax.broadcast_in_dim(vector, shape, [1])


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _row_vector(value, rows):
    return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def _compute_registers(warpgroups: int, memory_registers: int = MEMORY_REGISTERS) -> int:
    """Per-thread registers of each compute warpgroup: the 512 per thread of a 128-thread share of the
    register file, less the memory warpgroup's, split evenly, at most 256, in multiples of 8."""
    return min(256, (512 - memory_registers) // warpgroups) // 8 * 8


def _slot(step, stages: int):
    return lax.rem(step, jnp.int32(stages))


def _stream(num_steps, stages: int, groups, first_step=0):
    """The memory warpgroup's loads of steps first_step..first_step+num_steps-1 (counted over the whole
    kernel, so that a persistent block's rows share one ring): TMA loads into SMEM slots step % stages.

    groups: [(consumed barriers [stages], [(source(i) -> GMEM ref for the row's step i, SMEM buffers
    [stages, ...], loaded barriers [stages]), ...])]. A group's slot is refilled once every compute
    warpgroup has arrived on the group's consumed barrier for the step that last used it.
    """

    @pl.loop(0, num_steps)
    def _(index):
        step = first_step + index
        slot = _slot(step, stages)
        for consumed, copies in groups:

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            for source, buffers, loaded in copies:
                plgpu.copy_gmem_to_smem(source(index), buffers.at[slot], loaded.at[slot])


def _observe_last(num_steps, stages: int, consumed_barriers):
    """The memory warpgroup's wait on the consumptions of the last `stages` of num_steps steps: a warpgroup
    that waits on a barrier waits on all of its phases (the interpreter checks this; on the hardware it only
    holds the warpgroup until compute is done)."""

    @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
    def _(step):
        for consumed in consumed_barriers:
            plgpu.barrier_wait(consumed.at[_slot(step, stages)])


def _kernel(body, out_type, scratch, *, grid, static: KernelStatic, name: str, warpgroups: int):
    """plgpu.kernel over a flat grid of blocks (`_flat_grid`) of warpgroups + 1 warpgroups."""
    if isinstance(static.interpret, plgpu.InterpretGPUParams):
        interpret = static.interpret
    else:
        interpret = plgpu.InterpretGPUParams() if static.interpret else None
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=(_FLAT_GRID,),
        num_threads=warpgroups + 1,
        thread_name=_WARPGROUP,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )


def _smem(shape, dtype, swizzled: bool = True):
    return plgpu.SMEM(shape, dtype, transforms=_SWIZZLED if swizzled else ())


def _resident_buffers(persistent: bool, row_bytes: int, ring_bytes: int, other_bytes: int = 0) -> int:
    """How many buffers a block keeps of its row-resident operands (row_bytes per row): two for a persistent
    block, so that the next row's load overlaps this row, where they fit in SMEM beside the ring and the rest
    (with a margin for barriers and alignment); else one."""
    fits = 2 * row_bytes + ring_bytes + other_bytes + SMEM_MARGIN <= SMEM_BYTES
    return 2 if persistent and fits else 1


def _flat_grid(rows: int, persistent: bool, interpret) -> tuple[int]:
    """One block per row, or for a persistent kernel as many as run at once (at most one per row)."""
    return (min(rows, _resident_blocks(interpret)) if persistent else rows,)


def _resident_blocks(interpret) -> int:
    """How many blocks of a persistent kernel run at once: one per SM (each takes most of an SM's SMEM)."""
    if interpret:
        return INTERPRET_BLOCKS
    try:
        return jax.devices("gpu")[0].core_count
    except RuntimeError:  # lowering for a GPU from a machine without one (jax.export)
        return HOPPER_SMS


# ---------------------------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Row:
    """One row of a kernel's work and its steps: a query tile of one q head (forward, dq) or a key tile of one
    kv head (dk/dv), of one batch entry."""

    head: Any
    batch: Any
    kv_head: Any
    row_start: Any
    refs: tuple  # the kernel's refs after a topk choice's two
    steps: _Steps


def _block_rows(rows_ref, tiles_ref, counts_ref, refs, static: KernelStatic, *, group: int, contiguous: bool,
                heads_fastest: bool, row_height: int, column_tile: int, heads: int, batches: int):
    """(this block's number of rows, row(j) -> its j-th `_Row`) over a flat grid. Block b takes rows b,
    b + blocks, ... of the (row tiles, heads, batch) rows, row tiles fastest (in launch order, heaviest first,
    within a head), or `heads_fastest`, (heads, batch) fastest (every head's heaviest row first;
    `deals_heads_fastest`). With one block per row, each block's one row. heads: q heads sharing kv heads in
    groups of `group`, or for dk/dv kv heads (group 1)."""
    block, blocks = lax.axis_index(_FLAT_GRID), lax.axis_size(_FLAT_GRID)
    row_tiles = rows_ref.shape[0]
    count = lax.div(row_tiles * heads * batches - 1 - block, blocks) + 1

    def row(j):
        item = block + j * blocks
        if heads_fastest:
            program, rest = lax.div(item, heads * batches), lax.rem(item, heads * batches)
        else:
            program, rest = lax.rem(item, row_tiles), lax.div(item, row_tiles)
        head, batch = lax.rem(rest, heads), lax.div(rest, heads)
        kv_head = lax.div(head, jnp.int32(group))
        row_start = rows_ref[program] * row_height
        arrays, chosen = _chosen_view(static, refs, column_tile, batch, kv_head, row_start)
        steps = _Steps(tiles_ref, program, counts_ref[program, 0], counts_ref[program, 1], contiguous, chosen)
        return _Row(head, batch, kv_head, row_start, tuple(arrays), steps)

    return count, row


def _stream_rows(count, row, stages: int, groups, consumed_barriers, repeats: int = 1):
    """The memory warpgroup's loop over its block's rows: `_stream` of each row's steps, `repeats` times over
    (dk/dv: once per q head of the group; groups(row) as `_stream`'s groups), the ring running on from one row
    to the next, then the last consumptions."""

    def stream_row(j, first_step):
        work = row(j)
        _stream(repeats * work.steps.total, stages, groups(work), first_step)
        return first_step + repeats * work.steps.total

    _observe_last(lax.fori_loop(0, count, stream_row, jnp.int32(0)), stages, consumed_barriers)


def _walk_rows(count, buffers: int, load, attend, late: bool = False):
    """A compute warpgroup's loop over its block's rows. load(j, buffer) issues row j's resident loads into
    `buffer`; attend(j, buffer, first_step, prefetch) waits for them, walks the row's steps (counted from
    first_step over the block), stores its results (`_store_row_results`) and returns the row's step count.
    Before a row's loads go into a buffer, the earlier rows' result stores must have read their SMEM (row j - 1's
    output sat in the buffer row j + 1 loads into). With one buffer each row waits for that and loads at its
    start. With two, row j waits and issues row j + 1's loads as it starts, or, `late`, attend gets that as
    prefetch and calls it once, before it writes its results; otherwise prefetch is None."""
    if buffers == 2:
        load(0, 0)

    def row(j, first_step):
        buffer = lax.rem(j, buffers)

        def prefetch():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if buffers == 1:
                load(j, buffer)
            else:
                pl.when(j + 1 < count)(lambda: load(j + 1, 1 - buffer))

        if late and buffers == 2:
            return first_step + attend(j, buffer, first_step, prefetch)
        prefetch()
        return first_step + attend(j, buffer, first_step, None)

    lax.fori_loop(0, count, row, jnp.int32(0))


def _store_row_results(copies):
    """SMEM -> GMEM TMA stores [(SMEM ref, GMEM ref), ...] of a row's results just written to SMEM. A later
    row waits for their reads before it writes that SMEM again (`_walk_rows`); the kernel's end waits for the
    rest."""
    plgpu.commit_smem()
    for buffer, target in copies:
        plgpu.copy_smem_to_gmem(buffer, target)


def _forward_kernel(rows_ref, tiles_ref, counts_ref, *refs, static: KernelStatic, seq_len: int, group: int,
                    contiguous: bool, heads_fastest: bool, split: bool, overlap: bool, late: bool, q_smem, k_smem,
                    v_smem, lse_smem, q_loaded, k_loaded, v_loaded, k_consumed, v_consumed, schedule=None, stage=None):
    """refs: [`half_tile_codes` where `split`,] [the topk choice's lists and counts,] q, k, v, out, lse.

    A block walks one row, or several when persistent (`_block_rows`); K/V steps are counted over all of them,
    so the memory warpgroup streams the next row's first tiles while the compute warpgroups finish a row, and
    each compute warpgroup loads its next row's queries into the other half of a double buffer meanwhile."""
    sizes = static.block_sizes
    warpgroups, block_q, block_k, stages = sizes.warpgroups, sizes.block_q, sizes.block_k, sizes.stages
    scale_log2 = static.scale * LOG2_E
    wg = lax.axis_index(_WARPGROUP)
    halves_ref, refs = (refs[0], refs[1:]) if split else (None, refs)
    batches, _, q_heads, _ = refs[-5].shape  # q: refs end with q, k, v, out, lse
    count, row = _block_rows(rows_ref, tiles_ref, counts_ref, refs, static, group=group, contiguous=contiguous,
                             heads_fastest=heads_fastest, row_height=warpgroups * block_q, column_tile=block_k,
                             heads=q_heads, batches=batches)

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(_forward_memory_registers(warpgroups), action="decrease")

        def groups(work):
            _, k_ref, v_ref, _, _ = work.refs

            def key_tile(ref):
                return lambda i: ref.at[work.batch, pl.ds(work.steps.tile(i) * block_k, block_k), work.kv_head]

            return [(k_consumed, [(key_tile(k_ref), k_smem, k_loaded)]),
                    (v_consumed, [(key_tile(v_ref), v_smem, v_loaded)])]

        _stream_rows(count, row, stages, groups, [k_consumed, v_consumed])

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(_compute_registers(warpgroups, _forward_memory_registers(warpgroups)),
                                action="increase")
        staged = None if stage is None else stage.at[wg]

        def load(j, buffer):
            work = row(j)
            q_ref = work.refs[0]
            plgpu.copy_gmem_to_smem(q_ref.at[work.batch, pl.ds(work.row_start + wg * block_q, block_q), work.head],
                                    q_smem.at[buffer, wg], q_loaded.at[buffer * warpgroups + wg])

        def take_turn():  # with two compute warpgroups: let the other one use the tensor cores
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        turn = take_turn if schedule is not None else None  # what runs while a warpgroup's Q Kᵀ is issued

        def attend(j, buffer, first_step, prefetch):
            work = row(j)
            q_ref, _, _, out_ref, lse_ref = work.refs
            q_start = work.row_start + wg * block_q
            q_tile = q_smem.at[buffer, wg]  # [block_q, head_dim]; holds the output at the end
            plgpu.barrier_wait(q_loaded.at[buffer * warpgroups + wg])

            def softmax(dots, mask, index, first, row_max, row_sum):
                """The online softmax of step `index`'s dots over the keys from `first` of its tile:
                (probabilities, new row max, new row sum, the correction of what came before)."""
                shape = dots.shape
                if mask is not UNMASKED or scale_log2 < 0:
                    logits = dots * scale_log2
                    if mask is not UNMASKED:
                        active = _tile_mask(static.pattern, seq_len, shape, q_start,
                                            work.steps.tile(index) * block_k + first, chosen=mask == CHOSEN)
                        logits = jnp.where(active, logits, -jnp.inf)
                    new_max = jnp.maximum(row_max, logits.max(axis=1))
                    probs = jnp.exp2(logits - _rows(new_max, shape))
                else:  # max before scaling, then one fused multiply-add per logit
                    new_max = jnp.maximum(row_max, dots.max(axis=1) * scale_log2)
                    probs = jnp.exp2(dots * scale_log2 - _rows(new_max, shape))
                correction = jnp.exp2(row_max - new_max)
                return probs, new_max, row_sum * correction + probs.sum(axis=1), correction

            def take_scores(mask, first, width, index, carry):
                """The first half of a step over the keys [first, first + width) of its tile: S = Q Kᵀ and its
                softmax, the output rescaled; (acc, row max, row sum, probabilities)."""
                acc, row_max, row_sum = carry
                slot = _slot(first_step + index, stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                dots = _matmul(q_tile, k_smem.at[slot, pl.ds(first, width)].T, while_running=turn)
                plgpu.barrier_arrive(k_consumed.at[slot])
                probs, row_max, row_sum, correction = softmax(dots, mask, index, first, row_max, row_sum)
                acc = acc * _rows(correction, acc.shape)
                if schedule is not None:
                    plgpu.barrier_arrive(schedule)
                return acc, row_max, row_sum, probs.astype(q_ref.dtype)

            def add_values(first, width, index, acc, probs):
                """The second half: acc + P V over the same keys."""
                slot = _slot(first_step + index, stages)
                plgpu.barrier_wait(v_loaded.at[slot])
                if schedule is not None:
                    plgpu.barrier_wait(schedule)
                acc = _accumulate(acc, probs, v_smem.at[slot, pl.ds(first, width)],
                                  None if staged is None else staged.at[:, pl.ds(0, width)])
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc

            def attend_keys(mask, first, width, index, carry):
                """One step over the keys [first, first + width) of its tile."""
                acc, row_max, row_sum, probs = take_scores(mask, first, width, index, carry)
                return add_values(first, width, index, acc, probs), row_max, row_sum

            def skip_keys(index, carry):
                """A step with no key of this warpgroup's: its barriers only, so that the ring and the other
                warpgroup's turns go on."""
                slot = _slot(first_step + index, stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                if schedule is not None:
                    take_turn()
                plgpu.barrier_arrive(k_consumed.at[slot])
                if schedule is not None:
                    plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_loaded.at[slot])
                if schedule is not None:
                    plgpu.barrier_wait(schedule)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return carry

            # A split PARTIAL step's code for this warpgroup (`half_tile_codes`) picks: no key, the low half,
            # the high half, or both.
            by_code = [skip_keys] + [functools.partial(attend_keys, PATTERN, first, width) for first, width in
                                     ((0, HALF_TILE_KEYS), (HALF_TILE_KEYS, HALF_TILE_KEYS), (0, block_k))]

            def step(mask, index, carry):
                if mask is not PATTERN or halves_ref is None:
                    return attend_keys(mask, 0, block_k, index, carry)
                return lax.switch(_step_code(halves_ref, work.steps, index, wg, 2), by_code, index, carry)

            def overlapped_full_steps(carry):
                """The row's FULL steps with each step's P V issued together with the next step's Q Kᵀ, so that
                a warpgroup's softmax of step i runs while its P V of step i - 1 is on the tensor cores
                (FlashAttention-3's intra-warpgroup overlap). The tensor cores are issued to, and the barriers
                taken, in the order of `attend_keys`; only the wait for each P V moves a step later."""

                def softmax_while_multiplying(index, slot, previous, acc, row_max, row_sum, probs):
                    """Issue S = Q Kᵀ of step `index` and acc += P V of the step before, then take the softmax
                    of S while the second runs: (acc, new row max, new row sum, probabilities, correction)."""
                    if staged is not None:  # the interpreter's wgmma is synchronous and starts from zero
                        dots = _matmul(q_tile, k_smem.at[slot].T, while_running=turn)
                        acc = _accumulate(acc, probs, v_smem.at[previous], staged)
                        plgpu.barrier_arrive(k_consumed.at[slot])
                        probs, row_max, row_sum, correction = softmax(dots, UNMASKED, index, 0, row_max, row_sum)
                        return acc, row_max, row_sum, probs.astype(q_ref.dtype), correction

                    def issue_both(refs):
                        acc_ref, dots_ref, max_ref, sum_ref, probs_ref, correction_ref = refs
                        plgpu.wgmma(dots_ref, q_tile, k_smem.at[slot].T)
                        plgpu.wgmma(acc_ref, probs_ref[...], v_smem.at[previous])
                        if turn is not None:
                            turn()
                        dots = plgpu.wgmma_accumulator_load(dots_ref, wait_n=1)  # S only: P V may still run
                        plgpu.barrier_arrive(k_consumed.at[slot])
                        new_probs, max_ref[...], sum_ref[...], correction_ref[...] = softmax(
                            dots, UNMASKED, index, 0, max_ref[...], sum_ref[...])
                        probs_ref[...] = new_probs.astype(q_ref.dtype)

                    acc, _, row_max, row_sum, probs, correction = pl.run_state(issue_both)(
                        (plgpu.ACC.init(acc), plgpu.ACC.init(_zeros((block_q, block_k))), row_max, row_sum, probs,
                         row_max))
                    return acc, row_max, row_sum, probs, correction

                def full_step(index, carry):
                    acc, row_max, row_sum, probs = carry
                    slot, previous = _slot(first_step + index, stages), _slot(first_step + index - 1, stages)
                    plgpu.barrier_wait(k_loaded.at[slot])
                    plgpu.barrier_wait(v_loaded.at[previous])
                    if schedule is not None:
                        plgpu.barrier_wait(schedule)
                    acc, row_max, row_sum, probs, correction = softmax_while_multiplying(
                        index, slot, previous, acc, row_max, row_sum, probs)
                    plgpu.barrier_arrive(v_consumed.at[previous])
                    acc = acc * _rows(correction, acc.shape)
                    if schedule is not None:
                        plgpu.barrier_arrive(schedule)
                    return acc, row_max, row_sum, probs

                first = take_scores(UNMASKED, 0, block_k, 0, carry)
                if prefetch is not None:
                    prefetch()
                acc, row_max, row_sum, probs = lax.fori_loop(1, work.steps.num_full, full_step, first)
                return add_values(0, block_k, work.steps.num_full - 1, acc, probs), row_max, row_sum

            carry = (_zeros(q_tile.shape), _row_vector(ROW_MAX_INIT, block_q), _row_vector(0.0, block_q))
            if overlap:
                carry = lax.cond(work.steps.num_full > 0, overlapped_full_steps, lambda carry: carry, carry)
            acc, row_max, row_sum = _walk(work.steps, step, carry, full=not overlap, after_first=prefetch)
            seen = row_sum > 0  # rows with no active key give 0, and lse = +inf makes their backward 0
            safe_sum = jnp.where(seen, row_sum, 1.0)
            q_tile[...] = (acc * _rows(1.0 / safe_sum, acc.shape)).astype(q_tile.dtype)
            lse_smem.at[wg][...] = jnp.where(seen, row_max + jnp.log2(safe_sum), jnp.inf)
            _store_row_results([(q_tile, out_ref.at[work.batch, pl.ds(q_start, block_q), work.head]),
                                (lse_smem.at[wg], lse_ref.at[work.batch, work.head, pl.ds(q_start, block_q)])])
            return work.steps.total

        if schedule is not None:
            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first
        _walk_rows(count, q_smem.shape[0], load, attend, late=late)
        if schedule is not None:
            pl.when(wg == 0)(take_turn)  # pairs with warpgroup 1's first turn
        plgpu.wait_smem_to_gmem(0)


def _dq_kernel(rows_ref, tiles_ref, counts_ref, *refs, static: KernelStatic, seq_len: int, group: int,
               contiguous: bool, heads_fastest: bool, skips: bool, overlap: bool, late: bool, q_smem, d_out_smem,
               lse_smem, delta_smem, k_smem, v_smem, q_loaded, d_out_loaded, lse_loaded, delta_loaded, k_loaded,
               v_loaded, k_consumed, v_consumed, stage=None):
    """refs: [`empty_step_codes` where `skips`,] [the topk choice's lists and counts,] q, k, v, d_out, lse, delta,
    dq. Rows as the forward's, one per block or several (`persistent_dq`), with q, dO, lse and delta resident per
    row."""
    sizes = static.block_sizes
    warpgroups, block_q, block_k, stages = (sizes.warpgroups_dq, sizes.block_q_dq, sizes.block_k_dq,
                                            sizes.stages_dq)
    scale_log2 = static.scale * LOG2_E
    wg = lax.axis_index(_WARPGROUP)
    codes_ref, refs = (refs[0], refs[1:]) if skips else (None, refs)
    batches, _, q_heads, _ = refs[-7].shape  # q: refs end with q, k, v, d_out, lse, delta, dq
    count, row = _block_rows(rows_ref, tiles_ref, counts_ref, refs, static, group=group, contiguous=contiguous,
                             heads_fastest=heads_fastest, row_height=warpgroups * block_q, column_tile=block_k,
                             heads=q_heads, batches=batches)
    resident = ((q_smem, q_loaded), (d_out_smem, d_out_loaded), (lse_smem, lse_loaded), (delta_smem, delta_loaded))

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def groups(work):
            _, k_ref, v_ref, *_ = work.refs

            def key_tile(ref):
                return lambda i: ref.at[work.batch, pl.ds(work.steps.tile(i) * block_k, block_k), work.kv_head]

            return [(v_consumed, [(key_tile(v_ref), v_smem, v_loaded)]),
                    (k_consumed, [(key_tile(k_ref), k_smem, k_loaded)])]

        _stream_rows(count, row, stages, groups, [v_consumed, k_consumed])

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(_compute_registers(warpgroups), action="increase")
        shape = (block_q, block_k)
        staged = None if stage is None else stage.at[wg]

        def load(j, buffer):
            work = row(j)
            q_ref, _, _, d_out_ref, lse_ref, delta_ref, _ = work.refs
            queries = pl.ds(work.row_start + wg * block_q, block_q)
            sources = (q_ref.at[work.batch, queries, work.head], d_out_ref.at[work.batch, queries, work.head],
                       lse_ref.at[work.batch, work.head, queries], delta_ref.at[work.batch, work.head, queries])
            for source, (smem, loaded) in zip(sources, resident):
                plgpu.copy_gmem_to_smem(source, smem.at[buffer, wg], loaded.at[buffer * warpgroups + wg])

        def attend(j, buffer, first_step, prefetch):
            work = row(j)
            q_ref, _, _, _, _, _, dq_ref = work.refs
            q_start = work.row_start + wg * block_q
            for _, loaded in resident:
                plgpu.barrier_wait(loaded.at[buffer * warpgroups + wg])
            q_tile, d_out_tile = q_smem.at[buffer, wg], d_out_smem.at[buffer, wg]  # q_tile holds dq at the end
            lse = plgpu.load(lse_smem.at[buffer, wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem.at[buffer, wg], layout=plgpu.Layout.WGMMA.reduce(1))

            def attend_keys(mask, index, dq):
                slot = _slot(first_step + index, stages)

                def probabilities(dots):
                    probs = jnp.exp2(dots * scale_log2 - _rows(lse, shape))
                    if mask is UNMASKED:
                        return probs
                    active = _tile_mask(static.pattern, seq_len, shape, q_start, work.steps.tile(index) * block_k,
                                        chosen=mask == CHOSEN)
                    return jnp.where(active, probs, 0.0)

                plgpu.barrier_wait(k_loaded.at[slot])
                if overlap:  # dP = dO Vᵀ runs while the probabilities are taken
                    plgpu.barrier_wait(v_loaded.at[slot])
                    probs, d_probs = _matmul_pair((q_tile, k_smem.at[slot].T), (d_out_tile, v_smem.at[slot].T),
                                                  probabilities, staged is not None)
                else:
                    probs = probabilities(_matmul(q_tile, k_smem.at[slot].T))
                    plgpu.barrier_wait(v_loaded.at[slot])
                    d_probs = _matmul(d_out_tile, v_smem.at[slot].T)
                plgpu.barrier_arrive(v_consumed.at[slot])
                d_logits = probs * (d_probs - _rows(delta, shape))
                dq = _accumulate(dq, d_logits.astype(q_ref.dtype), k_smem.at[slot], staged)
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq

            def skip_keys(index, dq):
                """A step with no pair of this warpgroup's: its barriers only, so that the ring goes on."""
                slot = _slot(first_step + index, stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq

            def step(mask, index, dq):
                if mask is not PATTERN or codes_ref is None:
                    return attend_keys(mask, index, dq)
                return lax.switch(_step_code(codes_ref, work.steps, index, wg, 1),
                                  [skip_keys, functools.partial(attend_keys, PATTERN)], index, dq)

            dq = _walk(work.steps, step, _zeros(q_tile.shape), after_first=prefetch)
            q_tile[...] = (dq * static.scale).astype(q_tile.dtype)
            _store_row_results([(q_tile, dq_ref.at[work.batch, pl.ds(q_start, block_q), work.head])])
            return work.steps.total

        _walk_rows(count, q_smem.shape[0], load, attend, late=late)
        plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(rows_ref, tiles_ref, counts_ref, *refs, static: KernelStatic, seq_len: int, group: int,
                 contiguous: bool, heads_fastest: bool, skips: bool, defer_waits: bool, memory_registers: int, k_smem,
                 v_smem, q_smem, d_out_smem, lse_smem, delta_smem, k_loaded, v_loaded, q_loaded, d_out_loaded,
                 lse_loaded, delta_loaded, consumed,
                 d_logits_smem=None, dq_smem=None, d_logits_stored=None, dq_previous_smem=None, dq_read=None,
                 stage=None):
    """refs: [`empty_step_codes` where `skips`,] [the topk choosers' lists and counts,] q, k, v, d_out, lse, delta,
    [dq_sum,] dk, dv.

    Rows are (key tiles, kv heads, batch), one per block or several (`persistent_dkdv`), with each compute
    warpgroup's keys and values resident per row (k_smem [buffers, warpgroups * block_k, head_dim], v_smem
    [buffers, warpgroups, block_k, head_dim]).

    With the fused dq (d_logits_smem given), step s also adds dq's share of its tile pair, dS K over the
    block's keys, into dq_sum (float32 [batch, seq, q_heads, head_dim], zeros given by reference): every
    compute warpgroup stores its dSᵀ into d_logits_smem[s % 2] and arrives on d_logits_stored; then each
    warpgroup multiplies all of it by its own columns of the block's keys (`_dq_parts`), or, where the
    columns do not split, warpgroup s % warpgroups by all of them; the float32 product goes to dq_smem and
    is reduce-added with TMA. Neither buffer needs a second barrier: a warpgroup arrives for step s + 1 only
    after its step s multiply has read d_logits_smem[s % 2] (written again at step s + 2) and its add has
    read dq_smem. In interpret mode (`dq_read` given) warpgroup 0 does every add of a tile it does not split
    (`_reduce_add`). A row's end syncs the warpgroups again before dk overwrites the keys the others multiply
    by, so a later row's keys may load over them once this warpgroup's dk store has read them.
    """
    sizes = static.block_sizes
    warpgroups, block_k, block_q, stages = (sizes.warpgroups_dkv, sizes.block_k_dkv, sizes.block_q_dkv,
                                            sizes.stages_dkv)
    scale_log2 = static.scale * LOG2_E
    wg = lax.axis_index(_WARPGROUP)
    codes_ref, refs = (refs[0], refs[1:]) if skips else (None, refs)
    batches, _, kv_heads, _ = refs[-1].shape  # dv
    count, row = _block_rows(rows_ref, tiles_ref, counts_ref, refs, static, group=1, contiguous=contiguous,
                             heads_fastest=heads_fastest, row_height=warpgroups * block_k, column_tile=block_q,
                             heads=kv_heads, batches=batches)
    fused = d_logits_smem is not None  # the fused dq's scratch: dq_sum is among the inputs

    def arrays(work):
        """q, k, v, d_out, lse, delta, dq_sum (None unless fused), dk, dv."""
        return work.refs if fused else (*work.refs[:6], None, *work.refs[6:])

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(memory_registers, action="decrease")

        def groups(work):
            q_ref, _, _, d_out_ref, lse_ref, delta_ref, *_ = arrays(work)
            per_head = work.steps.total

            def query_tile(ref, stats: bool):
                """Step g * per_head + i of the row: query tile i of its steps, for q head g of the group."""

                def source(step):
                    g = lax.div(step, per_head)
                    queries = pl.ds(work.steps.tile(step - g * per_head) * block_q, block_q)
                    q_head = work.kv_head * group + g
                    return ref.at[work.batch, q_head, queries] if stats else ref.at[work.batch, queries, q_head]

                return source

            return [(consumed, [
                (query_tile(q_ref, False), q_smem, q_loaded), (query_tile(lse_ref, True), lse_smem, lse_loaded),
                (query_tile(d_out_ref, False), d_out_smem, d_out_loaded),
                (query_tile(delta_ref, True), delta_smem, delta_loaded)])]

        _stream_rows(count, row, stages, groups, [consumed], repeats=group)

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(_compute_registers(warpgroups, memory_registers), action="increase")
        own_rows = pl.ds(wg * block_k, block_k)
        staged = None if stage is None else stage.at[wg]
        deferred = defer_waits and staged is None  # the interpreter's wgmma is synchronous
        shape = (block_k, block_q)  # transposed tiles: keys along rows

        def load(j, buffer):
            work = row(j)
            _, k_ref, v_ref, *_ = arrays(work)
            keys = pl.ds(work.row_start + wg * block_k, block_k)
            plgpu.copy_gmem_to_smem(k_ref.at[work.batch, keys, work.kv_head], k_smem.at[buffer, own_rows],
                                    k_loaded.at[buffer * warpgroups + wg])
            plgpu.copy_gmem_to_smem(v_ref.at[work.batch, keys, work.kv_head], v_smem.at[buffer, wg],
                                    v_loaded.at[buffer * warpgroups + wg])

        def sync():  # every compute warpgroup has stored its dSᵀ (or, at a row's end, has done its last dq)
            if d_logits_stored is not None:
                plgpu.barrier_arrive(d_logits_stored)
                plgpu.barrier_wait(d_logits_stored)

        def attend(j, buffer, first_step, prefetch):
            del prefetch  # None: its rows load at their start (`late_prefetch` is the forward's and dq's)
            work = row(j)
            q_ref, _, _, _, _, _, dq_sum_ref, dk_ref, dv_ref = arrays(work)
            k_start = work.row_start + wg * block_k
            keys = pl.ds(k_start, block_k)
            per_head = work.steps.total
            plgpu.barrier_wait(k_loaded.at[buffer * warpgroups + wg])
            plgpu.barrier_wait(v_loaded.at[buffer * warpgroups + wg])
            # [block_k, head_dim] each; hold dk and dv at the end. The block's keys are [warpgroups * block_k,
            # head_dim], so that the fused dq multiplies by all of them at once.
            block_keys = k_smem.at[buffer]
            k_tile, v_tile = block_keys.at[own_rows], v_smem.at[buffer, wg]

            def store_d_logits(step, d_logits_t):
                d_logits_smem.at[lax.rem(step, jnp.int32(2)), own_rows][...] = d_logits_t

            def add_dq(step, q_head, q_first):
                """Once every warpgroup has stored its dSᵀ (the sync), add dS K (all of the block's keys) into
                dq_sum."""
                parity = lax.rem(step, jnp.int32(2))
                plgpu.commit_smem()  # this warpgroup's dSᵀ visible to wgmma's (async proxy) reads
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this warpgroup's last add has read dq_smem
                sync()
                target = dq_sum_ref.at[work.batch, pl.ds(q_first, block_q), q_head]

                def add(part, columns):
                    """dq_smem[part] = dS K[:, columns], added into target's columns."""
                    dq_smem.at[part][...] = _matmul(d_logits_smem.at[parity].T, block_keys.at[:, columns])
                    _reduce_add(dq_smem.at[part], target.at[:, columns],
                                None if dq_read is None else (dq_previous_smem.at[part], dq_read.at[part]))

                parts, width = dq_smem.shape[0], dq_smem.shape[-1]
                if parts > 1:  # each warpgroup its own columns, at every step
                    for part in range(parts):
                        pl.when(wg == part)(functools.partial(add, part, pl.ds(part * width, width)))
                    return
                # One warpgroup adds all columns: they take turns (in interpret mode warpgroup 0 does every add).
                adder = lax.rem(step, jnp.int32(warpgroups)) if dq_read is None else 0
                pl.when(adder == wg)(functools.partial(add, 0, pl.ds(0, width)))

            def head_in_group(g, carry):
                def attend_queries(mask, block_step, q_first, then, carry):
                    """One step's dk and dv; then(dSᵀ) runs after dK's product is issued (the fused dq)."""
                    dk, dv = carry
                    slot = _slot(block_step, stages)
                    d_out_tile = d_out_smem.at[slot]
                    plgpu.barrier_wait(q_loaded.at[slot])
                    plgpu.barrier_wait(lse_loaded.at[slot])
                    lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))

                    def probabilities(dots_t):
                        probs_t = jnp.exp2(dots_t * scale_log2 - _columns(lse, shape))
                        if mask is UNMASKED:
                            return probs_t
                        active = _tile_mask(static.pattern, seq_len, shape, q_first, k_start, transposed=True,
                                            chosen=mask == CHOSEN)
                        return jnp.where(active, probs_t, 0.0)

                    def gradients(probs_t, d_probs_t):
                        plgpu.barrier_wait(delta_loaded.at[slot])
                        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        return (probs_t * (d_probs_t - _columns(delta, shape))).astype(q_ref.dtype)

                    def values_while_gradients(dv, probs_t, d_probs_t):
                        """(dv + Pᵀ dO, dSᵀ), dSᵀ taken while Pᵀ dO runs; dPᵀ = V dOᵀ, where not given, is
                        issued just before it and waited for alone."""

                        def issue(refs):
                            dv_ref, d_logits_ref, *d_probs_ref = refs
                            if d_probs_ref:
                                plgpu.wgmma(d_probs_ref[0], v_tile, d_out_tile.T)
                            plgpu.wgmma(dv_ref, probs_t.astype(q_ref.dtype), d_out_tile)
                            if d_probs_ref:  # dPᵀ only: Pᵀ dO may still run
                                d_logits_ref[...] = gradients(
                                    probs_t, plgpu.wgmma_accumulator_load(d_probs_ref[0], wait_n=1))
                            else:
                                d_logits_ref[...] = gradients(probs_t, d_probs_t)

                        state = (plgpu.ACC.init(dv), _zeros(shape).astype(q_ref.dtype))
                        if d_probs_t is None:
                            state += (plgpu.ACC.init(_zeros(shape)),)
                        dv, d_logits_t, *_ = pl.run_state(issue)(state)
                        return dv, d_logits_t

                    if sizes.overlap_dkdv:  # dPᵀ = V dOᵀ runs while the probabilities are taken
                        plgpu.barrier_wait(d_out_loaded.at[slot])
                        probs_t, d_probs_t = _matmul_pair((k_tile, q_smem.at[slot].T), (v_tile, d_out_tile.T),
                                                          probabilities, staged is not None)
                    else:
                        probs_t, d_probs_t = probabilities(_matmul(k_tile, q_smem.at[slot].T)), None
                        plgpu.barrier_wait(d_out_loaded.at[slot])
                    if deferred:
                        dv, d_logits_t = values_while_gradients(dv, probs_t, d_probs_t)

                        def keys_while_then(dk_ref):
                            plgpu.wgmma(dk_ref, d_logits_t, q_smem.at[slot])
                            then(d_logits_t)

                        dk = pl.run_state(keys_while_then)(plgpu.ACC.init(dk))
                        plgpu.barrier_arrive(consumed.at[slot])
                        return dk, dv
                    dv = _accumulate(dv, probs_t.astype(q_ref.dtype), d_out_tile, staged)
                    if d_probs_t is None:
                        d_probs_t = _matmul(v_tile, d_out_tile.T)
                    d_logits_t = gradients(probs_t, d_probs_t)
                    dk = _accumulate(dk, d_logits_t, q_smem.at[slot], staged)
                    plgpu.barrier_arrive(consumed.at[slot])
                    then(d_logits_t)
                    return dk, dv

                def skip_queries(block_step, then, carry):
                    """A step with no pair of this warpgroup's: its barriers only, so that the ring goes on, and
                    with the fused dq a dSᵀ of zeros, as the dq multiply reads every warpgroup's rows."""
                    slot = _slot(block_step, stages)
                    for loaded in (q_loaded, lse_loaded, d_out_loaded, delta_loaded):
                        plgpu.barrier_wait(loaded.at[slot])
                    plgpu.barrier_arrive(consumed.at[slot])
                    then(_zeros(shape).astype(q_ref.dtype))
                    return carry

                def step(mask, index, carry):
                    block_step = first_step + g * per_head + index
                    q_first = work.steps.tile(index) * block_q

                    def then(d_logits_t):  # the fused dq: store this warpgroup's dSᵀ, add the block's dS K
                        if fused:
                            store_d_logits(block_step, d_logits_t)
                            add_dq(block_step, work.kv_head * group + g, q_first)

                    attend = functools.partial(attend_queries, mask, block_step, q_first, then)
                    if mask is not PATTERN or codes_ref is None:
                        return attend(carry)
                    return lax.switch(_step_code(codes_ref, work.steps, index, wg, 1),
                                      [functools.partial(skip_queries, block_step, then), attend], carry)

                return _walk(work.steps, step, carry)

            dk, dv = lax.fori_loop(0, group, head_in_group, (_zeros(k_tile.shape), _zeros(v_tile.shape)))
            if fused:
                sync()  # the other warpgroups' last dq has read the keys, which now take dk
            k_tile[...] = (dk * static.scale).astype(k_tile.dtype)
            v_tile[...] = dv.astype(v_tile.dtype)
            _store_row_results([(k_tile, dk_ref.at[work.batch, keys, work.kv_head]),
                                (v_tile, dv_ref.at[work.batch, keys, work.kv_head])])
            return group * per_head

        _walk_rows(count, k_smem.shape[0], load, attend)
        plgpu.wait_smem_to_gmem(0)


def _dq_parts(head_dim: int, warpgroups: int) -> int:
    """Into how many column slices the fused dq's tile splits, one per compute warpgroup: `warpgroups` when
    each slice is a whole number of 64-wide swizzle tiles (head_dim 128 over two), else 1 (the warpgroups
    take turns with the whole tile). Split, each warpgroup's float32 accumulator is half as large, beside dk's
    and dv's; at head_dim 128 the split took dense's forward+backward from 542.8 to 489.9 ms at 128k (level
    at 32k; docs/benchmarks.md, "The fused dq")."""
    width = head_dim // warpgroups
    return warpgroups if width % DQ_SLICE_MULTIPLE == 0 else 1


def _reduce_add(source, target, interpreted):
    """target += source (float32 SMEM -> GMEM) with a TMA reduce-add.

    Pallas' GPU interpreter has no reduce-add; there `interpreted` is (an SMEM buffer like source, a
    barrier) and the add is a load, an add and a store. That is exact there because the interpreter runs
    thread blocks one at a time, and a block's warpgroups add into different columns, or one adds for all.
    """
    if interpreted is None:
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(source, target, reduction_op="add")
        return
    previous, read = interpreted
    plgpu.copy_gmem_to_smem(target, previous, read)
    plgpu.barrier_wait(read)
    source[...] = source[...] + previous[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(source, target)
    plgpu.wait_smem_to_gmem(0)


# ------------------------------------------------------------------------------------------- launchers


def _skipping(sizes: BlockSizes, pattern: Pattern, seq_len: int, plan: RowPlan, part: int, column_tile: int,
              warpgroups: int, by_key: bool) -> list[np.ndarray]:
    """The dq (by_key False) or dk/dv kernel's `empty_step_codes` as its first ref where it skips steps
    (`skips_empty_steps`), else none."""
    codes = empty_step_codes(pattern, seq_len, part, column_tile, warpgroups, by_key)
    return [codes] if skips_empty_steps(sizes.skip_empty_steps, plan, codes, warpgroups) else []


def _varying_like(results, inputs):
    """Kernel results marked as varying over every manual mesh axis their inputs vary over: plgpu.kernel
    drops these types, and shard_map's check_vma (and the custom VJP's type check) need them."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))

    def cast(x):
        missing = tuple(sorted(varying - jax.typeof(x).manual_axis_type.varying))
        return lax.pcast(x, missing, to="varying") if missing else x

    return tuple(cast(x) for x in results)


def _barriers(count: int, arrivals: int = 1):
    return plgpu.Barrier(num_arrivals=arrivals, num_barriers=count)


def _compacted(selected):
    """A topk choice with each row's chosen blocks first (int32 [batch, kv_heads, blocks, K]), and their count
    (int32 [batch, kv_heads, blocks]): what the forward and dq blocks walk."""
    valid = selected >= 0
    order = jnp.argsort(~valid, axis=-1, stable=True)
    return [jnp.take_along_axis(selected, order, axis=-1), valid.sum(axis=-1).astype(jnp.int32)]


def _forward(q, k, v, static: KernelStatic, seq_len: int, selected=None):
    """out [batch, padded_seq, q_heads, d], lse [batch, q_heads, padded_seq] (base 2, float32)."""
    batch, padded_len, q_heads, head_dim = q.shape
    sizes = static.block_sizes
    warpgroups, block_q, block_k, stages = sizes.warpgroups, sizes.block_q, sizes.block_k, sizes.stages
    plan = step_plan(static.pattern, seq_len, *sizes.forward_tile, False)
    persistent = persists(sizes, plan)
    q_buffers = _resident_buffers(persistent, warpgroups * block_q * head_dim * q.dtype.itemsize,
                                  2 * stages * block_k * head_dim * q.dtype.itemsize, warpgroups * block_q * 4)
    scratch = dict(
        q_smem=_smem((q_buffers, warpgroups, block_q, head_dim), q.dtype),
        k_smem=_smem((stages, block_k, head_dim), q.dtype),
        v_smem=_smem((stages, block_k, head_dim), q.dtype),
        lse_smem=_smem((warpgroups, block_q), jnp.float32, swizzled=False),
        q_loaded=_barriers(q_buffers * warpgroups), k_loaded=_barriers(stages), v_loaded=_barriers(stages),
        k_consumed=_barriers(stages, warpgroups), v_consumed=_barriers(stages, warpgroups),
    )
    if warpgroups == 2:
        scratch["schedule"] = _barriers(1, 2)
    if static.interpret:
        scratch["stage"] = _smem((warpgroups, block_q, block_k), q.dtype, swizzled=False)
    halves = half_tile_codes(static.pattern, seq_len, block_q, block_k, warpgroups) if sizes.half_tiles else None
    overlap = overlaps_softmax(sizes.overlap_softmax, head_dim, warpgroups)
    body = functools.partial(_forward_kernel, static=static, seq_len=seq_len, group=q_heads // k.shape[2],
                             contiguous=all(plan.contiguous), split=halves is not None,
                             heads_fastest=deals_heads_fastest(sizes.heads_fastest, persistent, plan),
                             overlap=overlap, late=prefetches_late(sizes.late_prefetch, overlap))
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, q_heads, padded_len), jnp.float32))
    grid = _flat_grid(len(plan.rows) * q_heads * batch, persistent, static.interpret)
    call = _kernel(body, out_type, scratch, grid=grid, static=static,
                   name="sparse_attention_forward", warpgroups=warpgroups)
    choice = [] if selected is None else _compacted(selected)
    split = [] if halves is None else [halves]
    return _varying_like(call(plan.rows, *plan.steps, *split, *choice, q, k, v), (q, k, v))


def _backward(q, k, v, out, lse, d_out, static: KernelStatic, seq_len: int, selected=None):
    sizes = static.block_sizes
    # delta = rowsum(dO * O): [batch, q_heads, padded_seq], one fused XLA reduction.
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    inputs = (q, k, v, d_out, lse, delta)
    dkdv_plan = step_plan(static.pattern, seq_len, *sizes.dkdv_tile, True)
    if fuses_dq(sizes, q.shape[3], q.shape[2] // k.shape[2], dkdv_plan):
        choice = () if selected is None else (selected,)
        dq, dk, dv = _batch_folded(functools.partial(_fused_backward, static=static, seq_len=seq_len))(
            *inputs, *choice)
    else:
        dq = _dq(*inputs, static, seq_len, selected)
        dk, dv = _dkdv(*inputs, static, seq_len, selected)
    return _varying_like((dq, dk, dv), inputs)


def _fused_backward(q, k, v, d_out, lse, delta, selected=None, *, static: KernelStatic, seq_len: int):
    """(dq, dk, dv) from the dk/dv kernel alone, which adds dq / scale into a float32 buffer of zeros.

    The buffer is a mutable ref, so it is made here, unvarying under shard_map (Pallas takes no ref of a
    varying type; the result is cast to varying with the others) and unbatched (`_batch_folded` keeps vmap
    out).
    """
    dq_sum = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = _dkdv(q, k, v, d_out, lse, delta, static, seq_len, selected, dq_sum)
    return (dq_sum[...] * static.scale).astype(q.dtype), dk, dv


def _batch_folded(function):
    """function(*arrays) -> tuple of arrays, every one [batch, ...], made vmappable by folding the mapped
    axis into the batch: one call over axis_size x batch rows. Attention is independent per batch row, and
    this keeps vmap from sharing one mutable buffer across the mapped axis."""

    @jax.custom_batching.custom_vmap
    def folded(*arrays):
        return function(*arrays)

    @folded.def_vmap
    def _(axis_size, in_batched, *arrays):
        arrays = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                  for x, batched in zip(arrays, in_batched)]
        results = folded(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in arrays))
        return tuple(y.reshape(axis_size, -1, *y.shape[1:]) for y in results), tuple(True for _ in results)

    return folded


def _dq(q, k, v, d_out, lse, delta, static: KernelStatic, seq_len: int, selected):
    """dq [batch, padded_seq, q_heads, d] from its own kernel over the forward's layout."""
    head_dim, dtype = q.shape[3], q.dtype
    sizes = static.block_sizes
    warpgroups, block_q, block_k, stages = (sizes.warpgroups_dq, sizes.block_q_dq, sizes.block_k_dq,
                                            sizes.stages_dq)
    plan = step_plan(static.pattern, seq_len, *sizes.dq_tile, False)
    persistent = persists_backward(sizes.persistent_dq, plan)
    # q and dO, lse and delta
    row_bytes = warpgroups * block_q * (2 * head_dim * dtype.itemsize + 2 * 4)
    buffers = _resident_buffers(persistent, row_bytes, 2 * stages * block_k * head_dim * dtype.itemsize)
    scratch = dict(
        q_smem=_smem((buffers, warpgroups, block_q, head_dim), dtype),
        d_out_smem=_smem((buffers, warpgroups, block_q, head_dim), dtype),
        lse_smem=_smem((buffers, warpgroups, block_q), jnp.float32, swizzled=False),
        delta_smem=_smem((buffers, warpgroups, block_q), jnp.float32, swizzled=False),
        k_smem=_smem((stages, block_k, head_dim), dtype),
        v_smem=_smem((stages, block_k, head_dim), dtype),
        q_loaded=_barriers(buffers * warpgroups), d_out_loaded=_barriers(buffers * warpgroups),
        lse_loaded=_barriers(buffers * warpgroups), delta_loaded=_barriers(buffers * warpgroups),
        k_loaded=_barriers(stages), v_loaded=_barriers(stages),
        k_consumed=_barriers(stages, warpgroups), v_consumed=_barriers(stages, warpgroups),
    )
    if static.interpret:
        scratch["stage"] = _smem((warpgroups, block_q, block_k), dtype, swizzled=False)
    codes = _skipping(sizes, static.pattern, seq_len, plan, block_q, block_k, warpgroups, by_key=False)
    body = functools.partial(_dq_kernel, static=static, seq_len=seq_len, group=q.shape[2] // k.shape[2],
                             contiguous=all(plan.contiguous), skips=bool(codes),
                             overlap=overlaps_dq(sizes.overlap_dq, persistent),
                             late=prefetches_late(sizes.late_prefetch, overlaps_softmax(
                                 sizes.overlap_softmax, head_dim, sizes.warpgroups)),
                             heads_fastest=deals_heads_fastest(sizes.heads_fastest, persistent, plan))
    grid = _flat_grid(len(plan.rows) * q.shape[2] * q.shape[0], persistent, static.interpret)
    return _kernel(body, jax.ShapeDtypeStruct(q.shape, dtype), scratch, grid=grid,
                   static=static, name="sparse_attention_dq", warpgroups=warpgroups)(
        plan.rows, *plan.steps, *codes, *([] if selected is None else _compacted(selected)), q, k, v, d_out, lse,
        delta)


def _dkdv(q, k, v, d_out, lse, delta, static: KernelStatic, seq_len: int, selected, dq_sum=None):
    """(dk, dv) [batch, padded_seq, kv_heads, d] from the kernel over the transposed layout; given dq_sum (a
    float32 ref of zeros like q), the kernel also adds dq / scale into it."""
    head_dim, dtype = q.shape[3], q.dtype
    sizes = static.block_sizes
    warpgroups, block_k, block_q, stages = (sizes.warpgroups_dkv, sizes.block_k_dkv, sizes.block_q_dkv,
                                            sizes.stages_dkv)
    plan = step_plan(static.pattern, seq_len, *sizes.dkdv_tile, True)
    parts = _dq_parts(head_dim, warpgroups)
    row_bytes = 2 * warpgroups * block_k * head_dim * dtype.itemsize  # keys and values
    ring_bytes = stages * block_q * (2 * head_dim * dtype.itemsize + 2 * 4)  # q, dO, lse, delta
    fused_bytes = 0 if dq_sum is None else 2 * warpgroups * block_k * block_q * dtype.itemsize + block_q * head_dim * 4
    persistent = persists_backward(sizes.persistent_dkdv, plan, q.shape[2] // k.shape[2])
    buffers = _resident_buffers(persistent, row_bytes, ring_bytes, fused_bytes)
    scratch = dict(
        k_smem=_smem((buffers, warpgroups * block_k, head_dim), dtype),
        v_smem=_smem((buffers, warpgroups, block_k, head_dim), dtype),
        q_smem=_smem((stages, block_q, head_dim), dtype),
        d_out_smem=_smem((stages, block_q, head_dim), dtype),
        lse_smem=_smem((stages, block_q), jnp.float32, swizzled=False),
        delta_smem=_smem((stages, block_q), jnp.float32, swizzled=False),
        k_loaded=_barriers(buffers * warpgroups), v_loaded=_barriers(buffers * warpgroups), q_loaded=_barriers(stages),
        d_out_loaded=_barriers(stages), lse_loaded=_barriers(stages), delta_loaded=_barriers(stages),
        consumed=_barriers(stages, warpgroups),
    )
    if dq_sum is not None:
        scratch["d_logits_smem"] = _smem((2, warpgroups * block_k, block_q), dtype)
        scratch["dq_smem"] = _smem((parts, block_q, head_dim // parts), jnp.float32, swizzled=False)
        if warpgroups > 1:
            scratch["d_logits_stored"] = _barriers(1, warpgroups)
        if static.interpret:
            scratch["dq_previous_smem"] = _smem((parts, block_q, head_dim // parts), jnp.float32, swizzled=False)
            scratch["dq_read"] = _barriers(parts)
    if static.interpret:
        scratch["stage"] = _smem((warpgroups, block_k, block_q), dtype, swizzled=False)
    codes = _skipping(sizes, static.pattern, seq_len, plan, block_k, block_q, warpgroups, by_key=True)
    deferred = defers_backward_waits(sizes.defer_backward_waits, persistent)
    body = functools.partial(_dkdv_kernel, static=static, seq_len=seq_len, group=q.shape[2] // k.shape[2],
                             contiguous=all(plan.contiguous), skips=bool(codes), defer_waits=deferred,
                             memory_registers=_dkdv_memory_registers(dq_sum is not None, deferred),
                             heads_fastest=deals_heads_fastest(sizes.heads_fastest, persistent, plan))
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    grid = _flat_grid(len(plan.rows) * k.shape[2] * q.shape[0], persistent, static.interpret)
    return _kernel(body, out_type, scratch, grid=grid, static=static,
                   name="sparse_attention_dkdv", warpgroups=warpgroups)(
        plan.rows, *plan.steps, *codes, *([] if selected is None else choosers(selected)), q, k, v, d_out, lse,
        delta, *([] if dq_sum is None else [dq_sum]))


_flash = padded_flash(_forward, _backward, sequence_multiple=lambda static: static.block_sizes.sequence_multiple)


# ------------------------------------------------------------------------------------------------- API


def unsupported_reason(q, k, v, pattern: Pattern, *, interpret: bool) -> str | None:
    """None when these kernels can run the case here (with their default tiles), else every reason why not
    ("; "-joined)."""
    del k, v  # shapes and patterns are validated by attention.check_inputs / as_pattern
    reasons = _input_reasons(q, interpret)
    if q.shape[-1] in HEAD_DIMS:
        reasons.append(_selection_reason(pattern, BlockSizes.for_head_dim(q.shape[-1], pattern, q.shape[1])))
    return "; ".join(reason for reason in reasons if reason) or None


def _input_reasons(q, interpret: bool) -> list[str | None]:
    """Why these kernels cannot take q here: its dtype, its head_dim, the platform (None where fine)."""
    head_dim = None if q.shape[-1] in HEAD_DIMS else f"head_dim {q.shape[-1]} is not supported (64, 128)"
    return [dtype_reason(q.dtype, SUPPORTED_DTYPES), head_dim, _platform_reason(interpret)]


def _selection_reason(pattern: Pattern, block_sizes: BlockSizes) -> str | None:
    return selection_reason(pattern, block_sizes.sequence_multiple, "every tile side")


def _platform_reason(interpret: bool) -> str | None:
    """Why this process cannot run the kernels at all (compiled, or in the interpreter), or None."""
    if interpret:
        threads = _cpu_pool_threads()
        if jax.default_backend() == "cpu" and threads < INTERPRETER_MIN_THREADS:
            return (f"interpret=True needs XLA's CPU thread pool to have >= {INTERPRETER_MIN_THREADS} threads, it "
                    f"has {threads} (Pallas' GPU interpreter can deadlock with fewer); start Python with "
                    f"PJRT_NPROC={INTERPRETER_MIN_THREADS}")
        return None
    if reason := cuda_capability_reason(9, "Hopper"):
        return reason
    runtime = _cuda_runtime_version()
    if runtime is not None and MISCOMPILING_CUDA[0] <= runtime < MISCOMPILING_CUDA[1]:
        return (f"CUDA runtime {runtime} is in [{MISCOMPILING_CUDA[0]}, {MISCOMPILING_CUDA[1]}), whose ptxas "
                "miscompiles masked Mosaic GPU attention (JAX's own causal kernel refuses it too)")
    return None


def _cpu_pool_threads() -> int:
    """The size of XLA's CPU thread pool: PJRT_NPROC if set, else the cores this process may run on."""
    configured = os.environ.get("PJRT_NPROC", "")
    if configured.isdigit():
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cuda_runtime_version() -> int | None:
    """The CUDA runtime version as 1000 * major + 10 * minor + patch, or None without the CUDA plugin."""
    from jax._src.lib import cuda_versions  # jax exposes the version only here

    return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())


def attention(q, k, v, pattern: Pattern | str, *, scale: float,
              interpret: bool | plgpu.InterpretGPUParams = False, block_sizes: BlockSizes | None = None,
              selected=None):
    """Causal block-sparse attention of q [batch, seq, q_heads, d] over k, v [batch, seq, kv_heads, d].

    Differentiable (custom VJP); works under jit and vmap. `block_sizes` defaults to
    `BlockSizes.for_head_dim(d, pattern, seq)`. `interpret=True` runs the kernels in Pallas' GPU interpreter (CPU);
    an `InterpretGPUParams` instead of True sets its options (race detection, uninitialized memory).
    `selected`: the blocks a `topk` pattern chose (int32 [batch, kv_heads, query blocks, K], -1: none;
    `selection.select_blocks`), required exactly when the pattern has a topk part; its block must be a
    multiple of every tile side.
    """
    pattern = as_pattern(pattern)
    check_selected(pattern, selected)
    block_sizes = checked_block_sizes(block_sizes, BlockSizes,
                                      lambda: BlockSizes.for_head_dim(q.shape[-1], pattern, q.shape[1]))
    reasons = _input_reasons(q, interpret) + [_selection_reason(pattern, block_sizes)]
    refuse_unsupported("mosaic_gpu", "; ".join(reason for reason in reasons if reason) or None)
    if not isinstance(interpret, plgpu.InterpretGPUParams):
        interpret = bool(interpret)
    return _flash(q, k, v, KernelStatic(pattern, float(scale), interpret, block_sizes), selected)
