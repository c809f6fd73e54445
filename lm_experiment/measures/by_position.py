"""Loss against window position, in log-spaced buckets [0, 1), [1, 2), [2, 4), ..., [2^k, C) (plotted by
the report as loss_vs_position.png)."""

from __future__ import annotations

import dataclasses

from lm_experiment.eval_statistics import bucket_curve, bucket_sums, log_position_edges, position_buckets
from lm_experiment.measures.base import Curve, Measure, ScoredLength


@dataclasses.dataclass(frozen=True)
class ByPosition:
    edges: list[int]  # bucket b holds positions edges[b] <= i < edges[b + 1]
    curve: Curve

    @classmethod
    def from_json(cls, entry: dict) -> ByPosition:
        value = entry["by_position"]
        return cls(value["edges"], Curve.from_json(value))

    def to_json(self) -> dict:
        return {"by_position": {"edges": self.edges, **self.curve.to_json()}}


def compute(scored: ScoredLength) -> ByPosition:
    edges = log_position_edges(scored.length)
    sums, counts = bucket_sums(scored.doc, position_buckets(scored.position, scored.length), scored.loss,
                               scored.num_docs, len(edges) - 1)
    return ByPosition(edges.tolist(), Curve.from_json(bucket_curve(sums, counts, **scored.stats)))


MEASURE = Measure("by_position", ("by_position",), compute, ByPosition.from_json)
