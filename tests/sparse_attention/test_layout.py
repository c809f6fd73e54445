"""Block layouts against brute-force tile classes, caching, the 1M-token scale requirement, bad sizes."""

import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_patterns import KIND_IDS, KIND_TREES, PROPERTY_SETTINGS, brute_force_mask, pattern_trees, tree_spec

from sparse_attention import layout
from sparse_attention.layout import block_layout
from sparse_attention.patterns import EMPTY, FULL, PARTIAL, Window, parse


def brute_force_tile_classes(tree, seq_len: int, block_q: int, block_k: int) -> np.ndarray:
    """int8 [num_q_tiles, num_k_tiles] from the brute-force mask, padded past seq_len with inactive pairs."""
    num_q, num_k = -(-seq_len // block_q), -(-seq_len // block_k)
    mask = np.zeros((num_q * block_q, num_k * block_k), bool)
    mask[:seq_len, :seq_len] = brute_force_mask(tree, seq_len)
    active = mask.reshape(num_q, block_q, num_k, block_k).sum(axis=(1, 3))
    valid_rows = np.minimum(block_q, seq_len - np.arange(num_q) * block_q)
    overhangs = (np.arange(num_k) + 1) * block_k > seq_len
    # FULL: every (valid row, key) pair of the tile active and no padded key in the tile.
    full = (active == valid_rows[:, None] * block_k) & ~overhangs[None, :]
    return np.where(active == 0, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def listed_classes(tile_lists, num_rows: int, num_cols: int) -> np.ndarray:
    """Dense classes from CSR lists, checking offsets, sortedness and that no tile is listed twice."""
    classes = np.zeros((num_rows, num_cols), np.int8)
    assert tile_lists.num_rows == num_rows
    for offsets, indices, tile_class in (
        (tile_lists.full_offsets, tile_lists.full_indices, FULL),
        (tile_lists.partial_offsets, tile_lists.partial_indices, PARTIAL),
    ):
        assert offsets.shape == (num_rows + 1,) and offsets[0] == 0 and offsets[-1] == len(indices)
        assert (np.diff(offsets) >= 0).all()
        for r in range(num_rows):
            row = indices[offsets[r] : offsets[r + 1]]
            assert (np.diff(row) > 0).all(), f"row {r} not strictly ascending: {row}"
            assert ((row >= 0) & (row < num_cols)).all()
            assert (classes[r, row] == EMPTY).all(), f"row {r} lists a tile twice"
            classes[r, row] = tile_class
    return classes


def check_padded(tile_lists):
    full, num_full, partial, num_partial = tile_lists.padded
    for padded, counts, offsets, indices in (
        (full, num_full, tile_lists.full_offsets, tile_lists.full_indices),
        (partial, num_partial, tile_lists.partial_offsets, tile_lists.partial_indices),
    ):
        assert padded.dtype == np.int32 and counts.dtype == np.int32
        np.testing.assert_array_equal(counts, np.diff(offsets))
        assert padded.shape == (tile_lists.num_rows, max(int(counts.max(initial=0)), 1))
        for r in range(tile_lists.num_rows):
            row = indices[offsets[r] : offsets[r + 1]]
            np.testing.assert_array_equal(padded[r, : len(row)], row)
            # Padding repeats the last listed tile (0 for an empty row).
            assert (padded[r, len(row) :] == (row[-1] if len(row) else 0)).all()


def check_first_tiles_and_contiguity(tile_lists):
    for offsets, indices, first, contiguous in zip(
        (tile_lists.full_offsets, tile_lists.partial_offsets), (tile_lists.full_indices, tile_lists.partial_indices),
        tile_lists.first_tiles, tile_lists.contiguous,
    ):
        assert first.dtype == np.int32 and first.shape == (tile_lists.num_rows,)
        rows = [indices[offsets[r] : offsets[r + 1]] for r in range(tile_lists.num_rows)]
        np.testing.assert_array_equal(first, [row[0] if len(row) else 0 for row in rows])
        assert contiguous == all((np.diff(row) == 1).all() for row in rows)


def check_layout(tree, seq_len: int, block_q: int, block_k: int):
    result = block_layout(parse(tree_spec(tree)), seq_len, block_q, block_k)
    expected = brute_force_tile_classes(tree, seq_len, block_q, block_k)
    num_q, num_k = expected.shape
    assert (result.num_q_tiles, result.num_k_tiles) == (num_q, num_k)
    forward = listed_classes(result.forward, num_q, num_k)
    np.testing.assert_array_equal(forward, expected, err_msg=f"{tree_spec(tree)} S={seq_len} {block_q}x{block_k}")
    # The backward lists are exactly the transpose (rows: key tiles, listing query tiles ascending).
    np.testing.assert_array_equal(listed_classes(result.backward, num_k, num_q), expected.T)
    np.testing.assert_array_equal(result.dense_tile_classes(), expected)
    assert result.num_full_tiles == (expected == FULL).sum()
    assert result.num_partial_tiles == (expected == PARTIAL).sum()
    for tile_lists in (result.forward, result.backward):
        check_padded(tile_lists)
        check_first_tiles_and_contiguity(tile_lists)
    active_pairs = int(brute_force_mask(tree, seq_len).sum())
    assert result.active_pairs == active_pairs
    assert result.active_fraction == pytest.approx(active_pairs / (seq_len * (seq_len + 1) / 2))


@PROPERTY_SETTINGS
@given(
    tree=pattern_trees(),
    seq_len=st.integers(1, 200),
    block_q=st.integers(1, 64),
    block_k=st.integers(1, 64),
)
def test_layout_matches_brute_force_for_random_compositions(tree, seq_len, block_q, block_k):
    check_layout(tree, seq_len, block_q, block_k)


@pytest.mark.parametrize("tree", KIND_TREES, ids=KIND_IDS)
@pytest.mark.parametrize("seq_len, block_q, block_k", [(64, 8, 8), (61, 8, 16), (37, 16, 4), (100, 3, 7), (5, 64, 64)])
def test_layout_matches_brute_force_for_every_kind(tree, seq_len, block_q, block_k):
    check_layout(tree, seq_len, block_q, block_k)


@PROPERTY_SETTINGS
@given(
    tile=st.integers(1, 8),
    tiles_per_block=st.integers(1, 4),
    count=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    seq_len=st.integers(1, 200),
)
def test_random_blocks_layout_with_tiles_dividing_the_block(tile, tiles_per_block, count, seed, seq_len):
    """Tiles that divide B take random_blocks' closed form rather than brute force."""
    check_layout(("random_blocks", tile * tiles_per_block, count, seed), seq_len, tile, tile)


def test_equal_requests_return_the_cached_object():
    first = block_layout(parse("window(5) | sinks(2)"), 97, 16, 8)
    assert block_layout(parse("window(5) | sinks(2)"), 97, 16, 8) is first
    assert block_layout("window(5) | sinks(2)", 97, 16, 8) is first
    assert block_layout("window(5)|sinks(2)", 97, 16, 8) is first
    assert block_layout(Window(5) | parse("sinks(2)"), 97, 16, 8) is first
    assert block_layout("window(5) | sinks(2)", 97, 8, 16) is not first
    assert block_layout("window(5) | sinks(2)", 98, 16, 8) is not first
    assert block_layout("sinks(2) | window(5)", 97, 16, 8) is not first


# --------------------------------------------------------------------------------------------- scale

SEQ_1M = 1 << 20
TILE = 128
# (spec, full tiles, partial tiles, active pairs) at S = 2^20 with 128 x 128 tiles: 8192 tile rows.
SCALE_CASES = [
    # 2048 blocks of 4 x 4 tiles: 6 full below the diagonal, 4 partial on it. Pairs: 2048 * 512 * 513 / 2.
    ("block(512)", 2048 * 6, 2048 * 4, 2048 * 512 * 513 // 2),
    # Blocks [256 + 512 m, ...): 2047 whole blocks, plus half blocks [0, 256) and [S - 256, S) of 2 x 2 tiles
    # (1 full, 2 partial each).
    ("block(512, 256)", 2047 * 6 + 2, 2047 * 4 + 4, 2047 * 512 * 513 // 2 + 2 * 256 * 257 // 2),
    # Row i: full key tiles i-7 .. i-1, partial i (diagonal) and i-8 (q0 - k1 = 897 < 1024 <= q1 - k0 + ...);
    # i-9 is empty (q0 - k1 = 1025). Pairs: sum_q min(q + 1, 1024).
    ("window(1024)", 7 * 8192 - 28, 8192 + 8184, 1024 * SEQ_1M - 1023 * 1024 // 2),
    # block(512) plus, for the first tile of blocks 1..2047, a partial tile of the previous block's end;
    # extra pairs per block: queries t = 0..63 see 64 - t keys back.
    ("repaired(512, 64, bridge)", 2048 * 6, 2048 * 4 + 2047, 2048 * 512 * 513 // 2 + 2047 * 64 * 65 // 2),
    # block(512) plus, for all 4 query tiles of blocks 1..2047, the (partial) last key tile of the previous block.
    ("repaired(512, 64, prefix)", 2048 * 6, 2048 * 4 + 4 * 2047, 2048 * 512 * 513 // 2 + 2047 * 512 * 64),
    # window(1024) plus key tile 0 (partial) in rows 9.. where the window no longer reaches it;
    # extra pairs: q = 1024, 1025, 1026 gain 1, 2, 3 sinks, every later query 4.
    ("sinks(4) | window(1024)", 7 * 8192 - 28, 8192 + 8184 + 8192 - 9,
     1024 * SEQ_1M - 1023 * 1024 // 2 + 6 + 4 * (SEQ_1M - 1027)),
    # d in {0, 16, ..., 1008}: key tiles i-8 .. i, never full (stride 16). Pairs: sum over d of S - d.
    ("dilated(64, 16)", 0, 9 * 8192 - 36, 64 * SEQ_1M - 16 * (63 * 64 // 2)),
    # block(512) plus min(3, qb) whole earlier blocks (16 full tiles each) for qb = 0..2047: 0 + 1 + 2 + 3 * 2045.
    ("random_blocks(512, 3, 0)", 2048 * 6 + 16 * 6138, 2048 * 4, 2048 * 512 * 513 // 2 + 6138 * 512 * 512),
]


@pytest.mark.parametrize("spec, num_full, num_partial, active_pairs", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_layouts_at_one_million_tokens_build_within_a_second(spec, num_full, num_partial, active_pairs):
    pattern = parse(spec)
    layout._cached_layout.cache_clear()
    start = time.perf_counter()
    result = block_layout(pattern, SEQ_1M, TILE, TILE)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{spec}: {elapsed:.2f} s"
    assert (result.num_full_tiles, result.num_partial_tiles) == (num_full, num_partial)
    assert result.active_pairs == active_pairs
    # Both directions list the same tiles.
    assert len(result.backward.full_indices) == num_full and len(result.backward.partial_indices) == num_partial


def test_shifted_layers_at_one_million_tokens_build_within_a_second():
    schedule = parse("shifted(512)")
    expected = {0: (2048 * 6, 2048 * 4), 1: (2047 * 6 + 2, 2047 * 4 + 4)}
    for index in (0, 1):
        layout._cached_layout.cache_clear()
        start = time.perf_counter()
        result = block_layout(schedule.layer(index), SEQ_1M, TILE, TILE)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"layer {index}: {elapsed:.2f} s"
        assert (result.num_full_tiles, result.num_partial_tiles) == expected[index]


def test_contiguous_lists_at_one_million_tokens():
    """Dense rows are consecutive tiles (first tile and count suffice); window(1024)'s partial tiles, its far
    edge and the diagonal, are not."""
    dense = block_layout("dense", SEQ_1M, TILE, TILE)
    for tile_lists in (dense.forward, dense.backward):
        assert tile_lists.contiguous == (True, True)
    first_full, first_partial = dense.forward.first_tiles
    np.testing.assert_array_equal(first_full[1:], 0)
    np.testing.assert_array_equal(first_partial, np.arange(SEQ_1M // TILE))
    np.testing.assert_array_equal(dense.backward.first_tiles[0][:-1], np.arange(1, SEQ_1M // TILE))
    assert block_layout("window(1024)", SEQ_1M, TILE, TILE).forward.contiguous == (True, False)


def test_window_layout_rows_at_one_million_tokens():
    """Spot-check whole rows: tile row 5000 of window(1024) is full 4993..4999, partial 4992 and 5000."""
    full, partial = block_layout("window(1024)", SEQ_1M, TILE, TILE).forward.row(5000)
    np.testing.assert_array_equal(full, np.arange(4993, 5000))
    np.testing.assert_array_equal(partial, [4992, 5000])
    back_full, back_partial = block_layout("window(1024)", SEQ_1M, TILE, TILE).backward.row(5000)
    np.testing.assert_array_equal(back_full, np.arange(5001, 5008))
    np.testing.assert_array_equal(back_partial, [5000, 5008])


# --------------------------------------------------------------------------------------------- bad sizes


@pytest.mark.parametrize(
    "seq_len, block_q, block_k, field",
    [(0, 8, 8, "seq_len"), (-5, 8, 8, "seq_len"), (64, -8, 8, "block_q"), (64, 0, 8, "block_q"),
     (64, 8, -1, "block_k"), (64, 8, 0, "block_k"), (64.0, 8, 8, "seq_len"), (64, 8, 2.5, "block_k")],
)
def test_bad_sizes_raise_value_error_naming_the_field(seq_len, block_q, block_k, field):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        block_layout("window(4)", seq_len, block_q, block_k)


def test_layout_of_a_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        block_layout("shifted(8)", 64, 8, 8)
