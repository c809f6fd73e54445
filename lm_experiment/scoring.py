"""Scoring a run on documents: windows, batched forward passes, per-position losses, the context ablation."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm_experiment.eval_options import PAIRED_START_OFFSETS, EvalOptions
from lm_experiment.eval_runs import BlockGrid
from lm_experiment.eval_statistics import (block_offsets, bucket_curve, bucket_sums, edge_offsets, excess_interval,
                                          log_position_edges, loss_interval, position_buckets)
from lm_experiment.model import DecoderLM

class Scorer:
    """Next-token NLL of one model, jitted and compiled once per input shape:
    tokens int32 [batch, width] -> nll float32 [batch, width - 1] (token t + 1 predicted at position t)."""

    def __init__(self, model: DecoderLM):
        graphdef, self._state = nnx.split(model)

        def nll(state, tokens):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

        self._jitted = jax.jit(nll)
        self._compiled = {}
        self.compile_seconds = 0.0
        self.run_seconds = 0.0
        self.tokens = 0

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        shape = tokens.shape
        if shape not in self._compiled:
            start = time.perf_counter()
            self._compiled[shape] = self._jitted.lower(self._state, jax.ShapeDtypeStruct(shape, jnp.int32)).compile()
            self.compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        nll = np.asarray(self._compiled[shape](self._state, jnp.asarray(tokens, jnp.int32)))
        self.run_seconds += time.perf_counter() - start
        self.tokens += shape[0] * (shape[1] - 1)
        return nll

    def score_rows(self, rows: np.ndarray, batch_size: int, bar=None) -> np.ndarray:
        """NLL of every row of rows int32 [n, width], in batches of batch_size (the last one padded)."""
        count, width = rows.shape
        padded = np.concatenate([rows, np.zeros(((-count) % batch_size, width), rows.dtype)])
        nll = np.empty((len(padded), width - 1), np.float32)
        for start in range(0, len(padded), batch_size):
            nll[start:start + batch_size] = self(padded[start:start + batch_size])
            if bar is not None:
                bar.update(min(batch_size, max(count - start, 0)) * (width - 1))
        return nll[:count]


def document_windows(documents: Sequence[np.ndarray], length: int):
    """(rows int32 [windows, length + 1], document int64 [windows], start int64 [windows], targets int64
    [windows]): non-overlapping windows sharing their edge token; row r predicts targets[r] tokens (the
    rest is padding)."""
    rows, owner, starts, targets = [], [], [], []
    for index, tokens in enumerate(documents):
        predicted = len(tokens) - 1
        for start in range(0, max(predicted, 0), length):
            piece = np.asarray(tokens[start:start + length + 1], np.int32)
            rows.append(np.pad(piece, (0, length + 1 - len(piece))))
            owner.append(index)
            starts.append(start)
            targets.append(min(length, predicted - start))
    if not rows:
        return (np.zeros((0, length + 1), np.int32), *(np.zeros(0, np.int64) for _ in range(3)))
    return np.stack(rows), np.array(owner), np.array(starts), np.array(targets)


def planned_tokens(documents: Sequence[np.ndarray], length: int, width: int, ablation_targets: int) -> int:
    """Tokens `evaluate_length` will run through the model (windows, then the ablation's rows), for progress."""
    targets = np.concatenate([np.zeros(0, np.int64)] + [
        np.minimum(length, max(len(d) - 1, 0) - np.arange(0, max(len(d) - 1, 0), length)) for d in documents])
    tokens = len(targets) * length
    if length > width:
        chosen = ablation_positions(length, width, ablation_targets)
        tokens += int((chosen[None, :] < targets[:, None]).sum()) * width
    return tokens


def ablation_positions(length: int, width: int, count: int) -> np.ndarray:
    """Window positions re-scored by the distant-context ablation: up to `count` evenly spaced positions of
    the trailing window [length - width, length) that have more than `width` tokens of context (i >= width),
    always including the last position. Empty when length <= width."""
    first = max(length - width, width)
    if first >= length:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(length - 1, first, min(count, length - first)).round().astype(np.int64))


def evaluate_length(scorer: Scorer, documents: Sequence[np.ndarray], length: int, *, grid: BlockGrid, width: int,
                    options: EvalOptions, bar=None) -> dict:
    """Every measure of one model at context length `length` on `documents` (see the module docstring)."""
    rows, owner, _, targets = document_windows(documents, length)
    if not len(rows):
        raise ValueError("the eval set has no tokens to predict (every document is shorter than 2 tokens)")
    num_docs = len(documents)
    batch = max(1, options.batch_tokens // length)
    nll = scorer.score_rows(rows, batch, bar)  # [windows, length]
    positions = np.broadcast_to(np.arange(length), nll.shape)
    scored = positions < targets[:, None]
    doc = np.broadcast_to(owner[:, None], nll.shape)[scored]
    position = positions[scored]
    loss = nll[scored].astype(np.float64)
    stats = dict(samples=options.bootstrap_samples, seed=options.seed)

    totals, counts = bucket_sums(doc, np.zeros_like(doc), loss, num_docs, 1)
    result = {
        "length": length,
        "documents": num_docs,
        "windows": len(rows),
        "tokens": int(counts.sum()),
        "nats_per_token": loss_interval(totals[:, 0], counts[:, 0], unit="nats_per_token", **stats),
        "bits_per_byte": loss_interval(totals[:, 0], counts[:, 0], **stats),
        "perplexity": loss_interval(totals[:, 0], counts[:, 0], unit="perplexity", **stats),
    }
    start = block_offsets(position, grid.size, grid.offset) < PAIRED_START_OFFSETS
    start_totals, start_counts = bucket_sums(doc[start], np.zeros(start.sum(), np.int64), loss[start], num_docs, 1)
    result["per_document"] = {  # what `paired_differences` pools over runs and pairs across variants
        "start_offsets": PAIRED_START_OFFSETS,
        "nll_nats": totals[:, 0].tolist(),
        "tokens": counts[:, 0].astype(np.int64).tolist(),
        "start_nll_nats": start_totals[:, 0].tolist(),
        "start_tokens": start_counts[:, 0].astype(np.int64).tolist(),
    }
    edges = log_position_edges(length)
    sums, counts = bucket_sums(doc, position_buckets(position, length), loss, num_docs, len(edges) - 1)
    result["by_position"] = {"edges": edges.tolist(), **bucket_curve(sums, counts, **stats)}
    result["by_block_offset"] = {"grid": grid.to_json()}
    edge = edge_offsets(grid.size)
    for name, shift in (("own", 0), ("shifted", grid.size // 2)):
        offsets = block_offsets(position, grid.size, grid.offset, shift)
        sums, counts = bucket_sums(doc, offsets, loss, num_docs, grid.size)
        near, far = (bucket_sums(doc[part], np.zeros(part.sum(), np.int64), loss[part], num_docs, 1)
                     for part in (offsets < edge, offsets >= edge))
        result["by_block_offset"][name] = {
            "shift": shift,
            **bucket_curve(sums, counts, **stats),
            "block_start_offsets": edge,
            "block_start_bits_per_byte": loss_interval(near[0][:, 0], near[1][:, 0], **stats),
            "block_rest_bits_per_byte": loss_interval(far[0][:, 0], far[1][:, 0], **stats),
            "block_start_excess_bits_per_byte": excess_interval(near, far, stats),
        }

    result["trailing_window"] = None
    result["distant_context_ablation"] = None
    if length > width:
        trailing = position >= length - width
        sums, counts = bucket_sums(doc[trailing], np.zeros(trailing.sum(), np.int64), loss[trailing], num_docs, 1)
        result["trailing_window"] = {"width": width, "tokens": int(counts.sum()),
                                     "bits_per_byte": loss_interval(sums[:, 0], counts[:, 0], **stats)}
        result["distant_context_ablation"] = _ablation(scorer, rows, owner, targets, nll, length, width, num_docs,
                                                       options, bar)
    return result


def _ablation(scorer, rows, owner, targets, nll, length, width, num_docs, options, bar) -> dict | None:
    chosen = ablation_positions(length, width, options.ablation_targets)
    row_index, position = np.nonzero(chosen[None, :] < targets[:, None])
    position = chosen[position]
    if not len(row_index):
        return None
    # Row r, position i predicts row token i + 1 from tokens 0..i; truncated: from tokens i - width + 1..i.
    gather = position[:, None] + np.arange(-width + 1, 2)[None, :]
    truncated = rows[row_index[:, None], gather]  # [targets, width + 1]
    truncated_nll = scorer.score_rows(truncated, max(1, options.batch_tokens // width), bar)[:, -1].astype(np.float64)
    full_nll = nll[row_index, position].astype(np.float64)
    doc = owner[row_index]
    zeros = np.zeros(len(doc), np.int64)
    full, counts = bucket_sums(doc, zeros, full_nll, num_docs, 1)
    cut, _ = bucket_sums(doc, zeros, truncated_nll, num_docs, 1)
    stats = dict(samples=options.bootstrap_samples, seed=options.seed)
    return {
        "width": width,
        "targets": int(counts.sum()),
        "positions": chosen.tolist(),
        "full_bits_per_byte": loss_interval(full[:, 0], counts[:, 0], **stats),
        "truncated_bits_per_byte": loss_interval(cut[:, 0], counts[:, 0], **stats),
        "delta_bits_per_byte": loss_interval(cut[:, 0] - full[:, 0], counts[:, 0], **stats),
    }
