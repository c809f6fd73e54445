import json

import pytest

from lm_experiment import eval_options
from lm_experiment.measures import per_document, totals


def test_per_document_sums_add_up_to_the_pooled_loss(hand_made):
    length = 32
    entry, positions = hand_made(doc_lengths=(100, 45, 2), length=length, block=16, grid_offset=3,
                                 value=lambda i: i + 1)  # blocks start where (p + 3) % 16 == 0
    sums = per_document.MEASURE.read(entry)
    assert sums.start_offsets == eval_options.PAIRED_START_OFFSETS == 8
    assert sums.tokens == [99, 44, 1] and sum(sums.tokens) == entry["tokens"]
    assert sum(sums.nll_nats) / sum(sums.tokens) == pytest.approx(totals.MEASURE.read(entry).nats_per_token.mean)
    for index, doc in enumerate(positions):
        start = [p for p in doc if (p + 3) % 16 < 8]
        assert sums.nll_nats[index] == pytest.approx(sum(p + 1 for p in doc))
        assert sums.start_tokens[index] == len(start)
        assert sums.start_nll_nats[index] == pytest.approx(sum(p + 1 for p in start))
    json.dumps(entry["per_document"], allow_nan=False)
