"""Block layouts: which key tiles each query tile attends, full or partial, and the transpose.

A layout is computed once per (pattern, seq_len, block_q, block_k), in NumPy, from the pattern's
structure (candidate tiles + closed-form tile classes), and cached. Kernels only consume layouts:

  forward:  for every query tile, its FULL key tiles (no masking needed), then its PARTIAL key tiles
            (the kernel evaluates `pattern.mask` on them, plus k < seq_len);
  backward: the same lists transposed, for every key tile its query tiles (the dk/dv pass).

Tiles overhanging the sequence end are never FULL on the key side (see `patterns.TileGrid`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from sparse_attention.patterns import FULL, PARTIAL, Pattern, TileGrid, as_pattern


@dataclasses.dataclass(frozen=True, eq=False)
class TileLists:
    """Compressed rows (CSR) of active tiles, one row per outer tile, split into full and partial.

    full_offsets:    int64 [num_rows + 1]; row r's full tiles are full_indices[full_offsets[r]:full_offsets[r+1]]
    full_indices:    int32 [num_full], ascending within a row
    partial_offsets, partial_indices: the same for partial tiles
    """

    full_offsets: np.ndarray
    full_indices: np.ndarray
    partial_offsets: np.ndarray
    partial_indices: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.full_offsets) - 1

    @property
    def num_full(self) -> np.ndarray:
        return np.diff(self.full_offsets).astype(np.int32)

    @property
    def num_partial(self) -> np.ndarray:
        return np.diff(self.partial_offsets).astype(np.int32)

    @functools.cached_property
    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(full [rows, max_full], num_full [rows], partial [rows, max_partial], num_partial [rows]), int32.

        Padding repeats the row's last listed tile (or 0), so a kernel that prefetches one entry past its
        count stays in bounds and reloads a tile it has just used. Width is at least 1.
        """
        return (*pad_rows(self.full_offsets, self.full_indices),
                *pad_rows(self.partial_offsets, self.partial_indices))

    @functools.cached_property
    def contiguous(self) -> tuple[bool, bool]:
        """Whether every row's full (partial) tiles are consecutive indices.

        Such a list is described by each row's first tile (`first_tiles`) and count: O(rows), where
        `padded` is O(rows x tiles) for dense-like rows (8192 x 8191 int32 for dense at 1M tokens).
        """
        return (_consecutive(self.full_offsets, self.full_indices),
                _consecutive(self.partial_offsets, self.partial_indices))

    @functools.cached_property
    def first_tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """(full, partial): int32 [rows]; each row's first listed tile, 0 for an empty row."""
        return _first(self.full_offsets, self.full_indices), _first(self.partial_offsets, self.partial_indices)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(full, partial) tile indices of row r."""
        return (
            self.full_indices[self.full_offsets[r] : self.full_offsets[r + 1]],
            self.partial_indices[self.partial_offsets[r] : self.partial_offsets[r + 1]],
        )


def pad_rows(offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(padded int32 [rows, width], counts int32 [rows]) of one CSR list; see `TileLists.padded`."""
    counts = np.diff(offsets)
    width = max(int(counts.max(initial=0)), 1)
    if len(indices) == 0:
        return np.zeros((len(counts), width), np.int32), counts.astype(np.int32)
    # Position in `indices` of each padded slot, clamped to the row's last entry.
    last = offsets[:-1, None] + np.maximum(counts[:, None] - 1, 0)
    source = np.minimum(offsets[:-1, None] + np.arange(width)[None, :], last)
    padded = np.where(counts[:, None] > 0, indices[np.minimum(source, len(indices) - 1)], 0)
    return padded.astype(np.int32), counts.astype(np.int32)


def _consecutive(offsets: np.ndarray, indices: np.ndarray) -> bool:
    """Whether indices step by exactly 1 inside every CSR row (a step across rows does not count)."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1  # positions that do not follow their predecessor
    return bool(np.isin(breaks, offsets).all())


def _first(offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    counts = np.diff(offsets)
    if len(indices) == 0:
        return np.zeros(len(counts), np.int32)
    return np.where(counts > 0, indices[np.minimum(offsets[:-1], len(indices) - 1)], 0).astype(np.int32)


def _csr(rows: np.ndarray, cols: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of (row, col) pairs already sorted by row then col."""
    offsets = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=num_rows), out=offsets[1:])
    return offsets, cols.astype(np.int32)


def _tile_lists(rows, cols, classes, num_rows) -> TileLists:
    full = classes == FULL
    return TileLists(*_csr(rows[full], cols[full], num_rows), *_csr(rows[~full], cols[~full], num_rows))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Active tiles of `pattern` at `seq_len` with [block_q, block_k] tiles; see the module docstring."""

    pattern: Pattern
    grid: TileGrid
    forward: TileLists  # rows: query tiles; indices: key tiles
    backward: TileLists  # rows: key tiles; indices: query tiles

    @property
    def seq_len(self) -> int:
        return self.grid.seq_len

    @property
    def block_q(self) -> int:
        return self.grid.block_q

    @property
    def block_k(self) -> int:
        return self.grid.block_k

    @property
    def num_q_tiles(self) -> int:
        return self.grid.num_q_tiles

    @property
    def num_k_tiles(self) -> int:
        return self.grid.num_k_tiles

    @property
    def num_full_tiles(self) -> int:
        return len(self.forward.full_indices)

    @property
    def num_partial_tiles(self) -> int:
        return len(self.forward.partial_indices)

    @functools.cached_property
    def active_pairs(self) -> int:
        """Exact number of attended (q, k) pairs."""
        return self.pattern.count_active(self.seq_len)

    @property
    def active_fraction(self) -> float:
        """Attended pairs over causal pairs (dense causal = 1)."""
        return self.active_pairs / (self.seq_len * (self.seq_len + 1) / 2)

    def dense_tile_classes(self) -> np.ndarray:
        """int8 [num_q_tiles, num_k_tiles] of EMPTY / PARTIAL / FULL, for tests and plots at small sizes."""
        classes = np.zeros((self.num_q_tiles, self.num_k_tiles), np.int8)
        for r in range(self.num_q_tiles):
            full, partial = self.forward.row(r)
            classes[r, full] = FULL
            classes[r, partial] = PARTIAL
        return classes


def _concat_ranges(pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """CSR whose row r lists start..start+count-1 of each (start [rows], count [rows]) piece, in order."""
    starts = np.stack([start for start, _ in pieces], axis=1).astype(np.int64).reshape(-1)
    counts = np.stack([np.maximum(count, 0) for _, count in pieces], axis=1).astype(np.int64)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts.sum(axis=1), out=offsets[1:])
    flat_counts = counts.reshape(-1)
    piece_offsets = np.cumsum(flat_counts) - flat_counts
    indices = np.arange(offsets[-1], dtype=np.int32 if offsets[-1] < 2**31 else np.int64)
    indices -= np.repeat((piece_offsets - starts).astype(indices.dtype), flat_counts)
    return offsets, indices.astype(np.int32, copy=False)


def _lists_from_ranges(first, last, full_first, full_last) -> TileLists:
    """Rows attending tiles first..last, FULL on full_first..full_last (a sub-range), PARTIAL elsewhere."""
    has_full = full_first <= full_last
    full = _concat_ranges([(full_first, np.where(has_full, full_last - full_first + 1, 0))])
    left = (first, np.where(has_full, full_first - first, last - first + 1))
    right = (full_last + 1, np.where(has_full, last - full_last, 0))
    return TileLists(*full, *_concat_ranges([left, right]))


def _transpose_ranges(num_cols: int, first, last, full_first, full_last):
    """Column-wise ranges of row-wise ones; monotone rows make each column's rows contiguous."""
    cols = np.arange(num_cols)
    rows_first = np.searchsorted(last, cols, side="left")
    rows_last = np.searchsorted(first, cols, side="right") - 1
    full_rows_first = np.searchsorted(full_last, cols, side="left")
    full_rows_last = np.searchsorted(full_first, cols, side="right") - 1
    return rows_first, rows_last, full_rows_first, full_rows_last


@functools.lru_cache(maxsize=256)
def _cached_layout(pattern: Pattern, seq_len: int, block_q: int, block_k: int) -> BlockLayout:
    grid = TileGrid(seq_len, block_q, block_k)
    ranges = pattern.tile_ranges(grid)
    if ranges is not None:
        forward = _lists_from_ranges(*ranges)
        backward = _lists_from_ranges(*_transpose_ranges(grid.num_k_tiles, *ranges))
        return BlockLayout(pattern, grid, forward, backward)
    q_tiles, k_tiles = pattern.candidate_tiles(grid)
    classes = pattern.classify_tiles(grid, q_tiles, k_tiles)
    active = classes != 0
    q_tiles, k_tiles, classes = q_tiles[active], k_tiles[active], classes[active]
    forward = _tile_lists(q_tiles, k_tiles, classes, grid.num_q_tiles)
    # Candidates come sorted by query tile; a stable sort by key tile keeps query tiles ascending within
    # each key tile (uint16 keys take NumPy's radix sort).
    sort_dtype = np.uint16 if grid.num_k_tiles <= np.iinfo(np.uint16).max else np.int64
    order = np.argsort(k_tiles.astype(sort_dtype), kind="stable")
    backward = _tile_lists(k_tiles[order], q_tiles[order], classes[order], grid.num_k_tiles)
    return BlockLayout(pattern, grid, forward, backward)


def block_layout(pattern: Pattern | str, seq_len: int, block_q: int, block_k: int) -> BlockLayout:
    """The cached block layout of a single-layer pattern (object or spec string)."""
    grid = TileGrid(seq_len, block_q, block_k)  # validates the sizes
    return _cached_layout(as_pattern(pattern), grid.seq_len, grid.block_q, grid.block_k)
