"""Scoring a run on documents: windows, batched forward passes, per-position losses, handed to the measures."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm_experiment.eval_options import EvalOptions
from lm_experiment.eval_runs import BlockGrid
from lm_experiment.measures import MEASURES, ScoredLength
from lm_experiment.measures.trailing import ablation_positions
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
        # {layer: B} of the layers whose pattern chooses blocks by content (topk(B, K)).
        self.choice_sizes = {index: block.attention.pattern.block_selection().size
                             for index, block in enumerate(model.blocks)
                             if block.attention.pattern.block_selection() is not None}
        self._choices = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).block_choices(tokens[:, :-1]))
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

    def choices(self, rows: np.ndarray, batch_size: int) -> dict[int, tuple[int, np.ndarray]]:
        """{layer: (B, int32 [n, kv_heads, query blocks, K])}: the blocks each `topk(B, K)` layer chooses on the
        windows rows int32 [n, width] (their inputs, all but the last token)."""
        count, width = rows.shape
        padded = np.concatenate([rows, np.zeros(((-count) % batch_size, width), rows.dtype)])
        parts = [self._choices(self._state, jnp.asarray(padded[start:start + batch_size], jnp.int32))
                 for start in range(0, len(padded), batch_size)]
        return {layer: (self.choice_sizes[layer], np.concatenate([np.asarray(part[layer]) for part in parts])[:count])
                for layer in parts[0]}

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


def evaluate_length(scorer: Scorer, documents: Sequence[np.ndarray], length: int, *, grid: BlockGrid, width: int,
                    options: EvalOptions, bar=None) -> dict:
    """One model's entry of results.json at context length `length` on `documents`: the windows and tokens
    scored, then what every measure of `lm_experiment.measures.MEASURES` adds (see the module docstring)."""
    rows, owner, _, targets = document_windows(documents, length)
    if not len(rows):
        raise ValueError("the eval set has no tokens to predict (every document is shorter than 2 tokens)")
    batch = max(1, options.batch_tokens // length)
    nll = scorer.score_rows(rows, batch, bar)  # [windows, length]
    positions = np.broadcast_to(np.arange(length), nll.shape)
    predicted = positions < targets[:, None]  # [windows, length]; False on the padding
    scored = ScoredLength(
        length=length, num_docs=len(documents), grid=grid, width=width, samples=options.bootstrap_samples,
        seed=options.seed, ablation_targets=options.ablation_targets,
        doc=np.broadcast_to(owner[:, None], nll.shape)[predicted], position=positions[predicted],
        loss=nll[predicted].astype(np.float64), rows=rows, owner=owner, targets=targets, nll=nll,
        rescore=lambda cut: scorer.score_rows(cut, max(1, options.batch_tokens // width), bar),
        choices=(lambda: scorer.choices(rows, batch)) if scorer.choice_sizes else None)
    result = {"length": length, "documents": len(documents), "windows": len(rows), "tokens": int(predicted.sum())}
    for measure in MEASURES:
        result.update(measure.entry(scored))
    return result
