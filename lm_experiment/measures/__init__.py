"""The evaluation measures: one module each, run by `scoring.evaluate_length` for every (run, eval set,
context length C) and rendered by `report`, in this order (docs/evaluation.md defines them):

  totals        bits per byte, nats per token and perplexity of every predicted token
  per_document  each document's NLL sum and tokens, overall and at block starts (for paired differences)
  by_position   loss in log-spaced buckets of window position
  block_offset  loss by offset within the block, own grid and shifted control
  trailing      loss of the last W window positions, and the distant-context ablation
  block_choice  which blocks each topk layer chose, and how far back (runs with a topk layer only)

Each module defines a frozen dataclass result (`to_json`: the keys it adds to a length's entry in
results.json; `from_json`: back from that entry), a `compute(ScoredLength)`, where it has a report
section a `report(results)`, and its `MEASURE` entry. A new measure is one such module, its entry in
MEASURES, and its test.
"""

from lm_experiment.measures import block_choice, block_offset, by_position, per_document, totals, trailing
from lm_experiment.measures.base import Curve, Interval, Measure, ScoredLength

MEASURES: tuple[Measure, ...] = (totals.MEASURE, per_document.MEASURE, by_position.MEASURE, block_offset.MEASURE,
                                 trailing.MEASURE, block_choice.MEASURE)

__all__ = ["MEASURES", "Curve", "Interval", "Measure", "ScoredLength"]
