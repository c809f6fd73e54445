"""The last W positions of each window (W = the trailing width, a block by default), and the
distant-context ablation: trailing targets with more than W tokens of context, scored again with the
context cut to exactly their last W tokens; delta = truncated - full (> 0: the model uses context beyond
W). Neither applies when C <= W."""

from __future__ import annotations

import dataclasses

import numpy as np

from lm_experiment.eval_statistics import bucket_sums, loss_interval
from lm_experiment.measures.base import Interval, Measure, ScoredLength
from lm_experiment.report_text import interval_text, length_entries, table


def ablation_positions(length: int, width: int, count: int) -> np.ndarray:
    """Window positions re-scored by the distant-context ablation: up to `count` evenly spaced positions of
    the trailing window [length - width, length) that have more than `width` tokens of context (i >= width),
    always including the last position. Empty when length <= width."""
    first = max(length - width, width)
    if first >= length:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(length - 1, first, min(count, length - first)).round().astype(np.int64))


@dataclasses.dataclass(frozen=True)
class Ablation:
    width: int
    targets: int
    positions: list[int]
    full: Interval
    truncated: Interval
    delta: Interval

    @classmethod
    def from_json(cls, value: dict | None) -> Ablation | None:
        if value is None:
            return None
        return cls(value["width"], value["targets"], value["positions"],
                   *(Interval.from_json(value[f"{name}_bits_per_byte"]) for name in ("full", "truncated", "delta")))

    def to_json(self) -> dict:
        return {"width": self.width, "targets": self.targets, "positions": self.positions,
                **{f"{name}_bits_per_byte": getattr(self, name).to_json()
                   for name in ("full", "truncated", "delta")}}


@dataclasses.dataclass(frozen=True)
class Trailing:
    width: int
    tokens: int
    bits_per_byte: Interval
    ablation: Ablation | None  # None where no window position has more than W tokens of context

    @classmethod
    def from_json(cls, entry: dict) -> Trailing | None:
        value = entry["trailing_window"]
        if value is None:
            return None
        return cls(value["width"], value["tokens"], Interval.from_json(value["bits_per_byte"]),
                   Ablation.from_json(entry["distant_context_ablation"]))

    def to_json(self) -> dict:
        return {"trailing_window": {"width": self.width, "tokens": self.tokens,
                                    "bits_per_byte": self.bits_per_byte.to_json()},
                "distant_context_ablation": None if self.ablation is None else self.ablation.to_json()}


def compute(scored: ScoredLength) -> Trailing | None:
    length, width = scored.length, scored.width
    if length <= width:
        return None
    trailing = scored.position >= length - width
    sums, counts = bucket_sums(scored.doc[trailing], np.zeros(trailing.sum(), np.int64), scored.loss[trailing],
                               scored.num_docs, 1)
    bits_per_byte = Interval.from_json(loss_interval(sums[:, 0], counts[:, 0], **scored.stats))
    return Trailing(width, int(counts.sum()), bits_per_byte, _ablation(scored))


def _ablation(scored: ScoredLength) -> Ablation | None:
    width = scored.width
    chosen = ablation_positions(scored.length, width, scored.ablation_targets)
    row_index, position = np.nonzero(chosen[None, :] < scored.targets[:, None])
    position = chosen[position]
    if not len(row_index):
        return None
    # Row r, position i predicts row token i + 1 from tokens 0..i; truncated: from tokens i - width + 1..i.
    gather = position[:, None] + np.arange(-width + 1, 2)[None, :]
    truncated = scored.rows[row_index[:, None], gather]  # [targets, width + 1]
    truncated_nll = scored.rescore(truncated)[:, -1].astype(np.float64)
    full_nll = scored.nll[row_index, position].astype(np.float64)
    doc = scored.owner[row_index]
    zeros = np.zeros(len(doc), np.int64)
    full, counts = bucket_sums(doc, zeros, full_nll, scored.num_docs, 1)
    cut, _ = bucket_sums(doc, zeros, truncated_nll, scored.num_docs, 1)
    return Ablation(width, int(counts.sum()), chosen.tolist(),
                    *(Interval.from_json(loss_interval(sums, counts[:, 0], **scored.stats))
                      for sums in (full[:, 0], cut[:, 0], cut[:, 0] - full[:, 0])))


def report(results: dict) -> list[str]:
    settings = results["settings"]
    width = settings["trailing_window"]
    lines = ["## Trailing window and distant-context ablation", "",
             f"Trailing window: window positions i >= C - {width} (the last {width} positions of each window). "
             f"Ablation: trailing targets with more than {width} tokens of context, scored again with the context "
             f"cut to exactly their last {width} tokens; delta = truncated - full (bits per byte; > 0: the model "
             "uses context beyond W).", ""]
    for eval_set in settings["eval_sets"]:
        rows = []
        for m in results["models"]:
            for length, entry in length_entries(m, eval_set).items():
                trailing = Trailing.from_json(entry)
                if trailing is None:
                    continue
                ablation = trailing.ablation
                rows.append([m["label"], str(length), interval_text(trailing.bits_per_byte),
                             str(ablation.targets) if ablation else "0",
                             *(interval_text(ablation and getattr(ablation, name)) for name in ("full", "truncated")),
                             interval_text(ablation and ablation.delta, 4)])
        lines += [f"### {eval_set}", ""]
        lines += table(["run", "C", "trailing window", "ablation targets", "full context", f"last {width} only",
                        "delta"], rows) if rows else [f"No length exceeds W = {width}.", ""]
    return lines


MEASURE = Measure("trailing", ("trailing_window", "distant_context_ablation"), compute, Trailing.from_json, report)
