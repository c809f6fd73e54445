"""The parts every kernel backend shares (sparse_attention.kernels.common)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attention.kernels import common
from sparse_attention.kernels.common import KernelStatic
from sparse_attention.layout import TileLists
from sparse_attention.patterns import parse


class Sizes:
    multiple = 16


def test_padded_flash_pads_for_the_kernels_and_slices_for_the_caller():
    seen = {}

    def forward(q, k, v, static, seq_len):  # out = 2q + v and no lse: enough to follow every shape
        seen["forward"] = (q.shape, k.shape, seq_len)
        return q * 2.0 + v, jnp.zeros(q.shape[:3])

    def backward(q, k, v, out, lse, d_out, static, seq_len):
        seen["backward"] = (q.shape, d_out.shape, seq_len, float(jnp.abs(d_out[:, seq_len:]).sum()))
        return d_out * 2.0, jnp.zeros_like(k), d_out

    flash = common.padded_flash(forward, backward, sequence_multiple=lambda static: static.block_sizes.multiple,
                                       padded_head_dim=lambda d: 16)
    static = KernelStatic(parse("dense"), 1.0, False, Sizes())
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 20, 3, 12)) for i in range(3))
    out, vjp = jax.vjp(lambda q, k, v: flash(q, k, v, static), q, k, v)
    np.testing.assert_allclose(out, q * 2.0 + v)
    d_out = jax.random.normal(jax.random.key(4), out.shape)
    dq, dk, dv = vjp(d_out)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape,) * 3
    np.testing.assert_allclose(dq, 2.0 * d_out)
    np.testing.assert_allclose(dv, d_out)
    assert seen["forward"] == ((2, 32, 3, 16), (2, 32, 3, 16), 20)
    # The kernels see padded rows of dO as zeros, so they add nothing to dk and dv.
    assert seen["backward"] == ((2, 32, 3, 16), (2, 32, 3, 16), 20, 0.0)


def test_checked_block_sizes_takes_the_default_or_the_class_only():
    assert common.checked_block_sizes(None, Sizes, Sizes).multiple == 16
    given = Sizes()
    assert common.checked_block_sizes(given, Sizes, Sizes) is given
    with pytest.raises(ValueError, match="block_sizes must be a Sizes or None, got dict"):
        common.checked_block_sizes({"multiple": 8}, Sizes, Sizes)


def test_reasons_name_what_is_missing():
    assert common.dtype_reason(jnp.dtype(jnp.bfloat16), (jnp.bfloat16, jnp.float16)) is None
    assert (common.dtype_reason(jnp.dtype(jnp.float32), (jnp.bfloat16, jnp.float16))
            == "dtype float32 is not supported (bfloat16, float16)")
    if jax.default_backend() != "gpu":
        assert (common.cuda_capability_reason(9, "Hopper")
                == "needs a CUDA GPU with compute capability >= 9.0 (Hopper) or interpret=True")
    with pytest.raises(ValueError, match="mosaic_gpu cannot run this case: because"):
        common.refuse_unsupported("mosaic_gpu", "because")
    common.refuse_unsupported("mosaic_gpu", None)


def test_check_block_fields_names_the_field_and_its_rule():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Tiles:
        block_q: int = 64
        stages: int = 2

        def __post_init__(self):
            common.check_block_fields(self, {"block_": (lambda b: b % 64 == 0, "a multiple of 64"),
                                             "stages": (lambda s: s <= 4, "1 to 4")})

    Tiles()
    for fields, message in [(dict(block_q=0), "Tiles.block_q must be a positive integer, got 0"),
                            (dict(block_q=2.0), "Tiles.block_q must be a positive integer, got 2.0"),
                            (dict(stages=True), "Tiles.stages must be a positive integer, got True"),
                            (dict(block_q=96), "Tiles.block_q must be a multiple of 64, got 96"),
                            (dict(stages=5), "Tiles.stages must be 1 to 4, got 5")]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            Tiles(**fields)


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return offsets, np.array([t for r in rows for t in r], np.int32)


def _tile_rows(runs: bool):
    """Strategy: one row's tiles, sorted and distinct; with `runs`, consecutive (first, first + 1, ...)."""
    if runs:
        return st.builds(lambda first, n: list(range(first, first + n)), st.integers(0, 20), st.integers(0, 6))
    return st.lists(st.integers(0, 40), max_size=6, unique=True).map(sorted)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.booleans(), st.data())
def test_row_plan_walks_every_row_heaviest_first(full_runs, partial_runs, data):
    """Walking a RowPlan (each list as first + j when contiguous, else as listed) and walking its `steps`
    both give back every row's FULL and then PARTIAL tiles; rows come in order of work."""
    num_rows = data.draw(st.integers(1, 8))
    full_rows = [data.draw(_tile_rows(full_runs)) for _ in range(num_rows)]
    partial_rows = [data.draw(_tile_rows(partial_runs)) for _ in range(num_rows)]
    tile, sub = data.draw(st.sampled_from([(64, 64), (128, 32)]))
    plan = common.row_plan(TileLists(*_csr(full_rows), *_csr(partial_rows)), tile, sub)

    def walk(tiles, count, consecutive):
        return [int(tiles[0]) + j if consecutive else int(tiles[j]) for j in range(count)]

    tiles, counts = plan.steps
    assert sorted(plan.rows.tolist()) == list(range(num_rows))
    work = [len(full_rows[r]) * tile + len(partial_rows[r]) * sub for r in plan.rows]
    assert work == sorted(work, reverse=True)
    for program, row in enumerate(plan.rows):
        full = walk(plan.full[program], plan.num_full[program], plan.contiguous[0])
        partial = walk(plan.partial[program], plan.num_partial[program], plan.contiguous[1])
        assert (full, partial) == (full_rows[row], partial_rows[row])
        num_full, num_steps = counts[program]
        if all(plan.contiguous):
            steps = [int(tiles[program, 0]) + i if i < num_full else int(tiles[program, 1]) + i - num_full
                     for i in range(num_steps)]
        else:
            steps = tiles[program, :num_steps].tolist()
        assert steps == full_rows[row] + partial_rows[row]
    # Runs of consecutive tiles are stored as first tiles only: O(rows), whatever the rows' lengths.
    for runs, consecutive, stored in ((full_runs, plan.contiguous[0], plan.full),
                                      (partial_runs, plan.contiguous[1], plan.partial)):
        if runs:
            assert consecutive and stored.shape == (num_rows, 1)
