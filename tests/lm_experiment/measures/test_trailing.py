import math

import numpy as np
import pytest

from lm_experiment.measures import trailing


def test_trailing_window_and_ablation_by_brute_force(hand_made):
    length, width = 32, 8
    entry, positions = hand_made(length=length, width=width)
    flat = [p for doc in positions for p in doc]
    result = trailing.MEASURE.read(entry)
    tail = [p for p in flat if p >= length - width]
    assert result.width == width and result.tokens == len(tail)
    assert result.bits_per_byte.mean == pytest.approx(np.mean(tail) / math.log(2))
    # The ablation re-scores trailing positions i >= width; truncated, each sits at position width - 1.
    ablation = result.ablation
    assert ablation.positions == trailing.ablation_positions(length, width, 3).tolist() == [24, 28, 31]
    scored = [p for p in flat if p in set(ablation.positions)]
    assert ablation.targets == len(scored)
    assert ablation.full.mean == pytest.approx(np.mean(scored) / math.log(2))
    assert ablation.truncated.mean == pytest.approx((width - 1) / math.log(2))
    assert ablation.delta.mean == pytest.approx(np.mean([width - 1 - p for p in scored]) / math.log(2))


def test_nothing_trails_when_the_window_is_no_longer_than_the_width(hand_made):
    entry, _ = hand_made(length=8, width=8)
    assert entry["trailing_window"] is None and entry["distant_context_ablation"] is None
    assert trailing.MEASURE.read(entry) is None


def test_ablation_positions_need_more_context_than_the_width():
    assert trailing.ablation_positions(64, 64, 8).tolist() == []
    assert trailing.ablation_positions(100, 64, 100).tolist() == list(range(64, 100))
    assert trailing.ablation_positions(256, 64, 2).tolist() == [192, 255]
