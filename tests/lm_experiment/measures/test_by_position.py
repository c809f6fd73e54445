import math

import numpy as np
import pytest

from lm_experiment.measures import by_position


def test_position_buckets_by_brute_force(hand_made):
    entry, positions = hand_made()
    flat = [p for doc in positions for p in doc]
    result = by_position.MEASURE.read(entry)
    assert result.edges[0] == 0 and result.edges[-1] == 32
    for bucket, (low, high) in enumerate(zip(result.edges[:-1], result.edges[1:])):
        inside = [p for p in flat if low <= p < high]
        assert result.curve.tokens[bucket] == len(inside)
        assert result.curve.mean[bucket] == pytest.approx(np.mean(inside) / math.log(2))
