"""A small algebra of causal attention patterns.

A pattern says which keys each query may see. Every pattern is intersected with causality (k <= q).
Patterns are frozen, hashable objects, and each one round-trips through a spec string:

    parse("repaired(512, 64, bridge)").spec == "repaired(512, 64, bridge)"

Each pattern gives:
  * `mask(q, k)`: its token-level predicate, vectorized over broadcastable integer arrays. It is written
    with array operators only, so the same code runs on NumPy arrays, on traced jnp arrays, inside
    Pallas kernels (the kernels evaluate it on partial tiles instead of reading a mask from memory), and
    on torch tensors (the benchmark's FlexAttention mask_mod; `torch_arrays.py`).
  * `classify_tiles(grid, q_tiles, k_tiles)`: exact empty / partial / full classes of tiles, from the
    pattern's structure, without materialising S x S (see `layout.py`).
  * structure for the reachability analysis: `row_interval` (interval patterns) and `offsets`
    (translation-invariant patterns); see `reachability.py` and docs/reachability.md.

  * `block_grid()`: where its block edges fall, if it has blocks (evaluation measures loss by block offset).

Per-layer schedules (`Schedule`) cycle a list of patterns over layers; `shifted(B)` is one. The spec names,
their arguments and the help text come from one registry, `PATTERN_KINDS` (`valid_forms()`): a new kind is a
class plus its `pattern_kind(...)` decorator.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import re
from typing import Callable, Iterable, Sequence, Union

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PatternKind:
    """One name of the spec language: what builds it, its arguments, and its lines of the help text.

    params: argument names in order, the first `required` of them mandatory; `choices` names the word-valued
    ones (the rest are integer sizes) and their valid words; `forms`: (form, meaning) lines of `valid_forms()`.
    """

    name: str
    build: Callable
    params: tuple[str, ...]
    required: int
    forms: tuple[tuple[str, str], ...]
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def arities(self) -> tuple[int, ...]:
        return tuple(range(self.required, len(self.params) + 1))


# name -> kind, in the order of the help text; filled by `pattern_kind` next to each class.
PATTERN_KINDS: dict[str, PatternKind] = {}


def pattern_kind(name: str, params: tuple[str, ...], forms: tuple[tuple[str, str], ...], *,
                 required: int | None = None, choices: tuple[tuple[str, tuple[str, ...]], ...] = ()):
    """Registers the decorated class or function as the spec name `name` (a new pattern kind is a class plus
    this decorator)."""

    def register(build):
        count = len(params) if required is None else required
        PATTERN_KINDS[name] = PatternKind(name, build, params, count, forms, choices)
        return build

    return register


def _xp(*arrays):
    """NumPy for NumPy inputs, torch for torch tensors (FlexAttention mask_mods, `torch_arrays`), jax.numpy
    otherwise (traced arrays, inside kernels too)."""
    if all(isinstance(a, (np.ndarray, np.generic, int)) for a in arrays):
        return np
    if any(type(a).__module__.startswith("torch") for a in arrays):
        from sparse_attention import torch_arrays

        return torch_arrays
    import jax.numpy as jnp

    return jnp


@dataclasses.dataclass(frozen=True)
class KeyExtent:
    """Every key k that query q sees has k < first (a global prefix) or q - k < recent; recent None: no bound."""

    first: int
    recent: int | None

    def size(self) -> int | None:
        """Keys a decoding cache holds for this extent; None when unbounded."""
        return None if self.recent is None else self.first + self.recent


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tiling of a [seq_len, seq_len] attention matrix into [block_q, block_k] tiles.

    A tile overhanging the sequence end holds padding. Such a tile is never `FULL` when the overhang is on
    the key side, so kernels always mask padded keys; padded query rows are discarded by the kernels.
    """

    seq_len: int
    block_q: int
    block_k: int

    def __post_init__(self):
        for field in ("seq_len", "block_q", "block_k"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")

    @property
    def num_q_tiles(self) -> int:
        return -(-self.seq_len // self.block_q)

    @property
    def num_k_tiles(self) -> int:
        return -(-self.seq_len // self.block_k)

    @property
    def position_dtype(self):
        """int32 while positions and their differences fit (halves the memory traffic of big layouts)."""
        return np.int32 if self.seq_len + max(self.block_q, self.block_k) < 2**30 else np.int64

    def q_bounds(self, q_tiles):
        """First and last valid query row of each tile (inclusive), clipped to the sequence."""
        q0 = q_tiles.astype(self.position_dtype) * self.block_q
        return q0, np.minimum(q0 + (self.block_q - 1), self.seq_len - 1)

    def k_bounds(self, k_tiles):
        """First and last key of each tile (inclusive, unclipped) and whether the tile overhangs S."""
        k0 = k_tiles.astype(self.position_dtype) * self.block_k
        k1 = k0 + (self.block_k - 1)
        return k0, np.minimum(k1, self.seq_len - 1), k1 >= self.seq_len


def _ranges_to_tiles(grid: TileGrid, first_k, last_k) -> tuple[np.ndarray, np.ndarray]:
    """All (q_tile, k_tile) with first_k[q] <= k_tile <= last_k[q], ordered by q tile then k tile."""
    first_k = np.clip(first_k, 0, grid.num_k_tiles - 1)
    last_k = np.minimum(last_k, grid.num_k_tiles - 1)
    counts = np.maximum(last_k - first_k + 1, 0).astype(np.int64)
    total = int(counts.sum())
    index_dtype = np.int32 if total < 2**31 else np.int64
    q_tiles = np.repeat(np.arange(grid.num_q_tiles, dtype=np.int32), counts)
    row_start = np.cumsum(counts) - counts
    # k_tile = position in the flat list - (row start - first tile of the row)
    k_tiles = np.arange(total, dtype=index_dtype)
    k_tiles -= np.repeat((row_start - first_k).astype(index_dtype), counts)
    return q_tiles, k_tiles.astype(np.int32, copy=False)


def brute_force_classes(pattern: "Pattern", grid: TileGrid, q_tiles, k_tiles) -> np.ndarray:
    """Exact tile classes by evaluating `mask` on every pair of each tile; used for ambiguous tiles."""
    classes = np.empty(len(q_tiles), np.int8)
    chunk = max(1, (1 << 22) // (grid.block_q * grid.block_k))
    offs_q = np.arange(grid.block_q, dtype=np.int64)[None, :, None]
    offs_k = np.arange(grid.block_k, dtype=np.int64)[None, None, :]
    for start in range(0, len(q_tiles), chunk):
        qt = np.asarray(q_tiles[start : start + chunk], np.int64)[:, None, None]
        kt = np.asarray(k_tiles[start : start + chunk], np.int64)[:, None, None]
        q = qt * grid.block_q + offs_q
        k = kt * grid.block_k + offs_k
        valid = (q < grid.seq_len) & (k < grid.seq_len)
        active = pattern.mask(q, k) & valid
        n_active = active.sum(axis=(1, 2))
        # Full needs every valid query row complete and no padded key in the tile.
        n_needed = (q < grid.seq_len).sum(axis=(1, 2)) * grid.block_k
        classes[start : start + chunk] = np.where(
            n_active == 0, EMPTY, np.where(n_active == n_needed, FULL, PARTIAL)
        )
    return classes


class Pattern(abc.ABC):
    """A causal attention pattern. Subclasses are frozen dataclasses, so patterns are hashable."""

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """Canonical spec string; `parse(p.spec) == p`."""

    @abc.abstractmethod
    def mask(self, q, k):
        """Whether query position q sees key position k (causality included). Broadcasts q against k."""

    @abc.abstractmethod
    def candidate_tiles(self, grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
        """A superset of the non-empty tiles as (q_tiles, k_tiles), sorted by q tile then k tile."""

    def classify_tiles(self, grid: TileGrid, q_tiles, k_tiles) -> np.ndarray:
        """Exact EMPTY / PARTIAL / FULL class of each tile. Subclasses override with closed forms."""
        return brute_force_classes(self, grid, q_tiles, k_tiles)

    def block_grid(self) -> tuple[int, int] | None:
        """(size, offset) of the block edges this pattern is built on: position p starts a block when
        (p + offset) % size == 0. None for patterns without blocks. Evaluation measures loss by offset
        within these blocks."""
        return None

    def tile_ranges(self, grid: TileGrid):
        """Row-contiguous layouts: (first, last, full_first, full_last), int64 [num_q_tiles] each.

        Query tile i attends exactly key tiles first[i]..last[i], of which full_first[i]..full_last[i] are
        FULL (none when full_first > full_last); all four are nondecreasing in i. None when the pattern has
        no such structure, and the layout falls back to candidate tiles + `classify_tiles`.
        """
        return None

    def row_interval(self):
        """For interval patterns: (lo, cap) with keys of q (plus q itself) = [0, min(cap, q)] U [lo(q), q].

        `lo` maps an int64 array of queries to a nondecreasing int64 array; `cap` is -1 when there is no
        global prefix. None when the pattern has no such structure.
        """
        return None

    def offsets(self, seq_len: int):
        """For translation-invariant patterns: bool[seq_len], True at every d = q - k that is attended.

        None when the pattern is not a function of q - k alone.
        """
        return None

    def key_extent(self) -> KeyExtent:
        """Which past keys a query can still see (the bound of a decoding cache). The default, the whole past,
        is right for every pattern; kinds with a bounded reach override it."""
        return KeyExtent(first=0, recent=None)

    def block_selection(self) -> "TopK | None":
        """The part of the pattern chosen by content on the device (`topk`), or None for a static pattern.
        `mask` is then the static part alone: what the pattern guarantees whatever is chosen."""
        return None

    def count_active(self, seq_len: int) -> int:
        """Exact number of attended (q, k) pairs in a sequence of `seq_len`."""
        offs = self.offsets(seq_len)
        if offs is not None:
            return int((seq_len - np.flatnonzero(offs)).sum())
        tile = min(128, seq_len)
        grid = TileGrid(seq_len, tile, tile)
        q_tiles, k_tiles = self.candidate_tiles(grid)
        classes = self.classify_tiles(grid, q_tiles, k_tiles)
        full_rows = np.minimum(q_tiles[classes == FULL].astype(np.int64) * tile + tile, seq_len)
        total = int((full_rows - q_tiles[classes == FULL].astype(np.int64) * tile).sum()) * tile
        partial = np.flatnonzero(classes == PARTIAL)
        offs_q = np.arange(tile)[None, :, None]
        offs_k = np.arange(tile)[None, None, :]
        for start in range(0, len(partial), 256):
            chosen = partial[start : start + 256]
            q = q_tiles[chosen].astype(np.int64)[:, None, None] * tile + offs_q
            k = k_tiles[chosen].astype(np.int64)[:, None, None] * tile + offs_k
            total += int((self.mask(q, k) & (q < seq_len) & (k < seq_len)).sum())
        return total

    # Schedules treat a plain pattern as a schedule of one.
    @property
    def period(self) -> int:
        return 1

    def layer(self, index: int) -> "Pattern":
        return self

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union_.of([self, other])

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection.of([self, other])

    def __str__(self) -> str:
        return self.spec


def _check_positive(name: str, spec: str, **sizes: int):
    for field, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: {field} must be a positive integer, got {value!r} in {spec!r}\n{valid_forms()}")


class _IntervalPattern(Pattern):
    """Keys of query q are [max(lo(q), 0), min(q, cap)] with lo nondecreasing: closed-form tiles."""

    cap: int = -1  # -1: no cap (hi(q) = q)

    @abc.abstractmethod
    def lo(self, q):
        """First key of query q (may be negative; nondecreasing in q)."""

    def _hi(self, q):
        return q if self.cap < 0 else _xp(q).minimum(q, self.cap)

    def mask(self, q, k):
        return (k >= self.lo(q)) & (k <= self._hi(q))

    def candidate_tiles(self, grid):
        q0, q1 = grid.q_bounds(np.arange(grid.num_q_tiles))
        first = np.maximum(self.lo(q0), 0) // grid.block_k
        last = self._hi(q1) // grid.block_k
        return _ranges_to_tiles(grid, first, last)

    def tile_ranges(self, grid):
        # Rows' key intervals overlap or touch from one query to the next (lo(q + 1) <= hi(q) + 1), so every
        # tile between the first and last one touched is non-empty.
        q0, q1 = grid.q_bounds(np.arange(grid.num_q_tiles))
        q0, q1 = q0.astype(np.int64), q1.astype(np.int64)
        first = np.maximum(self.lo(q0), 0) // grid.block_k
        last = self._hi(q1) // grid.block_k
        full_first = -(-np.maximum(self.lo(q1), 0) // grid.block_k)
        full_last = np.minimum(self._hi(q0) + 1, grid.seq_len) // grid.block_k - 1
        return first, last, full_first, full_last

    def classify_tiles(self, grid, q_tiles, k_tiles):
        q0, q1 = grid.q_bounds(q_tiles)
        k0, k1c, overhang = grid.k_bounds(k_tiles)
        first_row = np.maximum(q0, k0)  # rows before k0 end before the tile (hi(q) <= q)
        nonempty = (first_row <= q1) & (self.lo(first_row) <= k1c)
        if self.cap >= 0:
            nonempty &= k0 <= self.cap
        full = (self.lo(q1) <= k0) & (self._hi(q0) >= k1c) & ~overhang
        return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)

    def row_interval(self):
        if self.cap >= 0:
            return (lambda q: q), self.cap
        return self.lo, -1


@pattern_kind("dense", (), (("dense", "all k <= q"),))
@dataclasses.dataclass(frozen=True)
class Dense(_IntervalPattern):
    @property
    def spec(self):
        return "dense"

    def lo(self, q):
        return q * 0

    def offsets(self, seq_len):
        return np.ones(seq_len, bool)


@pattern_kind("block", ("B", "offset"), (
    ("block(B[, offset])", "k // B == q // B (offset shifts block edges: (q+offset)//B == (k+offset)//B)"),),
    required=1)
@dataclasses.dataclass(frozen=True)
class Block(_IntervalPattern):
    """Fixed-block local attention; `offset` moves every block edge left by `offset` positions."""

    size: int
    offset: int = 0

    def __post_init__(self):
        _check_positive("block", self.spec, B=self.size)
        if not 0 <= self.offset < self.size:
            raise ValueError(f"block: offset must be in [0, B), got {self.offset} in {self.spec!r}\n{valid_forms()}")

    @property
    def spec(self):
        return f"block({self.size})" if self.offset == 0 else f"block({self.size}, {self.offset})"

    def lo(self, q):
        return ((q + self.offset) // self.size) * self.size - self.offset

    def block_grid(self):
        return self.size, self.offset

    def key_extent(self):
        return KeyExtent(first=0, recent=self.size)


@pattern_kind("window", ("W",), (("window(W)", "q - k < W"),))
@dataclasses.dataclass(frozen=True)
class Window(_IntervalPattern):
    size: int

    def __post_init__(self):
        _check_positive("window", self.spec, W=self.size)

    @property
    def spec(self):
        return f"window({self.size})"

    def lo(self, q):
        return q - (self.size - 1)

    def offsets(self, seq_len):
        return np.arange(seq_len) < self.size

    def key_extent(self):
        return KeyExtent(first=0, recent=self.size)


REPAIR_MODES = ("bridge", "prefix")


@pattern_kind("repaired", ("B", "R", "mode"), (
    ("repaired(B, R, bridge)", "block(B) or q - k <= R   (R <= B)"),
    ("repaired(B, R, prefix)", "block(B) or the last R keys of the previous block   (R <= B)")),
    choices=(("mode", REPAIR_MODES),))
@dataclasses.dataclass(frozen=True)
class Repaired(_IntervalPattern):
    """block(B) plus edges across block boundaries.

    bridge: each query also sees the R keys just before it (q - k <= R), so the edge that block(B) cuts
            between the last token of a block and the first of the next is restored for every query.
    prefix: every query of a block also sees the last R keys of the previous block.
    """

    size: int
    repair: int
    mode: str

    def __post_init__(self):
        _check_positive("repaired", self.spec, B=self.size, R=self.repair)
        if self.repair > self.size:
            raise ValueError(f"repaired: R={self.repair} must be <= B={self.size} in {self.spec!r}\n{valid_forms()}")
        if self.mode not in REPAIR_MODES:
            raise ValueError(
                f"repaired: mode must be one of {', '.join(REPAIR_MODES)}, got {self.mode!r}\n{valid_forms()}"
            )

    @property
    def spec(self):
        return f"repaired({self.size}, {self.repair}, {self.mode})"

    def lo(self, q):
        block_start = (q // self.size) * self.size
        if self.mode == "bridge":
            return _xp(q).minimum(block_start, q - self.repair)
        # Queries of the first block have no previous block to see.
        return block_start - self.repair * (block_start > 0)

    def block_grid(self):
        return self.size, 0

    def key_extent(self):
        # bridge: the block or the R keys before q; prefix: back to R keys before the block's start.
        recent = max(self.size, self.repair + 1) if self.mode == "bridge" else self.size + self.repair
        return KeyExtent(first=0, recent=recent)


@pattern_kind("sinks", ("N",), (("sinks(N)", "k < N"),))
@dataclasses.dataclass(frozen=True)
class Sinks(_IntervalPattern):
    """Global first tokens: every query sees keys [0, N)."""

    count: int

    def __post_init__(self):
        _check_positive("sinks", self.spec, N=self.count)

    @property
    def cap(self):
        return self.count - 1

    @property
    def spec(self):
        return f"sinks({self.count})"

    def lo(self, q):
        return q * 0

    def key_extent(self):
        return KeyExtent(first=self.count, recent=1)


@pattern_kind("topk", ("B", "K"), (
    ("topk(B, K)", "block(B) plus the K earlier key blocks that score highest, chosen on the device"),))
@dataclasses.dataclass(frozen=True)
class TopK(_IntervalPattern):
    """Learned block selection (MoBA style): each query block of B attends its own block causally, plus the K
    earlier key blocks whose mean-pooled keys score highest against its mean-pooled queries, chosen per KV
    head on the device at every call (`sparse_attention.selection`). `mask` is the static part, block(B): the
    guaranteed reach. Combines with static kinds by `|` only."""

    size: int
    count: int

    def __post_init__(self):
        _check_positive("topk", self.spec, B=self.size, K=self.count)

    @property
    def spec(self):
        return f"topk({self.size}, {self.count})"

    def lo(self, q):
        return (q // self.size) * self.size

    def block_grid(self):
        return self.size, 0

    def block_selection(self):
        return self


@dataclasses.dataclass(frozen=True)
class _DifferencePattern(Pattern):
    """Patterns of d = q - k alone: d % stride == 0 and d < limit (limit 0: unbounded)."""

    def _stride_limit(self) -> tuple[int, int]:
        raise NotImplementedError

    def mask(self, q, k):
        stride, limit = self._stride_limit()
        d = q - k
        active = (d >= 0) & (d % stride == 0)
        return active & (d < limit) if limit else active

    def candidate_tiles(self, grid):
        _, limit = self._stride_limit()
        q0, q1 = grid.q_bounds(np.arange(grid.num_q_tiles))
        first = np.maximum(q0 - limit + 1, 0) // grid.block_k if limit else np.zeros_like(q0)
        return _ranges_to_tiles(grid, first, q1 // grid.block_k)

    def classify_tiles(self, grid, q_tiles, k_tiles):
        stride, limit = self._stride_limit()
        q0, q1 = grid.q_bounds(q_tiles)
        k0, k1c, overhang = grid.k_bounds(k_tiles)
        # A rectangle of pairs holds every difference in [q0 - k1, q1 - k0].
        d_lo, d_hi = q0 - k1c, q1 - k0
        if limit:
            d_hi_active = np.minimum(d_hi, limit - 1)
        else:
            d_hi_active = d_hi
        first_multiple = -(-np.maximum(d_lo, 0) // stride) * stride
        nonempty = first_multiple <= d_hi_active
        all_diffs_ok = (d_lo >= 0) & ((stride == 1) | (d_lo == d_hi)) & (d_lo % stride == 0)
        if limit:
            all_diffs_ok &= d_hi < limit
        full = all_diffs_ok & ~overhang
        return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)

    def offsets(self, seq_len):
        stride, limit = self._stride_limit()
        d = np.arange(seq_len)
        active = d % stride == 0
        return active & (d < limit) if limit else active

    def key_extent(self):
        _, limit = self._stride_limit()
        return KeyExtent(first=0, recent=limit or None)


@pattern_kind("strided", ("S",), (("strided(S)", "(q - k) % S == 0"),))
@dataclasses.dataclass(frozen=True)
class Strided(_DifferencePattern):
    stride: int

    def __post_init__(self):
        _check_positive("strided", self.spec, S=self.stride)

    @property
    def spec(self):
        return f"strided({self.stride})"

    def _stride_limit(self):
        return self.stride, 0


@pattern_kind("dilated", ("W", "D"), (("dilated(W, D)", "(q - k) % D == 0 and q - k < W * D"),))
@dataclasses.dataclass(frozen=True)
class Dilated(_DifferencePattern):
    width: int
    dilation: int

    def __post_init__(self):
        _check_positive("dilated", self.spec, W=self.width, D=self.dilation)

    @property
    def spec(self):
        return f"dilated({self.width}, {self.dilation})"

    def _stride_limit(self):
        return self.dilation, self.width * self.dilation


# Strides used to walk the earlier blocks of random_blocks: primes larger than any supported block count,
# so (start + j * prime) % n visits n distinct blocks for j < n. Arithmetic keeps the choice computable
# in-kernel from (seed, block) alone, with no table in memory.
_RANDOM_STRIDE_PRIMES = (1_000_003, 1_000_033, 1_000_037, 1_000_039)
MAX_RANDOM_BLOCKS = _RANDOM_STRIDE_PRIMES[0]
MAX_RANDOM_K = 1024


def _hash32(x):
    """A 32-bit integer mixer with identical results on NumPy, jnp and in kernels (int32 wrap-around)."""
    if isinstance(x, np.generic):  # NumPy warns on scalar overflow, which is the point here
        x = np.asarray(x).reshape(1)
        return _hash32(x)[0]
    x = x * 0x2C1B3C6D
    x = x ^ ((x >> 12) & 0xFFFFF)
    x = x * 0x297A2D39
    x = x ^ ((x >> 15) & 0x1FFFF)
    return x & 0x7FFFFFFF


@pattern_kind("random_blocks", ("B", "K", "seed"), (
    ("random_blocks(B, K, seed)", "block(B) plus K earlier key blocks per query block, seeded and static"),))
@dataclasses.dataclass(frozen=True)
class RandomBlocks(Pattern):
    """BigBird-style: block(B), plus K earlier key blocks per query block, chosen at random.

    The choice is static and seeded: query block b >= 1 sees earlier blocks (start + j * prime) % b for
    j < min(K, b), with start and prime drawn from a hash of (seed, b). These are min(K, b) distinct blocks.
    """

    size: int
    count: int
    seed: int

    def __post_init__(self):
        _check_positive("random_blocks", self.spec, B=self.size, K=self.count)
        if self.count > MAX_RANDOM_K:
            raise ValueError(f"random_blocks: K must be <= {MAX_RANDOM_K}, got {self.count}\n{valid_forms()}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"random_blocks: seed must be in [0, 2**31), got {self.seed}\n{valid_forms()}")

    @property
    def spec(self):
        return f"random_blocks({self.size}, {self.count}, {self.seed})"

    def _walk(self, q_block):
        """(start, stride) of the walk over earlier blocks, for int32 arrays of query blocks."""
        xp = _xp(q_block)

        def int32(x):
            return xp.asarray(x, dtype=xp.int32)

        q_block = int32(q_block)
        earlier = xp.maximum(q_block, 1)
        mixed = _hash32(_hash32(q_block + int32(0x3C6EF372 % 2**31)) ^ int32(self.seed))
        start = mixed % earlier
        choice = (mixed >> 8) % len(_RANDOM_STRIDE_PRIMES)
        prime = int32(_RANDOM_STRIDE_PRIMES[0])
        for index, candidate in enumerate(_RANDOM_STRIDE_PRIMES[1:], start=1):
            prime = xp.where(choice == index, int32(candidate), prime)
        return start, prime % earlier

    def block_grid(self):
        return self.size, 0

    def picked_blocks(self, q_blocks: np.ndarray) -> np.ndarray:
        """[n, K] earlier key blocks seen by each query block; -1 where fewer than K exist."""
        q_blocks = np.asarray(q_blocks, np.int64)
        start, stride = self._walk(q_blocks.astype(np.int32))
        j = np.arange(self.count, dtype=np.int64)[None, :]
        earlier = np.maximum(q_blocks, 1)[:, None]
        picks = (start.astype(np.int64)[:, None] + j * stride.astype(np.int64)[:, None]) % earlier
        return np.where(j < q_blocks[:, None], picks, -1)

    def mask(self, q, k):
        xp = _xp(q, k)
        q_block, k_block = q // self.size, k // self.size
        start, stride = self._walk(q_block)
        earlier = xp.maximum(q_block, 1)
        # (start + j * stride) % earlier for j < K, stepped by a conditional subtraction (both terms are
        # below `earlier`), which every kernel backend lowers cheaply.
        picked = k_block < 0
        position = start
        for j in range(self.count):
            picked = picked | ((k_block == position) & (j < q_block))
            position = position + stride
            position = xp.where(position >= earlier, position - earlier, position)
        return (k <= q) & ((q_block == k_block) | picked)

    def _check_grid(self, grid: TileGrid):
        if grid.seq_len // self.size >= MAX_RANDOM_BLOCKS:
            raise ValueError(
                f"random_blocks: seq_len / B must be < {MAX_RANDOM_BLOCKS}, got {grid.seq_len} / {self.size}"
            )

    def candidate_tiles(self, grid):
        self._check_grid(grid)
        num_blocks = -(-grid.seq_len // self.size)
        q_blocks = np.arange(num_blocks, dtype=np.int64)
        picks = self.picked_blocks(q_blocks)
        pair_q = np.concatenate([q_blocks, np.repeat(q_blocks, self.count)])
        pair_k = np.concatenate([q_blocks, picks.reshape(-1)])
        keep = pair_k >= 0
        pair_q, pair_k = pair_q[keep], pair_k[keep]
        # Every tile touched by a (query block, key block) pair.
        qt_first = pair_q * self.size // grid.block_q
        qt_last = np.minimum((pair_q + 1) * self.size - 1, grid.seq_len - 1) // grid.block_q
        kt_first = pair_k * self.size // grid.block_k
        kt_last = np.minimum((pair_k + 1) * self.size - 1, grid.seq_len - 1) // grid.block_k
        keys = []
        for dq in range(int((qt_last - qt_first).max()) + 1):
            for dk in range(int((kt_last - kt_first).max()) + 1):
                ok = (qt_first + dq <= qt_last) & (kt_first + dk <= kt_last)
                keys.append((qt_first[ok] + dq) * grid.num_k_tiles + kt_first[ok] + dk)
        keys = np.unique(np.concatenate(keys))
        return (keys // grid.num_k_tiles).astype(np.int32), (keys % grid.num_k_tiles).astype(np.int32)

    def classify_tiles(self, grid, q_tiles, k_tiles):
        self._check_grid(grid)
        if self.size % grid.block_q or self.size % grid.block_k:
            return brute_force_classes(self, grid, q_tiles, k_tiles)
        # Aligned tiles lie inside one (query block, key block) pair.
        q0, q1 = grid.q_bounds(q_tiles)
        k0, k1c, overhang = grid.k_bounds(k_tiles)
        q_block, k_block = q0 // self.size, k0 // self.size
        picks = self.picked_blocks(q_block)
        picked = (picks == k_block[:, None]).any(axis=1)
        own = q_block == k_block
        own_nonempty = q1 >= k0
        own_full = (q0 >= k1c) & ~overhang
        classes = np.where(own, np.where(own_full, FULL, np.where(own_nonempty, PARTIAL, EMPTY)), EMPTY)
        return np.where(picked & ~own, FULL, classes).astype(np.int8)


class _Composite(Pattern):
    parts: tuple[Pattern, ...]

    @classmethod
    def of(cls, parts: Iterable[Pattern]) -> Pattern:
        flat: list[Pattern] = []
        for part in parts:
            if isinstance(part, Schedule):
                raise ValueError(f"cannot combine the schedule {part.spec!r} with | or &; combine per layer")
            flat.extend(part.parts if isinstance(part, cls) else [part])
        unique = tuple(dict.fromkeys(flat))
        selections = [part for part in unique if part.block_selection() is not None]
        if selections and cls is Intersection:
            raise ValueError(f"{selections[0].spec} combines with other patterns by | only\n{valid_forms()}")
        if len(selections) > 1:
            raise ValueError(f"at most one topk per pattern, got {', '.join(p.spec for p in selections)}\n"
                             f"{valid_forms()}")
        return unique[0] if len(unique) == 1 else cls(unique)

    def _part_spec(self, part: Pattern) -> str:
        return f"({part.spec})" if isinstance(part, _Composite) else part.spec

    def block_grid(self):
        """The grid of the first blocky part, breadth first: direct parts before nested ones."""
        pending = list(self.parts)
        while pending:
            part = pending.pop(0)
            if isinstance(part, _Composite):
                pending.extend(part.parts)
            elif (grid := part.block_grid()) is not None:
                return grid
        return None

    def _combine_classes(self, grid, q_tiles, k_tiles, dominant: int, neutral: int) -> np.ndarray:
        """Union: dominant FULL, neutral EMPTY; intersection: dominant EMPTY, neutral FULL.

        One PARTIAL part among neutral ones leaves the tile PARTIAL; two or more are resolved exactly.
        """
        classes = np.stack([part.classify_tiles(grid, q_tiles, k_tiles) for part in self.parts])
        any_dominant = (classes == dominant).any(axis=0)
        n_partial = (classes == PARTIAL).sum(axis=0)
        result = np.where(any_dominant, dominant, np.where(n_partial == 0, neutral, PARTIAL)).astype(np.int8)
        ambiguous = ~any_dominant & (n_partial >= 2)
        if ambiguous.any():
            result[ambiguous] = brute_force_classes(self, grid, q_tiles[ambiguous], k_tiles[ambiguous])
        return result


def _merge_tiles(grid, tile_sets, combine) -> tuple[np.ndarray, np.ndarray]:
    keys = [qt.astype(np.int64) * grid.num_k_tiles + kt for qt, kt in tile_sets]
    merged = functools.reduce(combine, keys)
    return (merged // grid.num_k_tiles).astype(np.int32), (merged % grid.num_k_tiles).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Union_(_Composite):
    parts: tuple[Pattern, ...]

    @property
    def spec(self):
        return " | ".join(self._part_spec(p) if isinstance(p, Intersection) else p.spec for p in self.parts)

    def mask(self, q, k):
        return functools.reduce(lambda a, b: a | b, (p.mask(q, k) for p in self.parts))

    def candidate_tiles(self, grid):
        return _merge_tiles(grid, [p.candidate_tiles(grid) for p in self.parts], np.union1d)

    def classify_tiles(self, grid, q_tiles, k_tiles):
        return self._combine_classes(grid, q_tiles, k_tiles, dominant=FULL, neutral=EMPTY)

    def row_interval(self):
        intervals = [p.row_interval() for p in self.parts]
        if any(i is None for i in intervals):
            return None
        los = [lo for lo, _ in intervals]
        return (lambda q: functools.reduce(np.minimum, [lo(q) for lo in los])), max(c for _, c in intervals)

    def offsets(self, seq_len):
        offs = [p.offsets(seq_len) for p in self.parts]
        return None if any(o is None for o in offs) else functools.reduce(np.logical_or, offs)

    def block_selection(self):
        return next((p.block_selection() for p in self.parts if p.block_selection() is not None), None)

    def key_extent(self):
        extents = [p.key_extent() for p in self.parts]
        recent = None if any(e.recent is None for e in extents) else max(e.recent for e in extents)
        return KeyExtent(first=max(e.first for e in extents), recent=recent)


@dataclasses.dataclass(frozen=True)
class Intersection(_Composite):
    parts: tuple[Pattern, ...]

    @property
    def spec(self):
        return " & ".join(self._part_spec(p) for p in self.parts)

    def mask(self, q, k):
        return functools.reduce(lambda a, b: a & b, (p.mask(q, k) for p in self.parts))

    def candidate_tiles(self, grid):
        return _merge_tiles(grid, [p.candidate_tiles(grid) for p in self.parts], np.intersect1d)

    def classify_tiles(self, grid, q_tiles, k_tiles):
        return self._combine_classes(grid, q_tiles, k_tiles, dominant=EMPTY, neutral=FULL)

    def row_interval(self):
        # [lo1, q] & [lo2, q] = [max lo, q]; prefixes would leave cross terms, so they take the general path.
        intervals = [p.row_interval() for p in self.parts]
        if any(i is None or i[1] >= 0 for i in intervals):
            return None
        los = [lo for lo, _ in intervals]
        return (lambda q: functools.reduce(np.maximum, [lo(q) for lo in los])), -1

    def offsets(self, seq_len):
        offs = [p.offsets(seq_len) for p in self.parts]
        return None if any(o is None for o in offs) else functools.reduce(np.logical_and, offs)

    def key_extent(self):
        # The keys are among every part's, so the tightest part's extent bounds them.
        bounded = [e for e in (p.key_extent() for p in self.parts) if e.recent is not None]
        return min(bounded, key=KeyExtent.size) if bounded else KeyExtent(first=0, recent=None)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-layer patterns, cycled: layer l uses patterns[l % len(patterns)]."""

    patterns: tuple[Pattern, ...]
    name: str | None = None  # a named schedule's spec, e.g. "shifted(512)"

    def __post_init__(self):
        if not self.patterns:
            raise ValueError(f"a schedule needs at least one pattern\n{valid_forms()}")
        for p in self.patterns:
            if not isinstance(p, Pattern):
                raise ValueError(f"schedule entries must be patterns, got {p!r}\n{valid_forms()}")

    @property
    def spec(self) -> str:
        return self.name or f"schedule({', '.join(p.spec for p in self.patterns)})"

    @property
    def period(self) -> int:
        return len(self.patterns)

    def layer(self, index: int) -> Pattern:
        return self.patterns[index % len(self.patterns)]

    def __str__(self) -> str:
        return self.spec


@pattern_kind("shifted", ("B",), (("shifted(B)", "schedule: even layers block(B), odd layers block(B, B//2)"),))
def shifted(size: int) -> Schedule:
    _check_positive("shifted", f"shifted({size})", B=size)
    return Schedule((Block(size), Block(size, size // 2)), name=f"shifted({size})")


PatternOrSchedule = Union[Pattern, Schedule]

_COMBINATION_FORMS = (("P | Q, P & Q, (P)", "union and intersection"),
                      ("schedule(P1, P2, ...)", "per-layer schedule, cycled over layers"))


def valid_forms() -> str:
    """The help text of the spec language, from the registry (so a kind registered later is in it too)."""
    lines = [form_line for kind in PATTERN_KINDS.values() for form_line in kind.forms] + list(_COMBINATION_FORMS)
    return "\n".join(["valid forms:", *(f"  {form:<28} {meaning}" for form, meaning in lines),
                      "sizes are positive integers; every pattern is also intersected with causality (k <= q)"])


# ----------------------------------------------------------------------------------------------- parsing

# ASCII only: "\d" and "\w" would also take digits of other scripts, which int() then reads.
_TOKEN = re.compile(r"\s*(?:(?P<int>-?[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[(),|&]))")
_NUMBER_LIKE = re.compile(r"-?[0-9][0-9A-Za-z_.+-]*")  # what a size written as 1e3 or 8.5 or 0x10 spans
MAX_SPEC_INT = 2**31 - 1  # sizes beyond it overflow the layouts' int32 positions
MAX_SPEC_NESTING = 32  # parentheses and schedules; deeper specs are surely not meant (and recurse)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        stripped = text.strip()
        while pos < len(stripped):
            match = _TOKEN.match(stripped, pos)
            if not match:
                self.fail(f"unexpected character {stripped[pos:].lstrip()[:1]!r}")
            kind = match.lastgroup
            if kind == "int":
                word = _NUMBER_LIKE.match(stripped, match.start(kind)).group()
                if word != match.group(kind):
                    self.fail(f"sizes must be plain integers, got {word!r}")
                if len(word.lstrip("-")) > len(str(MAX_SPEC_INT)) or abs(int(word)) > MAX_SPEC_INT:
                    self.fail(f"{word} is out of range: integers must be at most {MAX_SPEC_INT} in size")
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
        self.pos = 0
        self.depth = 0

    def fail(self, problem: str):
        raise ValueError(f"bad pattern spec {self.text!r}: {problem}\n{valid_forms()}")

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self, value=None):
        kind, text = self.peek()
        if kind is None or (value is not None and text != value):
            self.fail(f"expected {value!r}" if value else "unexpected end")
        self.pos += 1
        return kind, text

    def parse(self) -> PatternOrSchedule:
        if not self.tokens:
            self.fail("empty spec")
        result = self.union()
        if self.pos != len(self.tokens):
            self.fail(f"unexpected {self.peek()[1]!r}")
        return result

    def union(self):
        parts = [self.intersection()]
        while self.peek()[1] == "|":
            self.take("|")
            parts.append(self.intersection())
        return self._combine(Union_, parts)

    def intersection(self):
        parts = [self.atom()]
        while self.peek()[1] == "&":
            self.take("&")
            parts.append(self.atom())
        return self._combine(Intersection, parts)

    def _combine(self, cls, parts):
        if len(parts) > 1 and any(isinstance(p, Schedule) for p in parts):
            self.fail("a schedule cannot be combined with | or &")
        return parts[0] if len(parts) == 1 else cls.of(parts)

    def nested(self, parse_inner):
        self.depth += 1
        if self.depth > MAX_SPEC_NESTING:
            self.fail(f"nested more than {MAX_SPEC_NESTING} levels deep")
        inner = parse_inner()
        self.depth -= 1
        return inner

    def atom(self):
        kind, text = self.peek()
        if text == "(":
            self.take("(")
            inner = self.nested(self.union)
            self.take(")")
            return inner
        if kind != "name":
            self.fail(f"expected a pattern name, got {text!r}" if text else "unexpected end")
        self.take()
        name = text
        args: list = []
        if self.peek()[1] == "(":
            self.take("(")
            if name == "schedule":
                args.append(self.nested(self.union))
                while self.peek()[1] == ",":
                    self.take(",")
                    args.append(self.nested(self.union))
            elif self.peek()[1] != ")":
                args.append(self.argument())
                while self.peek()[1] == ",":
                    self.take(",")
                    args.append(self.argument())
            self.take(")")
        return self.build(name, args)

    def argument(self):
        kind, text = self.take()
        if kind == "int":
            return int(text)
        if kind == "name":
            return text
        self.fail(f"unexpected {text!r} in arguments")

    def build(self, name: str, args: list) -> PatternOrSchedule:
        if name == "schedule":
            if not args:
                self.fail("schedule(...) needs at least one pattern")
            return Schedule(tuple(args))
        kind = PATTERN_KINDS.get(name)
        if kind is None:
            self.fail(f"unknown pattern {name!r}; known: {', '.join(sorted([*PATTERN_KINDS, 'schedule']))}")
        if len(args) not in kind.arities:
            self.fail(f"{name} takes {' or '.join(map(str, kind.arities))} arguments, got {len(args)}")
        choices = dict(kind.choices)
        for param, value in zip(kind.params, args):
            if param in choices and not isinstance(value, str):
                self.fail(f"{name}: {param} must be one of {', '.join(choices[param])}, got {value!r}")
            if param not in choices and not isinstance(value, int):
                self.fail(f"{name}: expected an integer size, got {value!r}")
        return kind.build(*args)


def parse(spec: str) -> PatternOrSchedule:
    """Pattern or schedule from a spec string, e.g. "repaired(512, 64, bridge)" or "window(64) | sinks(4)"."""
    if not isinstance(spec, str):
        raise ValueError(f"pattern spec must be a string, got {type(spec).__name__}\n{valid_forms()}")
    return _parse_cached(spec)


@functools.lru_cache(maxsize=512)
def _parse_cached(spec: str) -> PatternOrSchedule:
    return _Parser(spec).parse()


def as_schedule(value: PatternOrSchedule | str | Sequence[str]) -> PatternOrSchedule:
    """A pattern or schedule from a spec, a list of specs (one per layer, cycled), or an object."""
    if isinstance(value, (Pattern, Schedule)):
        return value
    if isinstance(value, str):
        return parse(value)
    specs = list(value)
    layers = [parse(s) if isinstance(s, str) else s for s in specs]
    if any(isinstance(layer, Schedule) for layer in layers):
        given = [s if isinstance(s, str) else s.spec for s in specs]
        raise ValueError(f"schedule entries must be single patterns, got {given!r}\n{valid_forms()}")
    return layers[0] if len(layers) == 1 else Schedule(tuple(layers))


def as_pattern(value: Pattern | str) -> Pattern:
    """A single-layer pattern from an object or spec; schedules are refused (pick a layer first)."""
    pattern = parse(value) if isinstance(value, str) else value
    if isinstance(pattern, Schedule):
        raise ValueError(
            f"{pattern.spec!r} is a per-layer schedule; attention takes one layer's pattern "
            f"(schedule.layer(index))"
        )
    if not isinstance(pattern, Pattern):
        raise ValueError(f"expected a Pattern or a spec string, got {type(value).__name__}\n{valid_forms()}")
    return pattern
