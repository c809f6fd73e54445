"""Markdown text for the evaluation report and its measures: tables, numbers, intervals, and which context
lengths of a results dict to show."""

from __future__ import annotations

from typing import Any


def number_text(value, spec: str = ".3f") -> str:
    """value formatted by spec; one that rounds to zero loses its sign ("-0.000" would claim a direction)."""
    if value is None:
        return "–"
    text = format(value, spec)
    return text.lstrip("+-") if float(text.replace(",", "")) == 0 else text


def interval_text(interval: Any, digits: int = 3) -> str:
    """"mean [low, high]" of an Interval (or None: "–"); just the mean where the interval has no bounds."""
    if interval is None or interval.mean is None:
        return "–"
    mean = number_text(interval.mean, f".{digits}f")
    if interval.low is None:
        return mean
    return f"{mean} [{number_text(interval.low, f'.{digits}f')}, {number_text(interval.high, f'.{digits}f')}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def length_entries(model: dict, eval_set: str) -> dict[int, dict]:
    """C -> the results entry of one run on one eval set at context length C."""
    return {entry["length"]: entry for entry in model["language_model"][eval_set]["lengths"]}


def common_lengths(results: dict, eval_set: str) -> list[int]:
    """Lengths every run was evaluated at on eval_set, ascending."""
    sets = [set(length_entries(model, eval_set)) for model in results["models"]]
    return sorted(set.intersection(*sets))


def training_length_shown(results: dict, eval_set: str) -> int:
    """The length of the block-offset plot and table: the longest training length if every run was evaluated
    there, else the longest common length at or below it, else the shortest common length."""
    common = common_lengths(results, eval_set)
    longest_train = max(model["training"]["seq_len"] for model in results["models"])
    at_or_below = [length for length in common if length <= longest_train]
    return at_or_below[-1] if at_or_below else common[0]
