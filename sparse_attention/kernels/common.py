"""What every Pallas kernel backend needs, written once: `triton` (the Triton lowering), `mosaic_gpu`
(Mosaic GPU, Hopper) and `mosaic_tpu` (Mosaic TPU).

  KernelStatic          everything a backend's kernels specialise on (a custom_vjp static argument)
  RowPlan, row_plan     what each program of a GPU kernel walks: its row tile and that row's FULL and
                        PARTIAL column tiles, from a layout's CSR lists, heaviest rows first
  LOG2_E, ROW_MAX_INIT  the constants of the base-2 online softmax
  padded_flash          the custom-VJP wrapper: pad q, k, v to the kernels' multiple, run the forward and
                        backward kernels, slice the padding off
  choosers              a `topk` choice transposed on the device: the query blocks that chose each key block
  selection_reason      why a `topk` pattern's blocks are not whole tiles
  check_selected        a `topk` choice given exactly when the pattern has a topk part
  check_block_fields    a BlockSizes dataclass's validation: positive integers, blocks by the backend's rule
  checked_block_sizes   the `block_sizes` argument: the backend's default, or an instance of its class
  dtype_reason, cuda_capability_reason, refuse_unsupported
                        the pieces of each backend's `unsupported_reason` and the error that `attention`
                        raises from it
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.layout import TileLists, pad_rows
from sparse_attention.patterns import Pattern

LOG2_E = math.log2(math.e)
# Initial running max: finite, so that a row whose first tiles are all masked (-inf logits) gives
# exp2(-inf - m) = 0 instead of exp2(-inf + inf) = NaN, and below any finite scaled logit.
ROW_MAX_INIT = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class KernelStatic:
    """Everything a backend's kernels specialise on (hashable: a custom_vjp non-differentiable argument).

    interpret: False, True, or the backend's interpreter parameters; block_sizes: the backend's BlockSizes.
    """

    pattern: Pattern
    scale: float
    interpret: Any
    block_sizes: Any


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """What each program of a GPU kernel walks, one entry per program in launch order (most work first).

    rows:        int32 [programs]; the row tile of program i (a query tile for forward and dq, a key tile
                 for dk/dv)
    full:        int32 [programs, width]; its FULL column tiles
    num_full:    int32 [programs]
    partial:     int32 [programs, width]; its PARTIAL column tiles, or their non-empty sub-tiles (in units
                 of the sub-tile) where the backend splits them
    num_partial: int32 [programs]
    contiguous:  (full, partial), static: whether each list holds consecutive tiles in every row. Such a
                 list stores only each row's first tile (width 1) and is walked as first + j; any other
                 list is explicit, padded by repeating its row's last entry (0 for an empty row). As
                 explicit lists, the plans of dense causal attention at 1M tokens are 1.25-1.75 GiB of int32
                 kernel inputs.

    Indexing everything by program id (not by row) lets a program issue its loads of the row id, the counts
    and the first tile index at once instead of one after another.
    """

    rows: np.ndarray
    full: np.ndarray
    num_full: np.ndarray
    partial: np.ndarray
    num_partial: np.ndarray
    contiguous: tuple[bool, bool]

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.rows, self.full, self.num_full, self.partial, self.num_partial

    @functools.cached_property
    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """(tiles, counts) for a kernel that walks each program's FULL and then PARTIAL tiles as one
        sequence of steps. counts: int32 [programs, 2], (num_full, num_full + num_partial). tiles: when
        both lists are contiguous, int32 [programs, 2], the first FULL and first PARTIAL tile (step i is
        tiles[p, 0] + i for i < num_full, else tiles[p, 1] + i - num_full); otherwise int32
        [programs, width], every step's tile, padded by repetition."""
        num_full, num_partial = self.num_full.astype(np.int64), self.num_partial.astype(np.int64)
        counts = np.stack([num_full, num_full + num_partial], axis=1).astype(np.int32)
        if all(self.contiguous):
            return np.concatenate([self.full, self.partial], axis=1), counts
        full, partial = (_explicit(tiles, count) if consecutive else tiles
                         for tiles, count, consecutive in ((self.full, num_full, self.contiguous[0]),
                                                           (self.partial, num_partial, self.contiguous[1])))
        width = max(1, int(counts[:, 1].max(initial=0)))
        column = np.arange(width)[None, :]
        from_full = np.take_along_axis(full, np.minimum(column, full.shape[1] - 1), axis=1)
        from_partial = np.take_along_axis(partial, np.clip(column - num_full[:, None], 0, partial.shape[1] - 1),
                                          axis=1)
        return np.where(column < num_full[:, None], from_full, from_partial).astype(np.int32), counts

    @functools.cached_property
    def partial_tiles(self) -> np.ndarray:
        """int32 [programs, width]: each program's PARTIAL tiles in step order, explicit even where the list is
        contiguous, padded by repetition."""
        return _explicit(self.partial, self.num_partial) if self.contiguous[1] else self.partial

    @functools.cached_property
    def partial_steps(self) -> np.ndarray:
        """bool [programs, width] like `partial_tiles`: which entries are real PARTIAL steps, not padding."""
        return np.arange(self.partial_tiles.shape[1])[None, :] < self.num_partial[:, None]


def _explicit(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A contiguous list ([rows, 1] first tiles) written out as `pad_rows` writes an explicit one."""
    width = max(int(count.max(initial=0)), 1)
    return (first + np.maximum(np.minimum(np.arange(width)[None, :], count[:, None] - 1), 0)).astype(np.int32)


def row_plan(lists: TileLists, tile: int, sub: int) -> RowPlan:
    """The plan of one kernel from a layout's CSR lists whose FULL tiles are `tile` positions wide and whose
    PARTIAL entries are `sub` wide (sub-tiles, or whole tiles with sub = tile). Rows that walk the most
    positions launch first, so the longest programs do not start last."""
    (first_full, first_partial), (full_consecutive, partial_consecutive) = lists.first_tiles, lists.contiguous
    # A consecutive list keeps only each row's first tile: padding it would be O(rows x tiles) for dense rows.
    full = first_full[:, None] if full_consecutive else pad_rows(lists.full_offsets, lists.full_indices)[0]
    partial = (first_partial[:, None] if partial_consecutive
               else pad_rows(lists.partial_offsets, lists.partial_indices)[0])
    num_full, num_partial = lists.num_full, lists.num_partial
    work = num_full.astype(np.int64) * tile + num_partial.astype(np.int64) * sub
    order = np.argsort(-work, kind="stable")
    return RowPlan(order.astype(np.int32), full[order], num_full[order], partial[order], num_partial[order],
                   lists.contiguous)


def choosers(selected):
    """The transpose of a `topk` choice (int32 [batch, kv_heads, query blocks, K], -1: none), built on the
    device: for every (batch, kv head) and key block, the query blocks that chose it in ascending order,
    padded with -1 (int32 [batch, kv_heads, blocks, blocks]), and their count (int32 [batch, kv_heads,
    blocks]). O(blocks^2) per head: 16 MiB of booleans per head at 1M tokens with blocks of 512."""
    blocks = selected.shape[2]
    chose = (selected[..., None] == jnp.arange(blocks)).any(axis=-2)  # [b, kv, query block, key block]
    by_key = jnp.swapaxes(chose, -1, -2)
    order = jnp.argsort(~by_key, axis=-1, stable=True).astype(jnp.int32)  # the choosers first, in block order
    counts = by_key.sum(axis=-1).astype(jnp.int32)
    return jnp.where(jnp.arange(blocks) < counts[..., None], order, -1), counts


def check_selected(pattern: Pattern, selected) -> None:
    """ValueError unless a `topk` choice is given exactly when the pattern has a topk part."""
    if (selected is None) != (pattern.block_selection() is None):
        raise ValueError(f"selected must be given exactly for patterns with a topk part; {pattern.spec} got "
                         f"{'none' if selected is None else 'one'}")


def selection_reason(pattern: Pattern, multiple: int, tiles: str) -> str | None:
    """Why a `topk` pattern's chosen blocks cannot be walked in whole tiles (its block is not a multiple of
    `multiple`, described as `tiles`), or None."""
    topk = pattern.block_selection()
    if topk is None or topk.size % multiple == 0:
        return None
    return f"{topk.spec}'s block {topk.size} is not a multiple of {tiles} ({multiple}): chosen blocks are walked whole"


def padded_length(seq_len: int, multiple: int) -> int:
    return -(-seq_len // multiple) * multiple


def pad_to(x, seq_len: int, head_dim: int | None = None):
    """Zero-pads [batch, seq, heads, d] to seq_len (and head_dim); a no-op when already there."""
    extra_seq = seq_len - x.shape[1]
    extra_dim = 0 if head_dim is None else head_dim - x.shape[3]
    if extra_seq == 0 and extra_dim == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra_seq), (0, 0), (0, extra_dim)))


def padded_flash(forward: Callable, backward: Callable, *, sequence_multiple: Callable[[KernelStatic], int],
                 padded_head_dim: Callable[[int], int] | None = None) -> Callable:
    """flash(q, k, v, static, selected=None) -> out [batch, seq, q_heads, d], differentiable through the given
    kernels.

    forward(q, k, v, static, seq_len) -> (out, lse) and backward(q, k, v, out, lse, d_out, static, seq_len)
    -> (dq, dk, dv) see inputs padded to a multiple of `sequence_multiple(static)` positions (the kernels'
    tiles) and of a `topk` pattern's block (chosen blocks are walked whole), and to `padded_head_dim(d)`
    features, with the true seq_len. Padded query rows get dO = 0, so they add nothing to dk and dv. A
    `selected` layout (the blocks a `topk` pattern chose: int32 [batch, kv_heads, query blocks, K], not
    differentiated) reaches both as the keyword `selected`; kernels that take none are never given one.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash_vjp(q, k, v, selected, static: KernelStatic):
        return flash_forward(q, k, v, selected, static)[0]

    def flash_forward(q, k, v, selected, static: KernelStatic):
        seq_len, head_dim = q.shape[1], q.shape[3]
        topk = static.pattern.block_selection()
        length = padded_length(seq_len, math.lcm(sequence_multiple(static), 1 if topk is None else topk.size))
        width = None if padded_head_dim is None else padded_head_dim(head_dim)
        q_p, k_p, v_p = (pad_to(x, length, width) for x in (q, k, v))
        extra = {} if selected is None else {"selected": selected}
        out_p, lse = forward(q_p, k_p, v_p, static, seq_len, **extra)
        return out_p[:, :seq_len, :, :head_dim], (q_p, k_p, v_p, out_p, lse, selected)

    def flash_backward(static: KernelStatic, residuals, d_out):
        q_p, k_p, v_p, out_p, lse, selected = residuals
        seq_len, head_dim = d_out.shape[1], d_out.shape[3]
        width = None if padded_head_dim is None else q_p.shape[3]
        d_out_p = pad_to(d_out.astype(q_p.dtype), q_p.shape[1], width)
        extra = {} if selected is None else {"selected": selected}
        dq, dk, dv = backward(q_p, k_p, v_p, out_p, lse, d_out_p, static, seq_len, **extra)
        return (*(x[:, :seq_len, :, :head_dim] for x in (dq, dk, dv)), None)

    flash_vjp.defvjp(flash_forward, flash_backward)

    def flash(q, k, v, static: KernelStatic, selected=None):
        return flash_vjp(q, k, v, selected, static)

    return flash


def check_block_fields(sizes, rules: dict[str, tuple[Callable[[int], bool], str]]) -> None:
    """ValueError unless every flag field of the BlockSizes dataclass `sizes` (typed bool, or bool | None) holds
    one of those, every other field is a positive integer, and every field whose name starts with a key of
    `rules` passes its (predicate, requirement), e.g. {"block_": (lambda b: b % 64 == 0, "a multiple of 64")}."""
    for field in dataclasses.fields(sizes):
        value = getattr(sizes, field.name)
        if field.type in (bool, "bool", "bool | None"):
            optional = field.type == "bool | None"
            if not (isinstance(value, bool) or (optional and value is None)):
                allowed = "True, False or None" if optional else "True or False"
                raise ValueError(f"{type(sizes).__name__}.{field.name} must be {allowed}, got {value!r}")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(sizes).__name__}.{field.name} must be a positive integer, got {value!r}")
        for prefix, (valid, requirement) in rules.items():
            if field.name.startswith(prefix) and not valid(value):
                raise ValueError(f"{type(sizes).__name__}.{field.name} must be {requirement}, got {value}")


def checked_block_sizes(block_sizes, cls: type, default: Callable[[], Any]):
    """`block_sizes` if it is a `cls`, `default()` if it is None; anything else is refused."""
    if block_sizes is None:
        return default()
    if not isinstance(block_sizes, cls):
        raise ValueError(f"block_sizes must be a {cls.__name__} or None, got {type(block_sizes).__name__}")
    return block_sizes


def dtype_reason(dtype, supported: tuple) -> str | None:
    """Why `dtype` is refused, or None when it is one of `supported`."""
    if any(dtype == d for d in supported):
        return None
    return f"dtype {dtype} is not supported ({', '.join(jnp.dtype(d).name for d in supported)})"


def cuda_capability_reason(minimum: int, label: str = "") -> str | None:
    """Why this process's first device cannot run kernels for CUDA compute capability >= minimum.0, or None."""
    needs = f"a CUDA GPU with compute capability >= {minimum}.0{f' ({label})' if label else ''}"
    if jax.default_backend() != "gpu":
        return f"needs {needs} or interpret=True"
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(capability).split(".")[0])
    except ValueError:
        return f"needs {needs}, found {capability!r}"
    return f"needs {needs}, found {capability}" if major < minimum else None


def refuse_unsupported(backend: str, reason: str | None) -> None:
    if reason is not None:
        raise ValueError(f"{backend} cannot run this case: {reason}")
