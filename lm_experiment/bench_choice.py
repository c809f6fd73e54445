"""The blocks a benchmarked `topk` case attends: one fixed choice that every implementation is given.

`selection.select_blocks` chooses by content; on the benchmark's random inputs its choice is as arbitrary as
a random one, and what the attention's time depends on is how many blocks each query block attends, which
both make min(K, i) for query block i. So the benchmark draws the choice here, in NumPy from a seed, and
hands the same indices to this package's kernels (`selected`) and to FlexAttention (its block mask). The
selection's own cost is timed on its own line (`bench`, impl "selection").
"""

from __future__ import annotations

import numpy as np

from sparse_attention.patterns import FULL, PARTIAL, Pattern, TileGrid

CHOICE_SEED = 0


def fixed_choice(pattern: Pattern, seq_len: int, batch: int, kv_heads: int,
                 seed: int = CHOICE_SEED) -> np.ndarray | None:
    """For a pattern with a topk part: int32 [batch, kv_heads, query blocks, K], min(K, i) distinct earlier
    blocks for query block i and -1 in the slots left over (`select_blocks`'s format); None otherwise."""
    topk = pattern.block_selection()
    if topk is None:
        return None
    blocks = -(-seq_len // topk.size)
    rng = np.random.default_rng(seed)
    chosen = np.full((batch, kv_heads, blocks, topk.count), -1, np.int32)
    for b, h, i in np.ndindex(batch, kv_heads, blocks):
        n = min(topk.count, i)
        chosen[b, h, i, :n] = rng.choice(i, n, replace=False)
    return chosen


def choice_mask(chosen: np.ndarray, size: int, seq_len: int) -> np.ndarray:
    """bool [seq, seq] of one (batch, kv head)'s choice, chosen int32 [query blocks, K]: q sees k through it."""
    positions = np.arange(seq_len)
    per_query = chosen[positions // size]  # [seq, K]
    return (per_query[:, :, None] == (positions // size)[None, None, :]).any(axis=1)


def attended_pairs(pattern: Pattern, seq_len: int, chosen: np.ndarray | None) -> float:
    """Attended (q, k) pairs per head: the static part's, plus the chosen blocks' pairs it does not already
    hold, averaged over the (batch, kv head) choices."""
    static = pattern.count_active(seq_len)
    if chosen is None:
        return float(static)
    size = pattern.block_selection().size
    grid = TileGrid(seq_len, size, size)
    q_tiles, k_tiles = pattern.candidate_tiles(grid)
    classes = pattern.classify_tiles(grid, q_tiles, k_tiles)
    touched = {(int(i), int(c)): int(kind) for i, c, kind in zip(q_tiles, k_tiles, classes) if kind in (FULL, PARTIAL)}
    lengths = np.minimum(size, seq_len - np.arange(grid.num_q_tiles) * size)  # real positions of each block
    overlap: dict[tuple[int, int], int] = {}

    def static_pairs(i: int, c: int) -> int:
        if (i, c) not in overlap:
            kind = touched.get((i, c))
            if kind is None:
                overlap[(i, c)] = 0
            elif kind == FULL:
                overlap[(i, c)] = int(lengths[i] * lengths[c])
            else:
                rows = np.arange(i * size, i * size + lengths[i])[:, None]
                keys = np.arange(c * size, c * size + lengths[c])[None, :]
                overlap[(i, c)] = int(np.broadcast_to(pattern.mask(rows, keys), (len(rows), keys.size)).sum())
        return overlap[(i, c)]

    added = 0
    for b, h, i in np.ndindex(chosen.shape[:3]):
        for c in chosen[b, h, i]:
            if c >= 0:
                added += int(lengths[i] * lengths[c]) - static_pairs(i, int(c))
    return static + added / (chosen.shape[0] * chosen.shape[1])
