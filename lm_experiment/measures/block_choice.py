"""Which blocks a `topk` layer chose on the eval documents, and how far back: for every layer that chooses,
the share of choices at each distance (query block minus chosen block, in blocks), their mean, and the share
that picked the block just before. Counted over the query blocks that hold predicted tokens, every KV head
and every choice slot that found an earlier block; runs without a `topk` layer have no entry."""

from __future__ import annotations

import dataclasses

import numpy as np

from lm_experiment.measures.base import Measure, ScoredLength
from lm_experiment.report_text import length_entries, table

KEY = "block_choice"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    layer: int
    size: int  # B of the layer's topk
    choices: int
    mean_distance: float | None  # in blocks
    previous_block_share: float | None
    distance_counts: list[int]  # [d] = choices at distance d blocks (index 0 unused: the own block is static)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BlockChoice:
    layers: list[LayerChoice]

    @classmethod
    def from_json(cls, entry: dict) -> BlockChoice | None:
        value = entry.get(KEY)
        return None if value is None else cls([LayerChoice(**layer) for layer in value])

    def to_json(self) -> dict:
        return {KEY: [layer.to_json() for layer in self.layers]}


def layer_choice(layer: int, size: int, chosen: np.ndarray, targets: np.ndarray) -> LayerChoice:
    """chosen int32 [windows, kv_heads, query blocks, K] (-1: none); targets [windows]: predicted tokens."""
    query_block = np.arange(chosen.shape[2])
    used = query_block[None, :] * size < targets[:, None]  # [windows, query blocks]: holds a predicted token
    distance = query_block[None, None, :, None] - chosen
    counted = (chosen >= 0) & used[:, None, :, None]
    distances = distance[counted]
    counts = np.bincount(distances, minlength=chosen.shape[2]).tolist() if distances.size else []
    return LayerChoice(layer, size, int(distances.size), float(distances.mean()) if distances.size else None,
                       float((distances == 1).mean()) if distances.size else None, counts)


def compute(scored: ScoredLength) -> BlockChoice | None:
    if scored.choices is None:
        return None
    return BlockChoice([layer_choice(layer, size, chosen, scored.targets)
                        for layer, (size, chosen) in sorted(scored.choices().items())])


def report(results: dict) -> list[str]:
    rows = []
    for model in results["models"]:
        for eval_set in results["settings"]["eval_sets"]:
            for length, entry in sorted(length_entries(model, eval_set).items()):
                choice = BlockChoice.from_json(entry)
                for layer in [] if choice is None else choice.layers:
                    mean = "-" if layer.mean_distance is None else f"{layer.mean_distance:.2f}"
                    share = "-" if layer.previous_block_share is None else f"{layer.previous_block_share:.2f}"
                    rows.append([model["label"], eval_set, str(length), str(layer.layer), str(layer.choices), mean,
                                 share])
    if not rows:
        return []
    return (["## Blocks chosen by content (topk)", "",
             "For each layer that chooses its blocks: how many choices were made on the eval windows (query blocks "
             "with predicted tokens, every KV head), their mean distance back in blocks, and the share that chose the "
             "block just before. The full distance counts are in results.json (`block_choice`).", ""]
            + table(["run", "eval set", "C", "layer", "choices", "mean distance (blocks)", "previous block"], rows))


MEASURE = Measure("block_choice", (KEY,), compute, BlockChoice.from_json, report)
