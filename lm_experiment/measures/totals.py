"""Bits per byte, nats per token and perplexity of every predicted token, pooled over the documents, with
95 % bootstrap intervals over documents."""

from __future__ import annotations

import dataclasses

from lm_experiment.eval_statistics import loss_interval
from lm_experiment.measures.base import Interval, Measure, ScoredLength
from lm_experiment.report_text import interval_text, length_entries, table

UNITS = ("nats_per_token", "bits_per_byte", "perplexity")


@dataclasses.dataclass(frozen=True)
class Totals:
    nats_per_token: Interval
    bits_per_byte: Interval
    perplexity: Interval

    @classmethod
    def from_json(cls, entry: dict) -> Totals:
        return cls(*(Interval.from_json(entry[unit]) for unit in UNITS))

    def to_json(self) -> dict:
        return {unit: getattr(self, unit).to_json() for unit in UNITS}


def compute(scored: ScoredLength) -> Totals:
    sums, counts = scored.document_sums
    return Totals(*(Interval.from_json(loss_interval(sums[:, 0], counts[:, 0], unit=unit, **scored.stats))
                    for unit in UNITS))


def unit_tables(results: dict, unit: str, title: str, description: str) -> list[str]:
    """One table per eval set: each run's `unit` at every context length it was evaluated at."""
    models = results["models"]
    lines = [f"## {title}", "",
             f"{description.capitalize()}, token-weighted over all predicted tokens, with 95 % bootstrap intervals "
             "over documents; C is the context length (window).", ""]
    for eval_set in results["settings"]["eval_sets"]:
        lengths = sorted({length for m in models for length in length_entries(m, eval_set)})
        rows = []
        for m in models:
            entries = length_entries(m, eval_set)
            rows.append([m["label"], *(interval_text(getattr(Totals.from_json(entries[length]), unit))
                                       if length in entries else "skipped" for length in lengths)])
        lines += [f"### {eval_set}", ""] + table(["run", *(f"C={length}" for length in lengths)], rows)
    return lines


def report(results: dict) -> list[str]:
    return (unit_tables(results, "bits_per_byte", "Bits per byte", "bits per byte")
            + unit_tables(results, "perplexity", "Perplexity", "per-byte perplexity"))


MEASURE = Measure("totals", UNITS, compute, Totals.from_json, report)
