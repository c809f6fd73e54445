"""Hand-made losses for the measure tests: a stand-in model whose loss at window position i is known, so
every measure can be checked against its definition by brute force."""

import numpy as np
import pytest

from lm_experiment import eval_options, eval_runs, scoring


class PositionScorer:
    """Stands in for the model: the NLL of the token predicted at window position i is `value(i)` nats, and one
    topk layer (layer 1, blocks of CHOICE_BLOCK) chooses, for query block b, blocks b - 1 and b - 3 (-1 where
    there is none), on every one of 2 KV heads."""

    CHOICE_BLOCK = 8
    choice_sizes = {1: CHOICE_BLOCK}

    def __init__(self, value):
        self.value = value

    def choices(self, rows, batch_size):
        blocks = -(-(rows.shape[1] - 1) // self.CHOICE_BLOCK)
        query = np.arange(blocks)[:, None]
        chosen = np.where(query - [1, 3] >= 0, query - [1, 3], -1)
        return {1: (self.CHOICE_BLOCK, np.broadcast_to(chosen, (len(rows), 2, blocks, 2)).astype(np.int32))}

    def score_rows(self, rows, batch_size, bar=None):
        return np.broadcast_to(self.value(np.arange(rows.shape[1] - 1)), (len(rows), rows.shape[1] - 1)).copy()


@pytest.fixture
def hand_made():
    """evaluate(doc_lengths, length, width, block, grid_offset, value) -> (the length's results entry, the
    window position of every predicted token, document by document)."""

    def evaluate(doc_lengths=(100, 45), length=32, width=8, block=8, grid_offset=0, value=lambda i: i):
        documents = [np.zeros(n, np.uint8) for n in doc_lengths]
        options = eval_options.EvalOptions(bootstrap_samples=20, ablation_targets=3, diagnostics=None)
        entry = scoring.evaluate_length(PositionScorer(lambda i: value(i).astype(np.float32)), documents, length,
                                        grid=eval_runs.BlockGrid(block, grid_offset, "pattern"), width=width,
                                        options=options)
        positions = [[(t - 1) % length for t in range(1, n)] for n in doc_lengths]
        return entry, positions

    return evaluate
