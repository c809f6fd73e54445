import math

import numpy as np
import pytest

from lm_experiment.measures import totals


def test_totals_pool_every_predicted_token(hand_made):
    entry, positions = hand_made()
    flat = [p for doc in positions for p in doc]
    assert entry["tokens"] == len(flat)
    result = totals.MEASURE.read(entry)
    assert result.nats_per_token.mean == pytest.approx(np.mean(flat))
    assert result.bits_per_byte.mean == pytest.approx(np.mean(flat) / math.log(2))
    assert result.perplexity.mean == pytest.approx(math.exp(np.mean(flat)))
    for interval in (result.nats_per_token, result.bits_per_byte, result.perplexity):
        assert interval.low <= interval.mean <= interval.high
