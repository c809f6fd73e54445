"""What every evaluation measure shares: the scored tokens it reads, the typed values it returns, and the
`Measure` entry that the registry (`lm_experiment.measures.MEASURES`) holds."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from lm_experiment.eval_runs import BlockGrid
from lm_experiment.eval_statistics import bucket_sums


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval (low and high are None where none was computed)."""

    mean: float | None
    low: float | None
    high: float | None

    @classmethod
    def from_json(cls, value: dict | None) -> Interval | None:
        return None if value is None else cls(value["mean"], value.get("low"), value.get("high"))

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


@dataclasses.dataclass(frozen=True)
class Curve:
    """Bits per byte of each bucket with its interval, and the bucket's token count."""

    tokens: list[int]
    mean: list[float | None]
    low: list[float | None]
    high: list[float | None]

    @classmethod
    def from_json(cls, value: dict) -> Curve:
        return cls(value["tokens"], value["mean"], value["low"], value["high"])

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "mean": self.mean, "low": self.low, "high": self.high}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, low, high) as float arrays, None as NaN."""
        return tuple(np.array([np.nan if v is None else v for v in values], float)
                     for values in (self.mean, self.low, self.high))


@dataclasses.dataclass(frozen=True)
class ScoredLength:
    """What every measure of one (run, eval set, context length C) reads.

    doc, position, loss: int, int, float64 [tokens]; each predicted token's document index, window position
    and negative log-likelihood in nats. rows int32 [windows, C + 1], owner int64 [windows], targets int64
    [windows] and nll float32 [windows, C]: the windows as scored (`scoring.document_windows`).
    rescore(rows int32 [n, W + 1]) -> nll float32 [n, W] scores other windows of width W = `width` with the
    same model (the distant-context ablation). choices() -> {layer: (B, int32 [windows, kv_heads, query blocks,
    K])} gives the blocks each `topk(B, K)` layer chose on the windows (None when no layer chooses).
    """

    length: int
    num_docs: int
    grid: BlockGrid
    width: int
    samples: int
    seed: int
    ablation_targets: int
    doc: np.ndarray
    position: np.ndarray
    loss: np.ndarray
    rows: np.ndarray
    owner: np.ndarray
    targets: np.ndarray
    nll: np.ndarray
    rescore: Callable[[np.ndarray], np.ndarray]
    choices: Callable[[], dict[int, tuple[int, np.ndarray]]] | None = None

    @functools.cached_property
    def document_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(NLL nats, tokens) [documents, 1]: each document's loss sum and token count, for every measure that
        pools over documents."""
        return bucket_sums(self.doc, np.zeros_like(self.doc), self.loss, self.num_docs, 1)

    @property
    def stats(self) -> dict:
        """The bootstrap settings, as the interval functions of `eval_statistics` take them."""
        return {"samples": self.samples, "seed": self.seed}


class Result(Protocol):
    def to_json(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Measure:
    """One registered measure.

    keys:    the keys it writes into a length's entry of results.json (each None where it does not apply)
    compute: ScoredLength -> its typed result, or None where it does not apply at this length
    read:    a length's entry of results.json -> the typed result, or None
    report:  results -> its section of report.md (markdown lines), or None when it has no section of its own
    """

    name: str
    keys: tuple[str, ...]
    compute: Callable[[ScoredLength], Result | None]
    read: Callable[[dict], Any]
    report: Callable[[dict], list[str]] | None = None

    def entry(self, scored: ScoredLength) -> dict:
        """Its part of a length's entry in results.json."""
        result = self.compute(scored)
        return dict.fromkeys(self.keys) if result is None else result.to_json()
