"""Patterns against brute force from the definitions, spec round trips, schedules and spec errors.

The definitions are written here independently of `patterns.py`, as pattern trees:
  ("dense",) ("block", B, offset) ("window", W) ("repaired", B, R, mode) ("strided", S)
  ("dilated", W, D) ("sinks", N) ("random_blocks", B, K, seed) ("or", *trees) ("and", *trees)
`brute_force_mask` and `pattern_trees` are also used by test_layout.py and test_attention.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attention.patterns import (
    Block,
    Dense,
    KeyExtent,
    Pattern,
    RandomBlocks,
    Schedule,
    Window,
    as_pattern,
    as_schedule,
    parse,
    shifted,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


def allowed(tree, q, k):
    """The issue's definition of each kind, before causality; q, k are ints or broadcastable int arrays."""
    kind, *args = tree
    if kind == "dense":
        return (q >= 0) | (k >= 0)
    if kind == "block":
        size, offset = args
        return (q + offset) // size == (k + offset) // size
    if kind == "window":
        (width,) = args
        return q - k < width
    if kind == "repaired":
        size, repair, mode = args
        same_block = q // size == k // size
        if mode == "bridge":
            return same_block | (q - k <= repair)
        return same_block | ((q // size == k // size + 1) & (k % size >= size - repair))
    if kind == "strided":
        (stride,) = args
        return (q - k) % stride == 0
    if kind == "dilated":
        width, dilation = args
        return ((q - k) % dilation == 0) & (q - k < width * dilation)
    if kind == "sinks":
        (count,) = args
        return k < count
    if kind == "random_blocks":
        size, count, seed = args
        # Which earlier blocks are picked is the library's seeded choice; test_random_blocks_* checks that
        # choice against the definition (min(K, qb) distinct earlier blocks, whole, per query block).
        q_block, k_block = np.asarray(q // size), np.asarray(k // size)
        picks = RandomBlocks(size, count, seed).picked_blocks(np.arange(int(q_block.max()) + 1))
        return (q_block == k_block) | (picks[q_block] == k_block[..., None]).any(axis=-1)
    if kind == "or":
        result = allowed(args[0], q, k)
        for sub in args[1:]:
            result = result | allowed(sub, q, k)
        return result
    if kind == "and":
        result = allowed(args[0], q, k)
        for sub in args[1:]:
            result = result & allowed(sub, q, k)
        return result
    raise AssertionError(f"unknown tree {tree!r}")


def brute_force_mask(tree, seq_len: int) -> np.ndarray:
    """bool [seq_len, seq_len]: the definition intersected with causality, on every (q, k) pair."""
    q = np.arange(seq_len, dtype=np.int64)[:, None]
    k = np.arange(seq_len, dtype=np.int64)[None, :]
    return np.broadcast_to(allowed(tree, q, k) & (k <= q), (seq_len, seq_len))


def tree_spec(tree) -> str:
    """Spec string of a tree, composites fully parenthesized."""
    kind, *args = tree
    if kind in ("or", "and"):
        joiner = " | " if kind == "or" else " & "
        return "(" + joiner.join(tree_spec(sub) for sub in args) + ")"
    if kind == "dense":
        return "dense"
    return f"{kind}({', '.join(map(str, args))})"


def tree_pattern(tree) -> Pattern:
    """The pattern built with the | and & operators (not through the parser)."""
    kind, *args = tree
    if kind in ("or", "and"):
        result = tree_pattern(args[0])
        for sub in args[1:]:
            result = (result | tree_pattern(sub)) if kind == "or" else (result & tree_pattern(sub))
        return result
    return parse(tree_spec(tree))


small = st.integers(1, 12)
leaf_trees = st.one_of(
    st.just(("dense",)),
    st.builds(lambda size, offset: ("block", size, offset % size), small, st.integers(0, 11)),
    st.builds(lambda width: ("window", width), st.integers(1, 20)),
    st.builds(
        lambda size, repair, mode: ("repaired", size, min(repair, size), mode),
        small,
        small,
        st.sampled_from(("bridge", "prefix")),
    ),
    st.builds(lambda stride: ("strided", stride), st.integers(1, 8)),
    st.builds(lambda width, dilation: ("dilated", width, dilation), st.integers(1, 6), st.integers(1, 5)),
    st.builds(lambda count: ("sinks", count), st.integers(1, 8)),
    st.builds(
        lambda size, count, seed: ("random_blocks", size, count, seed),
        st.integers(1, 8),
        st.integers(1, 4),
        st.integers(0, 2**31 - 1),
    ),
)


@st.composite
def pattern_trees(draw, depth: int = 3):
    """Random pattern trees with up to `depth` levels of | and & above the leaves."""
    if depth == 0 or not draw(st.booleans()):
        return draw(leaf_trees)
    op = draw(st.sampled_from(("or", "and")))
    return (op, *draw(st.lists(pattern_trees(depth - 1), min_size=2, max_size=3)))


# One or more trees per kind, with edge sizes (B = 1, R = B, offset = B - 1, W = 1, ...).
KIND_TREES = [
    ("dense",),
    ("block", 1, 0),
    ("block", 7, 0),
    ("block", 8, 3),
    ("block", 8, 7),
    ("window", 1),
    ("window", 5),
    ("repaired", 8, 1, "bridge"),
    ("repaired", 8, 8, "bridge"),
    ("repaired", 6, 4, "bridge"),
    ("repaired", 8, 3, "prefix"),
    ("repaired", 5, 5, "prefix"),
    ("strided", 1),
    ("strided", 3),
    ("dilated", 4, 3),
    ("dilated", 1, 5),
    ("dilated", 5, 1),
    ("sinks", 1),
    ("sinks", 4),
    ("random_blocks", 4, 2, 0),
    ("random_blocks", 3, 5, 12345),
    ("or", ("sinks", 4), ("window", 3)),
    ("and", ("block", 8, 0), ("strided", 2)),
    ("and", ("sinks", 4), ("window", 2)),
    ("or", ("and", ("window", 9), ("strided", 2)), ("repaired", 6, 2, "prefix")),
    ("and", ("dilated", 4, 2), ("window", 5)),
    ("or", ("strided", 4), ("window", 2)),
    ("or", ("sinks", 3), ("block", 8, 2)),
    ("and", ("window", 9), ("repaired", 8, 2, "bridge")),
]
KIND_IDS = [tree_spec(tree) for tree in KIND_TREES]


@pytest.mark.parametrize("tree", KIND_TREES, ids=KIND_IDS)
def test_mask_matches_definition_pair_by_pair(tree):
    seq_len = 37
    expected = np.zeros((seq_len, seq_len), bool)
    for q in range(seq_len):
        for k in range(seq_len):
            expected[q, k] = k <= q and bool(allowed(tree, q, k))
    got = parse(tree_spec(tree)).mask(np.arange(seq_len)[:, None], np.arange(seq_len)[None, :])
    np.testing.assert_array_equal(np.broadcast_to(got, expected.shape), expected)


def test_definitions_on_hand_picked_pairs():
    """Spot checks of the definitions themselves, so a wrong oracle cannot hide a wrong library."""
    # block(8, 3): blocks are [-3, 5), [5, 13), ...
    assert parse("block(8, 3)").mask(np.array(4), np.array(0)) and not parse("block(8, 3)").mask(
        np.array(5), np.array(4)
    )
    # repaired(8, 2, bridge): 9 sees 7 (q - k = 2) but not 6; prefix: 9 sees 6 and 7 (last 2 of block 0).
    bridge, prefix = parse("repaired(8, 2, bridge)"), parse("repaired(8, 2, prefix)")
    assert [bool(bridge.mask(np.array(9), np.array(k))) for k in range(10)] == [False] * 7 + [True] * 3
    assert [bool(prefix.mask(np.array(12), np.array(k))) for k in range(13)] == [False] * 6 + [True] * 7
    # Queries of block 0 have no previous block; block 2 does not see block 0's tail.
    assert not prefix.mask(np.array(17), np.array(7))
    # dilated(3, 2): q - k in {0, 2, 4}.
    assert [bool(parse("dilated(3, 2)").mask(np.array(10), np.array(k))) for k in range(11)] == (
        [False] * 6 + [True, False, True, False, True]
    )


@PROPERTY_SETTINGS
@given(tree=pattern_trees(), seq_len=st.integers(1, 64))
def test_mask_matches_brute_force_for_random_compositions(tree, seq_len):
    pattern = parse(tree_spec(tree))
    q = np.arange(seq_len)[:, None]
    k = np.arange(seq_len)[None, :]
    got = np.broadcast_to(pattern.mask(q, k), (seq_len, seq_len))
    np.testing.assert_array_equal(got, brute_force_mask(tree, seq_len))


@pytest.mark.parametrize(
    "size, count, seed, seq_len",
    [(4, 2, 0, 200), (4, 2, 99, 200), (3, 5, 7, 61), (8, 1, 2**31 - 1, 203), (1, 3, 5, 40), (5, 40, 3, 120)],
)
def test_random_blocks_follow_the_definition(size, count, seed, seq_len):
    pattern = RandomBlocks(size, count, seed)
    mask = brute_force_mask(("dense",), seq_len) & pattern.mask(
        np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
    )
    picks = pattern.picked_blocks(np.arange(-(-seq_len // size)))
    for q in range(seq_len):
        q_block = q // size
        block_start = q_block * size
        # Own block: every key up to q.
        assert mask[q, block_start : q + 1].all() and not mask[q, q + 1 :].any()
        earlier_blocks = {k // size for k in np.flatnonzero(mask[q, :block_start])}
        # Earlier blocks are whole, exactly min(K, qb) of them, distinct, and what picked_blocks says.
        for block in earlier_blocks:
            assert mask[q, block * size : (block + 1) * size].all()
        assert len(earlier_blocks) == min(count, q_block)
        assert earlier_blocks == {int(b) for b in picks[q_block] if b >= 0}
        assert (picks[q_block] >= 0).sum() == min(count, q_block)
        # The same for every query of the block.
        np.testing.assert_array_equal(mask[q, :block_start], mask[block_start, :block_start])
    # Deterministic: a fresh object and a parsed spec give the same choice.
    again = parse(f"random_blocks({size}, {count}, {seed})")
    np.testing.assert_array_equal(
        again.mask(np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]),
        pattern.mask(np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]),
    )


@PROPERTY_SETTINGS
@given(count=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), num_blocks=st.integers(1, 300))
def test_random_blocks_picks_are_distinct_earlier_blocks(count, seed, num_blocks):
    picks = RandomBlocks(4, count, seed).picked_blocks(np.arange(num_blocks))
    assert picks.shape == (num_blocks, count)
    for q_block, row in enumerate(picks):
        chosen = row[row >= 0]
        assert len(chosen) == min(count, q_block) == len(set(chosen.tolist()))
        assert (chosen < q_block).all()


def test_random_blocks_picks_at_a_million_blocks():
    q_blocks = np.array([65_537, 999_999, 1_000_002])
    picks = RandomBlocks(1, 1024, 77).picked_blocks(q_blocks)
    for q_block, row in zip(q_blocks, picks):
        assert len(set(row.tolist())) == 1024 and (row >= 0).all() and (row < q_block).all()


def test_random_blocks_differ_between_seeds():
    seq_len = 200
    q, k = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
    masks = [RandomBlocks(4, 2, seed).mask(q, k) for seed in range(6)]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert (masks[a] != masks[b]).any(), (a, b)


# ------------------------------------------------------------------------------------------ spec round trip

BUILTIN_SPECS = [
    "dense",
    "block(512)",
    "block(512, 256)",
    "window(1024)",
    "repaired(512, 64, bridge)",
    "repaired(512, 64, prefix)",
    "strided(7)",
    "dilated(64, 16)",
    "sinks(4)",
    "random_blocks(512, 3, 0)",
    "sinks(4) | window(1024)",
    "block(64) & strided(2)",
    "(sinks(4) | window(8)) & block(16)",
    "sinks(4) | (window(8) & block(16))",
    "shifted(512)",
    "schedule(block(8), window(4) | sinks(2), dense)",
]


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_builtin_specs_round_trip(spec):
    value = parse(spec)
    assert value.spec == spec
    assert parse(value.spec) == value and hash(parse(value.spec)) == hash(value)
    assert str(value) == spec


def test_spec_parsing_ignores_whitespace_and_precedence_is_and_first():
    assert parse("sinks(4) | window(8) & block(16)").spec == "sinks(4) | (window(8) & block(16))"
    assert parse(" block( 8 ,3 )|window(2)&sinks( 1 ) ") == parse("block(8, 3) | (window(2) & sinks(1))")
    assert parse("block(8, 0)") == Block(8) and parse("dense()") == Dense()


@PROPERTY_SETTINGS
@given(tree=pattern_trees())
def test_random_compositions_round_trip(tree):
    pattern = parse(tree_spec(tree))
    assert isinstance(pattern, Pattern)
    assert parse(pattern.spec) == pattern
    assert hash(parse(pattern.spec)) == hash(pattern)
    # The operators build the same object as the parser.
    built = tree_pattern(tree)
    assert built == pattern and hash(built) == hash(pattern) and built.spec == pattern.spec


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("size", [1, 5, 8, 512])
def test_shifted_alternates_block_and_half_shifted_block(size):
    schedule = parse(f"shifted({size})")
    assert isinstance(schedule, Schedule) and schedule == shifted(size)
    assert schedule.period == 2 and schedule.spec == f"shifted({size})"
    for layer in range(7):
        expected = Block(size) if layer % 2 == 0 else Block(size, size // 2)
        assert schedule.layer(layer) == expected


def test_schedule_and_list_schedules_cycle():
    patterns = [parse("block(8)"), parse("window(4) | sinks(2)"), Dense()]
    schedule = parse("schedule(block(8), window(4) | sinks(2), dense)")
    from_list = as_schedule(["block(8)", "window(4) | sinks(2)", "dense"])
    assert schedule == from_list and schedule.period == from_list.period == 3
    for layer in range(10):
        assert schedule.layer(layer) == from_list.layer(layer) == patterns[layer % 3]
    assert as_schedule("shifted(8)") == shifted(8)
    assert as_schedule(schedule) is schedule
    # A list of one is that pattern, and a plain pattern is its own one-layer schedule.
    single = as_schedule(["window(4)"])
    assert single == Window(4) and single.period == 1 and single.layer(5) == Window(4)


def test_schedule_entries_must_be_single_patterns():
    with pytest.raises(ValueError, match="single patterns"):
        as_schedule(["shifted(8)", "dense"])


# ------------------------------------------------------------------------------------------ bad specs

BAD_SPECS = [
    ("foo(3)", "unknown pattern 'foo'"),
    ("Block(8)", "unknown pattern 'Block'"),
    ("repaired(8, 9, bridge)", "R=9 must be <= B=8"),
    ("repaired(8, 9, prefix)", "R=9 must be <= B=8"),
    ("block(0)", "B must be a positive integer, got 0"),
    ("window(-3)", "W must be a positive integer, got -3"),
    ("dilated(4, 0)", "D must be a positive integer, got 0"),
    ("dilated(0, 2)", "W must be a positive integer, got 0"),
    ("strided(0)", "S must be a positive integer"),
    ("sinks(0)", "N must be a positive integer"),
    ("repaired(8, 0, bridge)", "R must be a positive integer"),
    ("random_blocks(8, 0, 1)", "K must be a positive integer"),
    ("random_blocks(8, 2, -1)", "seed must be in [0, 2**31)"),
    ("shifted(0)", "B must be a positive integer"),
    ("block(8, 8)", "offset must be in [0, B)"),
    ("block(abc)", "expected an integer size"),
    ("window(4, 5)", "window takes 1 arguments, got 2"),
    ("window", "window takes 1 arguments, got 0"),
    ("dense(1)", "dense takes 0 arguments, got 1"),
    ("repaired(8, 2)", "repaired takes 3 arguments, got 2"),
    ("block(1, 2, 3)", "block takes 1 or 2 arguments, got 3"),
    ("repaired(8, 2, foo)", "mode must be one of bridge, prefix, got 'foo'"),
    ("repaired(8, 2, 3)", "mode must be one of bridge, prefix"),
    ("block(8) xyz", "unexpected 'xyz'"),
    ("block(8))", "unexpected ')'"),
    ("block(8) $", "unexpected character '$'"),
    ("block(8.5)", "sizes must be plain integers, got '8.5'"),
    ("block(1e3)", "sizes must be plain integers, got '1e3'"),
    ("window(0x10)", "sizes must be plain integers, got '0x10'"),
    ("block(\u0663\u0662)", "unexpected character '\u0663'"),  # Arabic-Indic digits: int() would read 32
    ("block(" + "9" * 5000 + ")", "integers must be at most 2147483647 in size"),
    ("window(2147483648)", "2147483648 is out of range"),
    ("(" * 40 + "dense" + ")" * 40, "nested more than 32 levels deep"),
    ("schedule(" * 40 + "dense" + ")" * 40, "nested more than 32 levels deep"),
    ("block(", "unexpected end"),
    ("(block(8)", "expected ')'"),
    ("window(4) |", "unexpected end"),
    ("shifted(8) | window(4)", "a schedule cannot be combined with | or &"),
    ("window(4) & schedule(block(8))", "a schedule cannot be combined with | or &"),
    ("", "empty spec"),
    ("   ", "empty spec"),
]


@pytest.mark.parametrize("spec, problem", BAD_SPECS, ids=[repr(s) for s, _ in BAD_SPECS])
def test_bad_specs_name_the_problem_and_list_valid_forms(spec, problem):
    with pytest.raises(ValueError) as error:
        parse(spec)
    message = str(error.value)
    assert problem in message
    assert "valid forms" in message and "repaired(B, R, bridge)" in message


@pytest.mark.parametrize("value", [5, None, b"block(8)", ["block(8)"], ("window", 4)], ids=repr)
def test_non_string_specs_raise_value_error(value):
    with pytest.raises(ValueError, match="must be a string") as error:
        parse(value)
    assert "valid forms" in str(error.value)


@pytest.mark.parametrize("spec", ["shifted(8)", "schedule(dense)", "schedule(block(8), window(2))"])
def test_as_pattern_refuses_schedules(spec):
    with pytest.raises(ValueError, match="schedule"):
        as_pattern(spec)
    with pytest.raises(ValueError, match="schedule"):
        as_pattern(parse(spec))


def test_as_pattern_accepts_patterns_and_specs_and_refuses_other_types():
    assert as_pattern("window(4)") == Window(4)
    assert as_pattern(Window(4)) == Window(4)
    with pytest.raises(ValueError, match="expected a Pattern or a spec string"):
        as_pattern(4)


def test_combining_a_schedule_object_with_an_operator_raises():
    with pytest.raises(ValueError, match="cannot combine the schedule"):
        Window(4) | shifted(8)


def check_structure(tree, seq_len: int):
    """Where a pattern reports interval or translation-invariant structure, it matches brute force."""
    pattern = parse(tree_spec(tree))
    mask = brute_force_mask(tree, seq_len)
    interval = pattern.row_interval()
    if interval is not None:
        lo, cap = interval
        queries = np.arange(seq_len, dtype=np.int64)
        first = lo(queries)
        assert (np.diff(first) >= 0).all(), "lo must be nondecreasing"
        for q in range(seq_len):
            keys = set(np.flatnonzero(mask[q]).tolist()) | {q}
            assert keys == set(range(min(cap, q) + 1)) | set(range(max(int(first[q]), 0), q + 1)), q
    offsets = pattern.offsets(seq_len)
    if offsets is not None:
        assert offsets.shape == (seq_len,)
        q, k = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
        np.testing.assert_array_equal(mask, (k <= q) & offsets[np.maximum(q - k, 0)])


@PROPERTY_SETTINGS
@given(tree=pattern_trees(), seq_len=st.integers(1, 120))
def test_row_interval_and_offsets_describe_random_compositions(tree, seq_len):
    check_structure(tree, seq_len)


@pytest.mark.parametrize("tree", KIND_TREES, ids=KIND_IDS)
def test_row_interval_and_offsets_describe_every_kind(tree):
    check_structure(tree, 70)


# ------------------------------------------------------------------------------------------ counts, traced masks


@PROPERTY_SETTINGS
@given(tree=pattern_trees(), seq_len=st.integers(1, 300))
def test_count_active_matches_brute_force(tree, seq_len):
    assert parse(tree_spec(tree)).count_active(seq_len) == brute_force_mask(tree, seq_len).sum()


@pytest.mark.parametrize(
    "tree",
    KIND_TREES + [("block", 100, 30), ("repaired", 96, 40, "prefix"), ("random_blocks", 64, 2, 3), ("sinks", 200)],
    ids=tree_spec,
)
def test_count_active_across_many_tiles(tree):
    """Longer than the 128-token tiles that count_active walks, with partial last tiles."""
    seq_len = 517
    assert parse(tree_spec(tree)).count_active(seq_len) == brute_force_mask(tree, seq_len).sum()


@pytest.mark.parametrize("tree", KIND_TREES, ids=KIND_IDS)
def test_mask_on_traced_int32_arrays_matches_numpy(tree):
    pattern = parse(tree_spec(tree))
    seq_len = 45
    positions = np.arange(seq_len, dtype=np.int32)
    traced = jax.jit(lambda q, k: pattern.mask(q, k))(
        jnp.asarray(positions)[:, None], jnp.asarray(positions)[None, :]
    )
    assert traced.dtype == jnp.bool_
    expected = pattern.mask(positions[:, None], positions[None, :])
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(traced), (seq_len, seq_len)), expected)
    np.testing.assert_array_equal(expected, brute_force_mask(tree, seq_len))


@pytest.mark.parametrize("tree", KIND_TREES, ids=KIND_IDS)
def test_traced_mask_at_large_positions(tree):
    """Pairs across a 2^20-token sequence, near and far from the diagonal: int32 jnp agrees with NumPy."""
    rng = np.random.default_rng(len(tree_spec(tree)))
    q = rng.integers(0, 1 << 20, 4000)
    k = np.concatenate([np.maximum(q[:2000] - rng.integers(0, 40, 2000), 0), rng.integers(0, 1 << 20, 2000)])
    expected = allowed(tree, q, k) & (k <= q)
    pattern = parse(tree_spec(tree))
    traced = jax.jit(pattern.mask)(jnp.asarray(q, jnp.int32), jnp.asarray(k, jnp.int32))
    np.testing.assert_array_equal(np.asarray(traced), expected)
    np.testing.assert_array_equal(pattern.mask(q, k), expected)


def test_a_schedule_inside_a_schedule_is_named_by_its_spec():
    with pytest.raises(ValueError, match=r"schedule entries must be single patterns, got \['shifted\(8\)', "
                                         r"'block\(8\)'\]"):
        as_schedule([parse("shifted(8)"), "block(8)"])


@pytest.mark.parametrize("spec, grid", [
    ("block(512)", (512, 0)), ("block(512, 256)", (512, 256)), ("repaired(64, 8, prefix)", (64, 0)),
    ("random_blocks(128, 3, 0)", (128, 0)), ("dense", None), ("window(64)", None), ("sinks(4) | strided(8)", None),
    ("window(64) | block(32)", (32, 0)), ("sinks(4) | (window(9) & block(16, 4))", (16, 4)),
    # Breadth first: a direct blocky part before one nested in an intersection.
    ("(window(9) & block(16)) | repaired(512, 64, bridge)", (512, 0)),
])
def test_block_grid_comes_from_the_pattern(spec, grid):
    assert parse(spec).block_grid() == grid


@pytest.mark.parametrize("spec", ["block(16)", "block(16, 5)", "block(7, 6)"])
def test_block_grid_marks_where_block_attention_is_cut(spec):
    # Position p starts a block exactly when (p + offset) % size == 0: there p cannot see p - 1.
    pattern = parse(spec)
    size, offset = pattern.block_grid()
    for p in range(1, 4 * size):
        assert bool(pattern.mask(p, p - 1)) == ((p + offset) % size != 0)


def test_help_text_lists_every_registered_kind():
    from sparse_attention.patterns import PATTERN_KINDS, valid_forms

    for kind in PATTERN_KINDS.values():
        for form, meaning in kind.forms:
            assert form.startswith(f"{kind.name}(") or form == kind.name
            assert f"  {form:<28} {meaning}" in valid_forms().splitlines()


def test_a_new_kind_is_a_class_plus_its_registration():
    import dataclasses

    from sparse_attention import patterns

    @patterns.pattern_kind("every_other", ("S",), (("every_other(S)", "k even, within q - k < S"),))
    @dataclasses.dataclass(frozen=True)
    class EveryOther(patterns.Pattern):
        size: int

        @property
        def spec(self):
            return f"every_other({self.size})"

        def mask(self, q, k):
            return (k <= q) & (q - k < self.size) & (k % 2 == 0)

        def candidate_tiles(self, grid):
            return patterns.Dense().candidate_tiles(grid)

    try:
        pattern = parse("every_other(6) | sinks(1)")
        assert pattern.parts[0] == EveryOther(6)
        positions = np.arange(12)
        expected = (positions[None] <= positions[:, None]) & (positions[:, None] - positions[None] < 6) & (
            positions[None] % 2 == 0) | ((positions[None] == 0) & (positions[:, None] >= 0))
        np.testing.assert_array_equal(pattern.mask(positions[:, None], positions[None]), expected)
        with pytest.raises(ValueError, match="every_other takes 1 arguments, got 2") as error:
            parse("every_other(1, 2)")
        assert "every_other(S)" in str(error.value)  # its help line is in every error's help text
    finally:
        del patterns.PATTERN_KINDS["every_other"]
        patterns._parse_cached.cache_clear()
    with pytest.raises(ValueError, match="unknown pattern 'every_other'"):
        parse("every_other(6)")


@PROPERTY_SETTINGS
@given(tree=pattern_trees(), seq_len=st.integers(1, 96))
def test_key_extent_bounds_every_attended_key(tree, seq_len):
    pattern = parse(tree_spec(tree))
    extent = pattern.key_extent()
    q, k = np.meshgrid(np.arange(seq_len), np.arange(seq_len), indexing="ij")
    attended = np.broadcast_to(pattern.mask(q, k), q.shape)
    if extent.recent is not None:
        assert not (attended & (k >= extent.first) & (q - k >= extent.recent)).any()


@pytest.mark.parametrize("spec, first, recent", [
    ("dense", 0, None), ("block(64)", 0, 64), ("block(64, 16)", 0, 64), ("window(100)", 0, 100),
    ("repaired(64, 8, bridge)", 0, 64), ("repaired(64, 64, bridge)", 0, 65), ("repaired(64, 8, prefix)", 0, 72),
    ("sinks(4) | window(32)", 4, 32), ("strided(8)", 0, None), ("dilated(4, 3)", 0, 12),
    ("random_blocks(8, 2, 0)", 0, None), ("block(64) & window(16)", 0, 16), ("dense & sinks(4)", 4, 1),
])
def test_key_extent_of_each_kind(spec, first, recent):
    assert parse(spec).key_extent() == KeyExtent(first, recent)
