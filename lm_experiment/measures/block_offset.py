"""Loss by offset within the block, on the run's own block grid and on the grid shifted by B / 2 (the
control: a boundary effect shows on the own grid only), with the loss of each block's first
max(1, B / 8) offsets ("block start"), of the rest, and their paired difference."""

from __future__ import annotations

import dataclasses

import numpy as np

from lm_experiment.eval_runs import BlockGrid
from lm_experiment.eval_statistics import (block_offsets, bucket_curve, bucket_sums, edge_offsets, excess_interval,
                                          loss_interval)
from lm_experiment.measures.base import Curve, Interval, Measure, ScoredLength
from lm_experiment.report_text import interval_text, length_entries, table, training_length_shown


@dataclasses.dataclass(frozen=True)
class GridLoss:
    """Loss by offset on one grid (shifted by `shift` positions from the run's own)."""

    shift: int
    curve: Curve  # one bucket per offset 0..B-1
    block_start_offsets: int
    block_start: Interval
    block_rest: Interval
    block_start_excess: Interval | None  # start - rest, paired over documents (None in older results)

    @classmethod
    def from_json(cls, value: dict) -> GridLoss:
        return cls(value["shift"], Curve.from_json(value), value["block_start_offsets"],
                   Interval.from_json(value["block_start_bits_per_byte"]),
                   Interval.from_json(value["block_rest_bits_per_byte"]),
                   Interval.from_json(value.get("block_start_excess_bits_per_byte")))

    def to_json(self) -> dict:
        return {"shift": self.shift, **self.curve.to_json(), "block_start_offsets": self.block_start_offsets,
                "block_start_bits_per_byte": self.block_start.to_json(),
                "block_rest_bits_per_byte": self.block_rest.to_json(),
                "block_start_excess_bits_per_byte": (None if self.block_start_excess is None
                                                     else self.block_start_excess.to_json())}


@dataclasses.dataclass(frozen=True)
class ByBlockOffset:
    grid: BlockGrid
    own: GridLoss
    shifted: GridLoss

    @classmethod
    def from_json(cls, entry: dict) -> ByBlockOffset:
        value = entry["by_block_offset"]
        return cls(BlockGrid(**value["grid"]), GridLoss.from_json(value["own"]), GridLoss.from_json(value["shifted"]))

    def to_json(self) -> dict:
        return {"by_block_offset": {"grid": self.grid.to_json(), "own": self.own.to_json(),
                                    "shifted": self.shifted.to_json()}}


def compute(scored: ScoredLength) -> ByBlockOffset:
    grid, doc, loss, stats = scored.grid, scored.doc, scored.loss, scored.stats
    edge = edge_offsets(grid.size)
    grids = []
    for shift in (0, grid.size // 2):
        offsets = block_offsets(scored.position, grid.size, grid.offset, shift)
        sums, counts = bucket_sums(doc, offsets, loss, scored.num_docs, grid.size)
        near, far = (bucket_sums(doc[part], np.zeros(part.sum(), np.int64), loss[part], scored.num_docs, 1)
                     for part in (offsets < edge, offsets >= edge))
        grids.append(GridLoss(shift, Curve.from_json(bucket_curve(sums, counts, **stats)), edge,
                              Interval.from_json(loss_interval(near[0][:, 0], near[1][:, 0], **stats)),
                              Interval.from_json(loss_interval(far[0][:, 0], far[1][:, 0], **stats)),
                              Interval.from_json(excess_interval(near, far, stats))))
    return ByBlockOffset(grid, *grids)


def report(results: dict) -> list[str]:
    lines = ["## Loss by offset within the block", "",
             "Bits per byte of the first max(1, B / 8) offsets of each block (\"block start\") and of the rest, on the "
             "run's own block grid and on the grid shifted by B / 2 (the control: a boundary effect shows on the own "
             "grid only). Runs without blocks use the reference grid. \"start - rest\" is their difference with a "
             "paired interval: the documents are resampled once for both, so that how hard a document is cancels "
             "(\"–\" in results written before it existed).", ""]
    for eval_set in results["settings"]["eval_sets"]:
        length = training_length_shown(results, eval_set)
        rows = []
        for m in results["models"]:
            offsets = ByBlockOffset.from_json(length_entries(m, eval_set)[length])
            rows.append([m["label"], f"{offsets.grid.size} ({offsets.grid.source})",
                         *(interval_text(value) for grid in (offsets.own, offsets.shifted)
                           for value in (grid.block_start, grid.block_rest, grid.block_start_excess))])
        lines += [f"### {eval_set}, C={length}", ""]
        lines += table(["run", "grid B", "own: block start", "own: rest", "own: start - rest",
                        "shifted: block start", "shifted: rest", "shifted: start - rest"], rows)
    return lines


MEASURE = Measure("block_offset", ("by_block_offset",), compute, ByBlockOffset.from_json, report)
