"""Multi-layer reachability of attention patterns: which earlier tokens can inform a token after L layers.

Information flows from key j to query i. R_0(i) = {i}; layer l (pattern `schedule.layer(l - 1)`) gives

    R_l(i) = R_{l-1}(i)  U  union over keys m of query i in layer l of R_{l-1}(m).

A block pattern is local, yet it never connects the last token of a block to the first of the next, at any
depth; this module measures such facts exactly. Three exact methods (docs/reachability.md has the proofs):

  intervals  every layer has `row_interval()`: R_l(i) = [0, min(C_l, i)] U [a_l(i), i], O(S) per layer
  offsets    every layer has `offsets(S)`: R_l(i) = {i - s : s in Sigma_l}, Sigma_l a sumset, O(S log S)
  bitset     anything else: packed uint64 bitsets over positions, one-hop key lists from the block layout;
             sizes over the memory or work budget are refused with ValueError, never approximated

CLI:
    python -m sparse_attention.reachability --pattern "block(64)" --pattern "repaired(64, 8, bridge)" \\
        --layers 4 --seq-len 1024 [--json PATH] [--plot PATH]
    python -m sparse_attention.reachability --config configs/X.py[:preset] --seq-len 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Sequence

import numpy as np

from sparse_attention import atomic_io
from sparse_attention.config_files import load_config_file
from sparse_attention.layout import block_layout
from sparse_attention.patterns import Pattern, PatternOrSchedule, as_schedule

METHODS = ("intervals", "offsets", "bitset")
STATUS_REACHED, STATUS_NEVER, STATUS_STOPPED = "reached", "never", "search_stopped"

# Bitset budgets. Memory: the bitsets and their range-OR table, (table levels + 2) * seq_len^2 / 8 bytes,
# plus the key lists. Work: one layer ORs (lookups + full tiles + (levels + 3) * seq_len) rows of
# seq_len / 64 uint64 words; a run takes 0.2 to 1 s per 10^8 such words on 2 cores.
MAX_BITSET_BYTES = 1 << 30
MAX_BITSET_WORD_OPS = 1 << 32
MAX_MASK_EVALUATIONS = 1 << 30
BITSET_TILE = 64
GATHER_WORDS = 1 << 22  # rows gathered at once: 32 MiB
DEFAULT_MAX_SEARCH_DEPTH = 1024
REACH_CURVE_POINTS = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Reachability:
    """Reachability of one pattern or schedule after `layers` layers at `seq_len`.

    covered_pairs_by_depth[d]: number of causal pairs (i, j <= i) with j in R_d(i), for d = 0..layers.
    earliest:                  int64 [seq_len], min R_layers(i).
    full_coverage_status:      "reached" (full_coverage_depth is the least depth with every pair covered),
                               "never" (proved: a whole schedule period changes nothing, or the closed form
                               says so), or "search_stopped" (unknown: no full coverage up to depth
                               search_stopped_at_depth, where the search limit or work budget ended it).
    """

    pattern: str
    seq_len: int
    layers: int
    method: str
    covered_pairs_by_depth: tuple[int, ...]
    disconnected_adjacent: int
    full_coverage_depth: int | None
    full_coverage_status: str
    search_stopped_at_depth: int | None
    earliest: np.ndarray

    @property
    def causal_pairs(self) -> int:
        return self.seq_len * (self.seq_len + 1) // 2

    @property
    def covered_pairs(self) -> int:
        return self.covered_pairs_by_depth[-1]

    @property
    def coverage(self) -> float:
        return self.covered_pairs / self.causal_pairs

    @property
    def coverage_by_depth(self) -> list[float]:
        return [count / self.causal_pairs for count in self.covered_pairs_by_depth]

    @property
    def reach_distance(self) -> np.ndarray:
        """int64 [seq_len]: i - min R_layers(i), how far back position i can see."""
        return np.arange(self.seq_len) - self.earliest

    def to_json(self) -> dict:
        distance = self.reach_distance
        positions = np.unique(np.linspace(0, self.seq_len - 1, min(self.seq_len, REACH_CURVE_POINTS)).round())
        positions = positions.astype(np.int64)
        return {
            "pattern": self.pattern,
            "seq_len": self.seq_len,
            "layers": self.layers,
            "method": self.method,
            "coverage": self.coverage,
            "covered_pairs": self.covered_pairs,
            "causal_pairs": self.causal_pairs,
            "coverage_by_depth": self.coverage_by_depth,
            "covered_pairs_by_depth": list(self.covered_pairs_by_depth),
            "disconnected_adjacent": self.disconnected_adjacent,
            "full_coverage_depth": self.full_coverage_depth,
            "full_coverage_status": self.full_coverage_status,
            "search_stopped_at_depth": self.search_stopped_at_depth,
            "reach_distance": {
                "mean": float(distance.mean()),
                "median": float(np.median(distance)),
                "max": int(distance.max()),
            },
            "reach_curve": {
                "position": positions.tolist(),
                "earliest": self.earliest[positions].tolist(),
            },
        }


# ------------------------------------------------------------------------------------------ intervals


class _IntervalReach:
    """R_d(i) = [0, min(C_d, i)] U [a_d(i), i] with a_d nondecreasing; C_d = largest cap so far (-1: none).

    With f_l(i) = max(lo_l(i), 0) the first key of layer l: the keys of i plus i are [0, min(c_l, i)] U
    [f_l(i), i]. Every R_{d-1}(m) holds m, so the prefix part contributes [0, min(c_l, i)]; the union of
    [a(m), m] over m in [f_l(i), i] is the contiguous [a(f_l(i)), i] because a is nondecreasing and
    a(m + 1) <= m + 1; the prefixes [0, min(C, m)] give [0, min(C, i)]. Hence a_d = a_{d-1}[f_d] and
    C_d = max(C_{d-1}, c_d).
    """

    def __init__(self, schedule: PatternOrSchedule, seq_len: int):
        positions = np.arange(seq_len, dtype=np.int64)
        self.first_keys, self.caps = [], []
        for index in range(schedule.period):
            layer = schedule.layer(index)
            lo, cap = layer.row_interval()
            first = np.broadcast_to(np.maximum(np.asarray(lo(positions), np.int64), 0), positions.shape)
            if np.any(first > positions) or np.any(np.diff(first) < 0):
                raise ValueError(f"{layer.spec!r}: row_interval lo(q) must be nondecreasing and <= q")
            self.first_keys.append(first)
            self.caps.append(int(cap))
        self.seq_len = seq_len
        self.positions = positions
        self.start = positions.copy()  # a_d
        self.cap = -1  # C_d

    def advance(self, depth: int):
        index = (depth - 1) % len(self.first_keys)
        self.start = self.start[self.first_keys[index]]
        self.cap = max(self.cap, self.caps[index])

    def _prefix_len(self):
        return np.minimum(self.cap, self.positions) + 1

    def covered_pairs(self) -> int:
        prefix = self._prefix_len()
        sizes = np.where(self.start <= prefix, self.positions + 1, prefix + self.positions - self.start + 1)
        return int(sizes.sum())

    def earliest(self) -> np.ndarray:
        return np.zeros_like(self.start) if self.cap >= 0 else self.start.copy()

    def disconnected_adjacent(self) -> int:
        i = self.positions[1:]
        return int(((self.start[1:] == i) & (self.cap < i - 1)).sum())

    def full_coverage(self):
        """Least depth with full coverage, exactly, by following one position's first key.

        Coverage is full at depth d iff a_d(S - 1) <= C_d + 1 (a_d is nondecreasing and positions up to
        C_d + 1 are covered already). With period P, G = f_1 o ... o f_P and H_r = f_1 o ... o f_r, depth
        kP + r has a_{kP+r} = G^k o H_r, and C_d is the largest cap of the period from depth P on. G(x) <= x,
        so each trajectory G^k(H_r(S - 1)) decreases until it is covered or stops at a fixed point of G,
        after which nothing changes (never): at most S steps per r.
        """
        last = self.seq_len - 1
        period = len(self.first_keys)
        starts, running_cap = [], -1
        for r in range(period):
            running_cap = max([running_cap] + self.caps[:r])
            start = self._apply_prefix(r, last)
            if start <= running_cap + 1:
                return r, STATUS_REACHED, None
            starts.append(start)
        period_map = self.positions
        for first in reversed(self.first_keys):
            period_map = first[period_map]
        period_map = period_map.tolist()
        cap = max(self.caps)
        best = None
        for r, point in enumerate(starts):
            k = 0
            while best is None or (k + 1) * period + r < best:
                following = period_map[point]
                k += 1
                if following <= cap + 1:
                    best = k * period + r
                    break
                if following == point:
                    break
                point = following
        return (None, STATUS_NEVER, None) if best is None else (best, STATUS_REACHED, None)

    def _apply_prefix(self, r: int, position: int) -> int:
        """H_r(position) = f_1(f_2(...f_r(position)))."""
        for first in reversed(self.first_keys[:r]):
            position = int(first[position])
        return position


# -------------------------------------------------------------------------------------------- offsets


# Shift-and-or is exact integer work; above this many shifted words the sumset goes through an FFT.
_SHIFT_SUMSET_LIMIT = 1 << 26


def _sumset(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """{x + y : x in a, y in b, x + y < len(a)} for bool [S] indicator arrays, exactly."""
    size = len(a)
    a_idx, b_idx = np.flatnonzero(a), np.flatnonzero(b)
    shifts, base = (a_idx, b) if len(a_idx) <= len(b_idx) else (b_idx, a)
    if len(shifts) * size <= _SHIFT_SUMSET_LIMIT:
        out = np.zeros(size, bool)
        for s in shifts.tolist():
            out[s:] |= base[: size - s]
        return out
    # Counts of representations are integers <= S; float64 FFT error at these sizes is far below 0.5,
    # and the check below turns any doubt into an error instead of a wrong set.
    n = 1 << (2 * size - 1).bit_length()
    counts = np.fft.irfft(np.fft.rfft(a.astype(np.float64), n) * np.fft.rfft(b.astype(np.float64), n), n)[:size]
    rounded = np.rint(counts)
    if np.abs(counts - rounded).max(initial=0.0) > 0.25:
        raise RuntimeError(f"sumset FFT lost integer precision at seq_len={size}")
    return rounded > 0


class _OffsetReach:
    """R_d(i) = {i - s : s in Sigma_d, s <= i}, Sigma_d = Sigma_{d-1} + (D_d U {0}) (sumset, capped at S).

    For translation-invariant layers (keys of i are i - D_l): R_d(i) = union over d in D_l U {0}, d <= i of
    R_{d-1}(i - d) = {i - d - s : s in Sigma_{d-1}, d + s <= i}, because d, s >= 0.
    """

    def __init__(self, schedule: PatternOrSchedule, seq_len: int):
        self.differences = []
        for index in range(schedule.period):
            offsets = np.array(schedule.layer(index).offsets(seq_len), bool)
            offsets[0] = True  # residual
            self.differences.append(offsets)
        self.seq_len = seq_len
        self.sums = np.zeros(seq_len, bool)
        self.sums[0] = True

    def advance(self, depth: int):
        self.sums = _sumset(self.sums, self.differences[(depth - 1) % len(self.differences)])

    def covered_pairs(self) -> int:
        return int((self.seq_len - np.flatnonzero(self.sums)).sum())

    def earliest(self) -> np.ndarray:
        positions = np.arange(self.seq_len)
        largest_sum = np.maximum.accumulate(np.where(self.sums, positions, 0))
        return positions - largest_sum

    def disconnected_adjacent(self) -> int:
        return 0 if self.seq_len < 2 or self.sums[1] else self.seq_len - 1

    def full_coverage(self):
        """Least depth with Sigma = [0, S), exactly, by binary lifting over periods.

        Sigma_{kP+r} = G^k + H_r with G the sumset of one period and H_r of its first r layers. G^k grows
        with k and is stable once G^{2k} = G^k; powers G^{2^j} up to that point locate the least k.
        """
        period = len(self.differences)
        prefixes = [np.zeros(self.seq_len, bool)]
        prefixes[0][0] = True
        for offsets in self.differences:
            prefixes.append(_sumset(prefixes[-1], offsets))
        for r in range(period):
            if prefixes[r].all():
                return r, STATUS_REACHED, None
        powers = [prefixes[period]]  # G^(2^j)
        while not powers[-1].all():
            doubled = _sumset(powers[-1], powers[-1])
            if doubled.sum() == powers[-1].sum():
                break
            powers.append(doubled)
        best = None
        for r in range(period):
            if not _sumset(powers[-1], prefixes[r]).all():
                continue
            current, k = prefixes[r], 0
            for j in reversed(range(len(powers))):
                candidate = _sumset(current, powers[j])
                if not candidate.all():
                    current, k = candidate, k + (1 << j)
            depth = (k + 1) * period + r
            best = depth if best is None else min(best, depth)
        return (None, STATUS_NEVER, None) if best is None else (best, STATUS_REACHED, None)


# --------------------------------------------------------------------------------------------- bitset


@dataclasses.dataclass(frozen=True, eq=False)
class _Hops:
    """One layer's keys of every query other than the query itself, split by the block layout.

    full_offsets / full_tiles:  CSR over query tiles of the key tiles they see entirely.
    lookup_offsets / lookups:   CSR over query rows of rows of the range-OR table (see `_BitsetReach`). A
                                row's keys on partial tiles are runs [s, e] inside one tile; a run is the OR
                                of table rows (j, s) and (j, e - 2^j + 1) with 2^j <= e - s + 1 < 2^(j + 1),
                                stored flat as j * seq_len + position.
    levels:                     highest table level used (0 when there are no runs longer than 1).
    """

    full_offsets: np.ndarray
    full_tiles: np.ndarray
    lookup_offsets: np.ndarray
    lookups: np.ndarray
    levels: int


def _bitset_words(seq_len: int) -> int:
    return -(-seq_len // 64)


def _partial_runs(pattern: Pattern, seq_len: int, tile: int, forward) -> tuple[np.ndarray, ...]:
    """(row, first key, last key) of every maximal run of keys of a row inside one partial tile."""
    tile_rows = np.repeat(np.arange(forward.num_rows, dtype=np.int64), forward.num_partial)
    tile_cols = forward.partial_indices.astype(np.int64)
    offsets = np.arange(tile, dtype=np.int64)
    rows, firsts, lasts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    chunk = max(1, (1 << 22) // (tile * tile))
    for begin in range(0, len(tile_rows), chunk):
        q_tiles, k_tiles = tile_rows[begin : begin + chunk], tile_cols[begin : begin + chunk]
        q = q_tiles[:, None, None] * tile + offsets[None, :, None]
        k = k_tiles[:, None, None] * tile + offsets[None, None, :]
        active = pattern.mask(q, k) & (q < seq_len) & (k < seq_len) & (k != q)
        active = np.broadcast_to(active, (len(q), tile, tile))
        edges = np.pad(active, ((0, 0), (0, 0), (1, 1)))
        which, row, first = np.nonzero(active & ~edges[:, :, :-2])
        last = np.nonzero(active & ~edges[:, :, 2:])[2]  # same (tile, row) order as the starts
        rows.append(q_tiles[which] * tile + row)
        firsts.append(k_tiles[which] * tile + first)
        lasts.append(k_tiles[which] * tile + last)
    return np.concatenate(rows), np.concatenate(firsts), np.concatenate(lasts)


def _build_hops(pattern: Pattern, seq_len: int, tile: int) -> _Hops:
    forward = block_layout(pattern, seq_len, tile, tile).forward
    rows, firsts, lasts = _partial_runs(pattern, seq_len, tile, forward)
    lengths = lasts - firsts + 1
    level = np.zeros_like(lengths)
    for j in range(1, max(tile, 2).bit_length()):
        level += lengths >= (1 << j)
    seconds = lasts - (1 << level) + 1
    twice = seconds != firsts
    lookup_rows = np.concatenate([rows, rows[twice]])
    lookups = np.concatenate([level * seq_len + firsts, (level * seq_len + seconds)[twice]])
    order = np.argsort(lookup_rows, kind="stable")
    lookup_offsets = np.zeros(seq_len + 1, np.int64)
    np.cumsum(np.bincount(lookup_rows, minlength=seq_len), out=lookup_offsets[1:])
    return _Hops(
        forward.full_offsets,
        forward.full_indices,
        lookup_offsets,
        lookups[order],
        int(level.max(initial=0)),
    )


def _bitset_refusal(schedule: PatternOrSchedule, seq_len: int, tile: int = BITSET_TILE) -> str | None:
    """Why the bitset method refuses this size before building anything (memory, mask work), or None."""
    words = _bitset_words(seq_len)
    bitset_bytes = 2 * seq_len * words * 8
    if bitset_bytes > MAX_BITSET_BYTES:
        return (
            f"bitset reachability at seq_len={seq_len} needs at least {bitset_bytes / 2**30:.2f} GiB of bitsets, "
            f"over the {MAX_BITSET_BYTES / 2**30:.2f} GiB budget; use a smaller seq_len or a pattern whose "
            f"layers all have row_interval() or offsets() structure"
        )
    for index in range(schedule.period):
        layout = block_layout(schedule.layer(index), seq_len, tile, tile)
        evaluations = layout.num_partial_tiles * tile * tile
        if evaluations > MAX_MASK_EVALUATIONS:
            return (
                f"bitset reachability of {schedule.layer(index).spec!r} at seq_len={seq_len} would evaluate "
                f"the mask {evaluations:.3g} times on partial tiles, over the budget of "
                f"{MAX_MASK_EVALUATIONS:.3g}; use a smaller seq_len"
            )
    return None


class _BitsetReach:
    """Packed R[i] (uint64 [S, ceil(S/64)]), one layer at a time.

    Each layer first snapshots R_{d-1} into a range-OR table, table[j, m] = OR of R[m .. m + 2^j - 1]
    (level 0 is the copy), and the OR of every key tile; then R[i] |= the runs and full tiles of row i,
    all read from the snapshots, so rows can be updated in any order and in chunks.
    """

    def __init__(self, schedule: PatternOrSchedule, seq_len: int, layers: int, tile: int, gather_words: int):
        reason = _bitset_refusal(schedule, seq_len, tile)
        if reason:
            raise ValueError(reason)
        self.seq_len, self.tile, self.gather_words = seq_len, tile, gather_words
        self.words = _bitset_words(seq_len)
        self.hops = [_build_hops(schedule.layer(index), seq_len, tile) for index in range(schedule.period)]
        levels = max(h.levels for h in self.hops)
        index_bytes = sum(h.lookups.nbytes + h.lookup_offsets.nbytes for h in self.hops)
        total_bytes = (levels + 2) * seq_len * self.words * 8 + index_bytes
        if total_bytes > MAX_BITSET_BYTES:
            raise ValueError(
                f"bitset reachability of {schedule.spec!r} at seq_len={seq_len} needs {total_bytes / 2**30:.2f} "
                f"GiB (bitsets, range-OR table, key lists), over the {MAX_BITSET_BYTES / 2**30:.2f} GiB budget; "
                f"use a smaller seq_len"
            )
        self.layer_cost = [
            self.words * (len(h.lookups) + len(h.full_tiles) + (h.levels + 3) * seq_len) for h in self.hops
        ]
        cost = sum(self.layer_cost[(d - 1) % len(self.hops)] for d in range(1, layers + 1))
        if cost > MAX_BITSET_WORD_OPS:
            raise ValueError(
                f"bitset reachability of {schedule.spec!r} at seq_len={seq_len}, layers={layers} needs about "
                f"{cost:.3g} word operations, over the budget of {MAX_BITSET_WORD_OPS:.3g}; use fewer layers "
                f"or a smaller seq_len"
            )
        self.spent = 0
        positions = np.arange(seq_len)
        self.bits = np.zeros((seq_len, self.words), np.uint64)
        self.bits[positions, positions // 64] = np.uint64(1) << (positions % 64).astype(np.uint64)
        self.table = np.empty((levels + 1, seq_len, self.words), np.uint64)

    def advance(self, depth: int):
        index = (depth - 1) % len(self.hops)
        hops = self.hops[index]
        self.spent += self.layer_cost[index]
        bits, table, tile, size = self.bits, self.table, self.tile, self.seq_len
        table[0] = bits
        for j in range(1, hops.levels + 1):
            half = min(1 << (j - 1), size)
            # Rows past S - 2^j are never looked up at level j; they keep a defined value.
            np.bitwise_or(table[j - 1, : size - half], table[j - 1, half:], out=table[j, : size - half])
            table[j, size - half :] = table[j - 1, size - half :]
        whole = size // tile * tile
        tile_or = np.bitwise_or.reduce(bits[:whole].reshape(-1, tile, self.words), axis=1)
        if whole < size:
            tile_or = np.concatenate([tile_or, np.bitwise_or.reduce(bits[whole:], axis=0, keepdims=True)])
        flat_table = table.reshape(-1, self.words)
        # Runs on partial tiles, in segments of lookups; a row may span segments.
        per_segment = max(1, self.gather_words // self.words)
        row_ends = hops.lookup_offsets[1:]
        for start in range(0, len(hops.lookups), per_segment):
            end = min(start + per_segment, len(hops.lookups))
            gathered = flat_table[hops.lookups[start:end]]
            first_row = int(np.searchsorted(row_ends, start, side="right"))
            last_row = int(np.searchsorted(row_ends, end - 1, side="right"))
            rows = np.arange(first_row, last_row + 1)
            begins = np.maximum(hops.lookup_offsets[rows], start) - start
            owning = np.minimum(hops.lookup_offsets[rows + 1], end) - start > begins
            bits[rows[owning]] |= np.bitwise_or.reduceat(gathered, begins[owning], axis=0)
        # Full key tiles.
        seeing = np.flatnonzero(np.diff(hops.full_offsets))
        if len(seeing):
            full_or = np.bitwise_or.reduceat(tile_or[hops.full_tiles], hops.full_offsets[seeing], axis=0)
            rows_per_tile = np.minimum((seeing + 1) * tile, size) - seeing * tile
            per_chunk = max(1, self.gather_words // (self.words * tile))
            for begin in range(0, len(seeing), per_chunk):
                chosen = slice(begin, begin + per_chunk)
                rows = np.concatenate(
                    [np.arange(t * tile, t * tile + n) for t, n in zip(seeing[chosen], rows_per_tile[chosen])]
                )
                bits[rows] |= np.repeat(full_or[chosen], rows_per_tile[chosen], axis=0)

    def covered_pairs(self) -> int:
        return int(np.bitwise_count(self.bits).sum(dtype=np.int64))

    def earliest(self) -> np.ndarray:
        first_word = np.argmax(self.bits != 0, axis=1)
        word = self.bits[np.arange(self.seq_len), first_word]
        lowest = word & (~word + np.uint64(1))
        return first_word.astype(np.int64) * 64 + np.bitwise_count(lowest - np.uint64(1)).astype(np.int64)

    def disconnected_adjacent(self) -> int:
        i = np.arange(1, self.seq_len)
        bit = (self.bits[i, (i - 1) // 64] >> ((i - 1) % 64).astype(np.uint64)) & np.uint64(1)
        return int((bit == 0).sum())

    def can_advance(self, depth: int) -> bool:
        return self.spent + self.layer_cost[(depth - 1) % len(self.hops)] <= MAX_BITSET_WORD_OPS


# ------------------------------------------------------------------------------------------- analysis


def supported_methods(schedule: PatternOrSchedule, seq_len: int) -> tuple[str, ...]:
    """Exact methods that apply to every layer of the schedule, in order of preference."""
    layers = [schedule.layer(index) for index in range(schedule.period)]
    methods = []
    if all(layer.row_interval() is not None for layer in layers):
        methods.append("intervals")
    if all(layer.offsets(seq_len) is not None for layer in layers):
        methods.append("offsets")
    methods.append("bitset")
    return tuple(methods)


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def reachability(
    pattern: PatternOrSchedule | str | Sequence[str],
    seq_len: int,
    layers: int,
    *,
    method: str | None = None,
    max_search_depth: int = DEFAULT_MAX_SEARCH_DEPTH,
    tile: int = BITSET_TILE,
    gather_words: int = GATHER_WORDS,
) -> Reachability:
    """Exact reachability of a pattern, schedule, spec or list of per-layer specs after `layers` layers.

    method: None picks the first of `supported_methods` (intervals, offsets, bitset); naming one that does
    not apply raises ValueError. max_search_depth bounds the layer-by-layer search for the full-coverage
    depth of the bitset method (the other methods find it in closed form); tile and gather_words set the
    bitset's tile size and how many words it gathers at once.
    """
    schedule = as_schedule(pattern)
    seq_len = _check_positive("seq_len", seq_len)
    layers = _check_positive("layers", layers)
    max_search_depth = _check_positive("max_search_depth", max_search_depth)
    supported = supported_methods(schedule, seq_len)
    if method is None:
        method = supported[0]
    elif method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} or None, got {method!r}")
    elif method not in supported:
        raise ValueError(
            f"method {method!r} does not apply to {schedule.spec!r}: every layer needs "
            f"{'row_interval()' if method == 'intervals' else 'offsets(seq_len)'}; "
            f"supported: {', '.join(supported)}"
        )
    if method == "intervals":
        state = _IntervalReach(schedule, seq_len)
    elif method == "offsets":
        state = _OffsetReach(schedule, seq_len)
    else:
        state = _BitsetReach(
            schedule, seq_len, layers, _check_positive("tile", tile), _check_positive("gather_words", gather_words)
        )

    counts = [state.covered_pairs()]
    for depth in range(1, layers + 1):
        state.advance(depth)
        counts.append(state.covered_pairs())
    earliest = state.earliest()
    disconnected = state.disconnected_adjacent()

    if method == "bitset":
        full_depth, status, stopped = _search_layer_by_layer(state, counts, schedule.period, max_search_depth)
    else:
        full_depth, status, stopped = state.full_coverage()
    return Reachability(
        pattern=schedule.spec,
        seq_len=seq_len,
        layers=layers,
        method=method,
        covered_pairs_by_depth=tuple(counts),
        disconnected_adjacent=disconnected,
        full_coverage_depth=full_depth,
        full_coverage_status=status,
        search_stopped_at_depth=stopped,
        earliest=earliest,
    )


def _search_layer_by_layer(state: _BitsetReach, counts: list[int], period: int, max_depth: int):
    """First full depth, or a proof of never (a period without change), or where the search stopped."""
    total = state.seq_len * (state.seq_len + 1) // 2
    counts = list(counts)
    depth = 0
    while True:
        if counts[depth] == total:
            return depth, STATUS_REACHED, None
        # Sets only grow, so equal counts one period apart mean equal sets, and then nothing changes again.
        if depth >= period and counts[depth] == counts[depth - period]:
            return None, STATUS_NEVER, None
        if depth + 1 < len(counts):
            depth += 1
            continue
        if depth + 1 > max_depth or not state.can_advance(depth + 1):
            return None, STATUS_STOPPED, depth
        state.advance(depth + 1)
        counts.append(state.covered_pairs())
        depth += 1


# ------------------------------------------------------------------------------------------ membership


# The matrix fallback of `reachable` holds bool [S, S] products; past this length it refuses.
MAX_MATRIX_SEQ_LEN = 2048


@functools.lru_cache(maxsize=64)
def _membership(schedule: PatternOrSchedule, seq_len: int, layers: int):
    """(earliest int64 [S], None) when every R_layers(i) is the interval [earliest(i), i]; otherwise
    (None, bool [S, S] with [i, j] = j in R_layers(i))."""
    result = reachability(schedule, seq_len, layers)
    positions = np.arange(seq_len)
    # R(i) is inside [earliest(i), i], so equal counts mean every set is that whole interval.
    if result.covered_pairs == int((positions - result.earliest + 1).sum()):
        return result.earliest, None
    if seq_len > MAX_MATRIX_SEQ_LEN:
        raise ValueError(f"seq_len: reachable sets of {schedule.spec!r} are not intervals, and the exact matrix "
                         f"method is limited to {MAX_MATRIX_SEQ_LEN} positions, got {seq_len}")
    # R_l = R_{l-1} propagated through the keys of layer l plus the position itself.
    reach = np.eye(seq_len, dtype=np.float32)
    for layer in range(layers):
        hops = schedule.layer(layer).mask(positions[:, None], positions[None, :]) | np.eye(seq_len, dtype=bool)
        reach = ((hops.astype(np.float32) @ reach) > 0).astype(np.float32)
    return None, reach > 0


def reachable(pattern: PatternOrSchedule | str | Sequence[str], seq_len: int, layers: int, queries, keys) -> np.ndarray:
    """Whether key position k is in R_layers(q), exactly, for each (q, k) of the broadcast of `queries` and
    `keys` (int arrays of positions < seq_len); bool of the broadcast shape."""
    schedule = as_schedule(pattern)
    queries, keys = np.broadcast_arrays(np.asarray(queries, np.int64), np.asarray(keys, np.int64))
    if queries.size and (min(queries.min(), keys.min()) < 0 or max(queries.max(), keys.max()) >= seq_len):
        raise ValueError(f"queries and keys must be positions in [0, {seq_len}), got values from "
                         f"{min(queries.min(), keys.min())} to {max(queries.max(), keys.max())}")
    earliest, matrix = _membership(schedule, _check_positive("seq_len", seq_len), _check_positive("layers", layers))
    if matrix is not None:
        return matrix[queries, keys]
    return (keys <= queries) & (keys >= earliest[queries])


def layers_in_order(pattern: PatternOrSchedule | str | Sequence[str], seq_len: int, layers: int, route,
                    start_layer: int = 0) -> np.ndarray:
    """The fewest layers after which information reaches route[-1] having passed every position of the route
    in order, for each row of `route` (int [n, stops], positions, -1 pads a row's end); 0 where it does not
    within `layers`.

    The information leaves route[0] after layer `start_layer`; a stop passes it on from the layer after the
    one it arrived in. This is what a chain of lookups needs when each link is resolved where it is stated:
    reachability of route[-1] from route[0] alone is necessary, not sufficient. Dense masks: seq_len is
    limited to MAX_MATRIX_SEQ_LEN.
    """
    schedule = as_schedule(pattern)
    route = np.atleast_2d(np.asarray(route, np.int64))
    _check_positive("seq_len", seq_len)
    _check_positive("layers", layers)
    if seq_len > MAX_MATRIX_SEQ_LEN:
        raise ValueError(f"seq_len: layers_in_order is limited to {MAX_MATRIX_SEQ_LEN} positions, got {seq_len}")
    if not 0 <= start_layer < layers:
        raise ValueError(f"start_layer must be in [0, {layers}), got {start_layer}")
    stops = (route >= 0).sum(axis=1)
    if route.size and (route.max() >= seq_len or (stops < 2).any() or (route[:, :1] < 0).any()
                       or ((route >= 0) != (np.arange(route.shape[1]) < stops[:, None])).any()):
        raise ValueError(f"route: each row must hold at least two positions in [0, {seq_len}), then -1 padding")
    rows = np.arange(len(route))
    positions = np.arange(seq_len)
    holds = np.zeros((len(route), seq_len), bool)  # [n, seq]: positions holding the information so far
    holds[rows, route[:, 0]] = True
    stage = np.ones(len(route), np.int64)  # index of the next stop
    arrived = np.zeros(len(route), np.int64)
    for layer in range(start_layer, layers):
        mask = np.broadcast_to(schedule.layer(layer).mask(positions[:, None], positions[None, :]),
                               (seq_len, seq_len))  # [query, key]
        holds |= (holds.astype(np.float32) @ mask.T.astype(np.float32)) > 0
        going = stage < stops
        target = route[rows, np.minimum(stage, route.shape[1] - 1)]
        reached = going & holds[rows, target]
        holds[reached] = False
        holds[rows[reached], target[reached]] = True
        stage += reached
        arrived[reached & (stage == stops)] = layer + 1
    return arrived


# ---------------------------------------------------------------------------------------------- files


def load_config(location: str) -> tuple[PatternOrSchedule, int | None]:
    """(pattern or schedule, model.num_layers or None) from "path/to/config.py[:arg]".

    The file's get_config(arg) (get_config() without an arg) returns a config with `attention.schedule`
    (a list of specs, one per layer, cycled; used when non-empty) or `attention.pattern` (a spec), and
    optionally `model.num_layers`.
    """
    config = load_config_file(location)
    attention = _config_field(config, "attention")
    schedule = _config_field(attention, "schedule")
    pattern = _config_field(attention, "pattern")
    if schedule:
        loaded = as_schedule(schedule if isinstance(schedule, str) else [str(s) for s in schedule])
    elif pattern:
        loaded = as_schedule(str(pattern))
    else:
        raise ValueError(
            f"--config: {location!r} sets neither attention.schedule (a non-empty list of specs) nor "
            f"attention.pattern (a spec)"
        )
    num_layers = _config_field(_config_field(config, "model"), "num_layers")
    return loaded, None if num_layers is None else int(num_layers)


def _config_field(node, name: str):
    """node.name for ConfigDicts, dicts and plain objects; None when node or the field is absent."""
    if node is None:
        return None
    if hasattr(node, "get"):
        return node.get(name)
    return getattr(node, name, None)


def write_json(results: Sequence[Reachability], path: str) -> None:
    report = {"results": [result.to_json() for result in results]}
    atomic_io.write_json(path, report, indent=2)


def plot(results: Sequence[Reachability], path: str) -> None:
    """PNG: coverage against depth, and how far back each position reaches, for every pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (coverage_axes, reach_axes) = plt.subplots(1, 2, figsize=(13, 5))
    for result in results:
        coverage_axes.plot(range(result.layers + 1), result.coverage_by_depth, marker="o", label=result.pattern)
        reach_axes.plot(np.arange(result.seq_len), result.reach_distance, linewidth=0.9)
    coverage_axes.set(xlabel="depth (layers)", ylabel="coverage of causal pairs", ylim=(0, 1.02))
    coverage_axes.set_title("coverage by depth")
    coverage_axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    reach_axes.set(xlabel="position i", ylabel="i - earliest reachable position")
    reach_axes.set_title(f"reach after {results[0].layers} layers")
    for axes in (coverage_axes, reach_axes):
        axes.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=min(len(results), 4), fontsize="small", frameon=False)
    figure.suptitle(f"reachability, seq_len={results[0].seq_len}")
    rows_of_legend = -(-len(results) // 4)
    figure.tight_layout(rect=(0, 0.05 * rows_of_legend, 1, 1))
    with atomic_io.atomic_open(path) as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)


def _depth_text(result: Reachability) -> str:
    if result.full_coverage_status == STATUS_REACHED:
        return str(result.full_coverage_depth)
    if result.full_coverage_status == STATUS_NEVER:
        return "never"
    return f"> {result.search_stopped_at_depth} (search stopped)"


def format_table(results: Sequence[Reachability]) -> str:
    header = (
        "pattern", "method", "coverage", "disconnected_adjacent", "full_coverage_depth", "mean_reach_distance"
    )
    rows = [
        (
            r.pattern,
            r.method,
            f"{r.coverage:.4f}",
            str(r.disconnected_adjacent),
            _depth_text(r),
            f"{r.reach_distance.mean():.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_attention.reachability",
        description="Exact multi-layer reachability of attention patterns (see docs/reachability.md).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pattern", action="append", metavar="SPEC", help="pattern or schedule spec (repeatable)")
    source.add_argument("--config", metavar="FILE.py[:ARG]", help="config with attention.pattern / .schedule")
    parser.add_argument("--layers", type=int, help="depth L (default with --config: model.num_layers)")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--method", choices=METHODS, help="force an exact method (default: first that applies)")
    parser.add_argument(
        "--max-search-depth",
        type=int,
        default=DEFAULT_MAX_SEARCH_DEPTH,
        help="deepest layer the bitset method tries when searching for full coverage",
    )
    parser.add_argument("--json", metavar="PATH", help="write {'results': [...]} here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG here")
    args = parser.parse_args(argv)
    try:
        layers = args.layers
        if args.config:
            schedule, config_layers = load_config(args.config)
            schedules = [schedule]
            layers = config_layers if layers is None else layers
        else:
            schedules = [as_schedule(spec) for spec in args.pattern]
        if layers is None:
            raise ValueError("--layers is required (the config sets no model.num_layers)")
        results = [
            reachability(
                schedule,
                args.seq_len,
                layers,
                method=args.method,
                max_search_depth=args.max_search_depth,
            )
            for schedule in schedules
        ]
    except ValueError as error:
        parser.error(str(error))
    print(f"seq_len={args.seq_len}  layers={layers}")
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
