import math

import numpy as np
import pytest

from lm_experiment.measures import block_offset


def test_offsets_on_the_own_and_the_shifted_grid(hand_made):
    block = 8
    entry, positions = hand_made(block=block)
    flat = [p for doc in positions for p in doc]
    result = block_offset.MEASURE.read(entry)
    assert (result.grid.size, result.grid.offset, result.grid.source) == (block, 0, "pattern")
    for grid, shift in ((result.own, 0), (result.shifted, block // 2)):
        assert grid.shift == shift and grid.block_start_offsets == 1
        for offset in range(block):
            inside = [p for p in flat if (p - shift) % block == offset]
            assert grid.curve.mean[offset] == pytest.approx(np.mean(inside) / math.log(2))
        start = [p for p in flat if (p - shift) % block < 1]
        rest = [p for p in flat if (p - shift) % block >= 1]
        assert grid.block_start.mean == pytest.approx(np.mean(start) / math.log(2))
        assert grid.block_rest.mean == pytest.approx(np.mean(rest) / math.log(2))
        excess = grid.block_start_excess
        assert excess.mean == pytest.approx((np.mean(start) - np.mean(rest)) / math.log(2))
        assert excess.low <= excess.mean <= excess.high


def test_results_written_before_the_excess_existed_still_read(hand_made):
    entry, _ = hand_made()
    del entry["by_block_offset"]["own"]["block_start_excess_bits_per_byte"]
    assert block_offset.MEASURE.read(entry).own.block_start_excess is None
