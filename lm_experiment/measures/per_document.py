"""Each document's NLL sum and token count, overall and at block offsets below PAIRED_START_OFFSETS: what
`paired.paired_differences` pools over runs and pairs across variants, also for runs evaluated apart."""

from __future__ import annotations

import dataclasses

import numpy as np

from lm_experiment.eval_options import PAIRED_START_OFFSETS
from lm_experiment.eval_statistics import block_offsets, bucket_sums
from lm_experiment.measures.base import Measure, ScoredLength


@dataclasses.dataclass(frozen=True)
class PerDocument:
    start_offsets: int
    nll_nats: list[float]
    tokens: list[int]
    start_nll_nats: list[float]
    start_tokens: list[int]

    @classmethod
    def from_json(cls, entry: dict) -> PerDocument | None:
        value = entry.get("per_document")
        return None if value is None else cls(**value)

    def to_json(self) -> dict:
        return {"per_document": dataclasses.asdict(self)}


def compute(scored: ScoredLength) -> PerDocument:
    sums, counts = scored.document_sums
    start = block_offsets(scored.position, scored.grid.size, scored.grid.offset) < PAIRED_START_OFFSETS
    start_sums, start_counts = bucket_sums(scored.doc[start], np.zeros(start.sum(), np.int64), scored.loss[start],
                                           scored.num_docs, 1)
    return PerDocument(PAIRED_START_OFFSETS, sums[:, 0].tolist(), counts[:, 0].astype(np.int64).tolist(),
                       start_sums[:, 0].tolist(), start_counts[:, 0].astype(np.int64).tolist())


MEASURE = Measure("per_document", ("per_document",), compute, PerDocument.from_json)
