"""Long-context evaluation of trained runs (docs/evaluation.md defines every measure).

    runs = load_runs(["runs/main/dense", "runs/main/block"])      # latest checkpoints, trained patterns
    results = evaluate(runs, EvalOptions(lengths=(64, 256, 1024)))
    report.write_report(results, "reports/compare")

For each run, eval set (corpus:split, the held-out long documents by default) and context length C:

  windows     every document is cut into non-overlapping windows of C + 1 tokens that share their edge
              token, so each token after a document's first is predicted exactly once, at window
              position i = (t - 1) mod C with i + 1 tokens of context; the last window is padded and
              masked, so no token is dropped
  sums        token-weighted negative log-likelihood per document; bits per byte and perplexity of the
              pooled sums, with percentile bootstrap intervals over documents (documents resampled with
              replacement, the token-weighted mean recomputed, fixed seed)
  position    loss in log-spaced buckets of i: [0, 1), [1, 2), [2, 4), ..., [2^k, C)
  block       loss by offset within the block, on the model's own grid and on one shifted by B / 2
  trailing    loss of window positions i >= C - W (the last W positions of a window)
  ablation    for trailing targets with more than W tokens of context: the loss with the context cut
              to exactly the last W tokens, minus the loss with the whole window (the delta, with an
              interval over documents)
  per document  each document's NLL sum and token count, overall and at own-grid offsets < 8, kept in the
              results so that runs evaluated apart can be paired later

Across runs (`paired_differences`, also after `merge_results` of separately written results): each
variant's bits per byte minus each baseline's (dense, plain block), seeds pooled per document, with a
paired bootstrap interval over documents. A "document" is a unit: a whole document or, with
`document_chunk_tokens`, a chunk of one.

Forward passes are batched to about `batch_tokens` tokens and compiled once per (run, shape). The
synthetic boundary diagnostics (`lm_experiment.diagnostics`) run after the language-model part.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx
from tqdm import tqdm

from lm_experiment import data, diagnostics
from lm_experiment.checkpointing import CHECKPOINT_DIR, CONFIG_FILE, restore_model
from lm_experiment.config import ExperimentConfig
from lm_experiment.model import DecoderLM
from lm_experiment.training import SUMMARY_FILE
from sparse_attention import reachability
from sparse_attention.config_files import load_config_file
from sparse_attention.patterns import Block, PatternOrSchedule, as_schedule, parse

LN2 = math.log(2.0)
DEFAULT_EVAL_SETS = ("code:long", "books:long")
# Model fields that fix the shapes of the parameters: an eval config must keep the checkpoint's values.
SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_hidden", "tie_embeddings")
# Config fields whose change alters what the model computes; a changed one is named in the run's label.
COMPUTE_FIELDS = ("model.rope_base", "model.compute_dtype", "attention.pattern", "attention.schedule")
# Paired differences at block start: window positions at offsets < this on the run's own grid (shift 0).
PAIRED_START_OFFSETS = 8
# Settings two results files must share to be merged: everything that changes which tokens are scored or
# how a number and its interval are computed (batch_tokens and data_dir change neither).
MERGED_SETTINGS = ("lengths", "max_documents", "max_document_tokens", "document_chunk_tokens", "eval_sets",
                   "reference_block_size", "trailing_window", "ablation_targets", "bootstrap_samples", "confidence",
                   "seed", "diagnostics")


# --------------------------------------------------------------------------------------------------
# Statistics


def bootstrap_ratio(numerators, denominators, *, samples: int, seed: int, confidence: float = 0.95):
    """Pooled ratio sum_d numerators[d] / sum_d denominators[d] with a percentile bootstrap interval.

    numerators, denominators: float [documents, ...] (per-document sums, e.g. NLL and token counts).
    Each of `samples` resamples draws the documents with replacement (multinomial counts, generator
    seeded by `seed`) and recomputes the ratio of every trailing entry. Returns (point, low, high), each
    of the trailing shape; NaN where no tokens back an entry (resamples without tokens for an entry are
    left out of that entry's percentiles).
    """
    numerators = np.asarray(numerators, np.float64)
    denominators = np.asarray(denominators, np.float64)
    if numerators.shape != denominators.shape:
        raise ValueError(f"numerators {numerators.shape} and denominators {denominators.shape} differ in shape")
    if numerators.ndim == 0 or numerators.shape[0] == 0:
        raise ValueError("bootstrap needs at least one document")
    documents, shape = numerators.shape[0], numerators.shape[1:]
    flat_num = numerators.reshape(documents, -1)
    flat_den = denominators.reshape(documents, -1)
    point = _safe_ratio(flat_num.sum(0), flat_den.sum(0))
    counts = _document_resamples(documents, samples, seed)
    resampled = _safe_ratio(counts @ flat_num, counts @ flat_den)  # [samples, entries]
    low, high = _percentile_interval(resampled, confidence)
    return point.reshape(shape), low.reshape(shape), high.reshape(shape)


def bootstrap_ratio_difference(numerators_a, denominators_a, numerators_b, denominators_b, *, samples: int,
                               seed: int, confidence: float = 0.95):
    """Paired: (sum num_a / sum den_a) - (sum num_b / sum den_b) over per-document sums [documents], with a
    percentile interval from resampling the documents once for both ratios. Between-document variation
    common to both (a hard document is hard everywhere) cancels, which separate intervals cannot show."""
    parts = [np.asarray(x, np.float64) for x in (numerators_a, denominators_a, numerators_b, denominators_b)]
    if any(part.ndim != 1 or part.shape != parts[0].shape for part in parts) or parts[0].shape[0] == 0:
        raise ValueError(f"paired bootstrap needs four per-document vectors of one length; got shapes "
                         f"{[part.shape for part in parts]}")
    num_a, den_a, num_b, den_b = parts
    point = _safe_ratio(num_a.sum(), den_a.sum()) - _safe_ratio(num_b.sum(), den_b.sum())
    counts = _document_resamples(len(num_a), samples, seed)
    resampled = _safe_ratio(counts @ num_a, counts @ den_a) - _safe_ratio(counts @ num_b, counts @ den_b)
    low, high = _percentile_interval(resampled[:, None], confidence)
    return float(point), float(low[0]), float(high[0])


def _document_resamples(documents: int, samples: int, seed: int) -> np.ndarray:
    """int [samples, documents]: how often each resample draws each document (with replacement)."""
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    return np.random.default_rng(seed).multinomial(documents, np.full(documents, 1.0 / documents), size=samples)


def _percentile_interval(resampled, confidence: float):
    """(low, high) per column of resampled [samples, entries]; NaN where no resample backs an entry."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2 * 100
    low = np.full(resampled.shape[1], np.nan)
    high = np.full(resampled.shape[1], np.nan)
    backed = ~np.isnan(resampled).all(axis=0)
    if backed.any():
        low[backed], high[backed] = np.nanpercentile(resampled[:, backed], [tail, 100 - tail], axis=0)
    return low, high


def _safe_ratio(numerator, denominator):
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def bits_per_byte(nll_nats_per_token, bytes_per_token: float = 1.0):
    """Mean NLL in nats per token -> bits per byte (byte-level tokens: bytes_per_token = 1)."""
    return np.asarray(nll_nats_per_token, np.float64) / LN2 / bytes_per_token


def perplexity(nll_nats_per_token):
    """exp(mean NLL per token): the per-token (here per-byte) perplexity."""
    return np.exp(np.asarray(nll_nats_per_token, np.float64))


def log_position_edges(length: int) -> np.ndarray:
    """int64 edges [0, 1, 2, 4, ..., 2^k, length] of the log-spaced position buckets of a window of `length`:
    bucket b holds positions edges[b] <= i < edges[b + 1]."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    powers = [1 << j for j in range(max(length - 1, 1).bit_length()) if (1 << j) < length]
    return np.array([0, *powers, length], np.int64)


def position_buckets(positions, length: int) -> np.ndarray:
    """Bucket index (into `log_position_edges(length)`) of each window position in [0, length)."""
    return np.searchsorted(log_position_edges(length), np.asarray(positions), side="right") - 1


def block_offsets(positions, size: int, grid_offset: int = 0, shift: int = 0) -> np.ndarray:
    """Offset of each position within its block on a grid of blocks of `size` whose edges sit where
    block(size, grid_offset) puts them (position p starts a block when (p + grid_offset) % size == 0),
    moved right by `shift` (size // 2 for the control grid)."""
    return (np.asarray(positions, np.int64) + grid_offset - shift) % size


def edge_offsets(size: int) -> int:
    """How many offsets at the start of a block count as "block start" in the summaries: max(1, size // 8)."""
    return max(1, size // 8)


def bucket_sums(documents, buckets, values, num_documents: int, num_buckets: int):
    """Per-document, per-bucket (sum of values, count): float64 [num_documents, num_buckets] each."""
    index = np.asarray(documents, np.int64) * num_buckets + np.asarray(buckets, np.int64)
    size = num_documents * num_buckets
    sums = np.bincount(index, weights=np.asarray(values, np.float64), minlength=size)
    counts = np.bincount(index, minlength=size).astype(np.float64)
    return sums.reshape(num_documents, num_buckets), counts.reshape(num_documents, num_buckets)


def _number(value):
    """A float for JSON, None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else value


def _numbers(values):
    return [_number(v) for v in np.ravel(values)]


def loss_interval(nll_sums, counts, *, samples: int, seed: int, unit: str = "bits_per_byte") -> dict:
    """{"mean", "low", "high"} of the pooled loss of per-document sums [documents] in `unit`
    ("bits_per_byte", "perplexity" or "nats_per_token")."""
    point, low, high = bootstrap_ratio(nll_sums, counts, samples=samples, seed=seed)
    convert = {"bits_per_byte": bits_per_byte, "perplexity": perplexity, "nats_per_token": np.asarray}[unit]
    return {key: _number(convert(value)) for key, value in (("mean", point), ("low", low), ("high", high))}


def difference_interval(nll_a, tokens_a, nll_b, tokens_b, *, samples: int, seed: int,
                        confidence: float = 0.95) -> dict:
    """{"mean", "low", "high"} in bits per byte of the pooled loss of per-document sums a minus that of b
    ([documents] each, nats and tokens), paired: one resample of the documents for both."""
    point, low, high = bootstrap_ratio_difference(nll_a, tokens_a, nll_b, tokens_b, samples=samples, seed=seed,
                                                  confidence=confidence)
    return {key: _number(bits_per_byte(value)) for key, value in (("mean", point), ("low", low), ("high", high))}


def _excess_interval(near, far, stats: dict) -> dict:
    """Block start minus block rest, bits per byte, paired over documents; near/far: (sums, counts)
    [documents, 1] each."""
    return difference_interval(near[0][:, 0], near[1][:, 0], far[0][:, 0], far[1][:, 0], **stats)


def _curve(sums, counts, *, samples: int, seed: int) -> dict:
    """Bits per byte of every bucket [documents, buckets] with intervals, and the bucket's tokens."""
    point, low, high = bootstrap_ratio(sums, counts, samples=samples, seed=seed)
    return {
        "tokens": [int(c) for c in counts.sum(0)],
        "mean": _numbers(bits_per_byte(point)),
        "low": _numbers(bits_per_byte(low)),
        "high": _numbers(bits_per_byte(high)),
    }


# --------------------------------------------------------------------------------------------------
# Runs: checkpoint, config, label


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Where block edges fall: position p starts a block when (p + offset) % size == 0. `source` says
    whether the grid is the pattern's own ("pattern") or the reference grid given to patterns without
    blocks ("reference")."""

    size: int
    offset: int
    source: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pattern_block_grid(schedule: PatternOrSchedule) -> tuple[int, int] | None:
    """(size, offset) of the block grid of the first layer's pattern (`Pattern.block_grid`), or None."""
    return as_schedule(schedule).layer(0).block_grid()


@dataclasses.dataclass(frozen=True, eq=False)
class EvalRun:
    """One trained model as evaluated: its restored parameters under the eval config."""

    label: str
    workdir: str
    step: int
    model: DecoderLM
    config: ExperimentConfig  # the eval config (the trained one unless overridden)
    trained_config: ExperimentConfig
    overrides: dict  # "section.key" -> {"trained": ..., "eval": ...}, the fields that change the computation
    train_summary: dict | None

    @property
    def schedule(self) -> PatternOrSchedule:
        return self.config.attention.layers

    @property
    def train_seq_len(self) -> int:
        return self.trained_config.train.seq_len


def parse_overrides(arguments: Sequence[str]) -> list[tuple[str, object]]:
    """`--config.SECTION.KEY=VALUE` arguments as (dotted key, value); VALUE is a Python literal when it
    parses as one (64, 1e-3, True, ("block(64)", "dense")), otherwise the string itself (window(64))."""
    overrides = []
    for argument in arguments:
        key, separator, text = argument.removeprefix("--config.").partition("=")
        if not argument.startswith("--config.") or not separator or not key:
            raise ValueError(f"expected --config.SECTION.KEY=VALUE, got {argument!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        overrides.append((key, value))
    return overrides


def _apply_override(config: dict, key: str, value) -> None:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if not isinstance(node, dict) or part not in node:
            valid = ", ".join(node) if isinstance(node, dict) else "none (not a section)"
            raise ValueError(f"--config.{key}: unknown key {part!r} in {where}; valid keys: {valid}")
        if depth == len(parts) - 1:
            node[part] = list(value) if isinstance(value, tuple) else value
        else:
            node = node[part]


def config_file_dict(location: str) -> dict:
    """The validated `to_dict()` of "path/to/config.py[:arg]" (the file's get_config(arg))."""
    return ExperimentConfig.from_config_dict(load_config_file(location)).to_dict()


def _checkpoint_location(path: str) -> tuple[Path, int]:
    """(workdir, step) of a checkpoint folder WORKDIR/checkpoints/STEP."""
    folder = Path(path)
    if folder.parent.name != CHECKPOINT_DIR or not folder.name.isdigit():
        raise ValueError(f"--checkpoint: expected a folder WORKDIR/{CHECKPOINT_DIR}/STEP, got {path!r}")
    if not folder.is_dir():
        raise ValueError(f"--checkpoint: {path} does not exist")
    return folder.parent.parent, int(folder.name)


def _labels(workdirs: Sequence[Path]) -> list[str]:
    """The workdir's name, or its path where two runs share a name."""
    names = [w.name for w in workdirs]
    return [w.name if names.count(w.name) == 1 else str(w) for w in workdirs]


def load_runs(workdirs: Sequence[str] = (), *, checkpoints: Sequence[str] = (), config_file: str | None = None,
              overrides: Sequence[tuple[str, object]] = (), pattern_override: str | None = None) -> list[EvalRun]:
    """Restores each workdir's latest checkpoint (each checkpoint folder's own step) with the config saved
    beside it.

    config_file replaces the saved configs; `overrides` (dotted key, value) apply on top; pattern_override
    sets attention.pattern and clears attention.schedule. The parameter shapes must stay those of the
    checkpoint (SHAPE_FIELDS); a changed pattern, schedule, rope_base or compute dtype is allowed and
    appears in the run's label.
    """
    locations = [(Path(w), None) for w in workdirs] + [_checkpoint_location(c) for c in checkpoints]
    if not locations:
        raise ValueError("nothing to evaluate: give --workdirs or --checkpoint")
    base = config_file_dict(config_file) if config_file else None
    runs = []
    for label, (workdir, step) in zip(_labels([w for w, _ in locations]), locations):
        if not workdir.is_dir():
            raise ValueError(f"workdir: {workdir} does not exist")
        if not (workdir / CONFIG_FILE).exists():
            raise ValueError(f"workdir: {workdir} has no {CONFIG_FILE}; is it a training workdir?")
        model, trained, step = restore_model(workdir, step)
        wanted = copy.deepcopy(base) if base is not None else trained.to_dict()
        for key, value in overrides:
            _apply_override(wanted, key, value)
        if pattern_override is not None:
            wanted["attention"]["pattern"] = pattern_override
            wanted["attention"]["schedule"] = []
        try:
            config = ExperimentConfig.from_config_dict(wanted)
        except ValueError as error:
            raise ValueError(f"eval config for {workdir}: {error}") from error
        for name in SHAPE_FIELDS:
            if getattr(config.model, name) != getattr(trained.model, name):
                raise ValueError(
                    f"model.{name}: the eval config has {getattr(config.model, name)!r} but the checkpoint in "
                    f"{workdir} was trained with {getattr(trained.model, name)!r}; its parameters fit only the "
                    f"trained shape (override patterns, not model sizes)")
        changed = {}
        for field in COMPUTE_FIELDS:
            section, key = field.split(".")
            before, now = trained.to_dict()[section][key], config.to_dict()[section][key]
            if before != now:
                changed[field] = {"trained": before, "eval": now}
        if changed or config.model != trained.model or config.attention != trained.attention:
            model = _rebuild(model, config)
        if changed:
            label = f"{label} [eval {_override_text(changed, config)}]"
        summary_path = workdir / SUMMARY_FILE
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        runs.append(EvalRun(label=label, workdir=str(workdir), step=step, model=model, config=config,
                            trained_config=trained, overrides=changed, train_summary=summary))
    return runs


def _override_text(changed: dict, config: ExperimentConfig) -> str:
    parts = []
    if "attention.pattern" in changed or "attention.schedule" in changed:
        parts.append(config.attention.spec)
    parts += [f"{field.split('.')[1]}={change['eval']}" for field, change in changed.items()
              if field.startswith("model.")]
    return ", ".join(parts)


def _rebuild(model: DecoderLM, config: ExperimentConfig) -> DecoderLM:
    """The same parameters in a DecoderLM built from `config` (another pattern or numerics)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(config.model, config.attention, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# Options


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate; None picks the default described on each field.

    eval_sets:          "corpus:split" of byte-level documents (data.load_documents)
    lengths:            context lengths C; None: T/4, T/2, T, 2T, 4T with T the longest training length
    max_documents:      per eval set, the documents at evenly spaced indices of the manifest order
    max_document_tokens: score only each document's first tokens (the same targets at every length)
    document_chunk_tokens: then cut every document into consecutive chunks of this many tokens, each one
                        unit (for windows, per-document sums and the bootstrap), named "name#0", "name#1", ...
    batch_tokens:       about this many tokens per forward pass (batch = max(1, batch_tokens // C))
    trailing_window:    W of the trailing window and the ablation; None: the reference block size
    block_size:         reference grid for patterns without blocks; None: the most common block size of
                        the runs' patterns, else T / 4
    ablation_targets:   at most this many trailing positions per window are re-scored with context W
    baselines:          eval patterns the paired differences compare every variant with; None: dense and
                        every plain block(B) among the runs (`paired_differences`)
    """

    eval_sets: tuple[str, ...] = DEFAULT_EVAL_SETS
    lengths: tuple[int, ...] | None = None
    max_documents: int | None = None
    max_document_tokens: int | None = None
    document_chunk_tokens: int | None = None
    batch_tokens: int = 8192
    trailing_window: int | None = None
    block_size: int | None = None
    ablation_targets: int = 16
    bootstrap_samples: int = 1000
    seed: int = 0
    data_dir: str | None = None
    diagnostics: diagnostics.DiagnosticsOptions | None = diagnostics.DiagnosticsOptions()
    baselines: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.eval_sets:
            raise ValueError("eval_sets: give at least one corpus:split")
        for eval_set in self.eval_sets:
            corpus, separator, split = eval_set.partition(":")
            if not separator or not corpus or not split:
                raise ValueError(f"eval_sets: expected corpus:split (e.g. code:long), got {eval_set!r}")
        if self.lengths is not None:
            if not self.lengths:
                raise ValueError("lengths: give at least one context length")
            _check_positive("lengths", *self.lengths)
        for name in ("max_documents", "max_document_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: must be an integer >= 0 or None, got {value!r}")
        chunk = self.document_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2):
            raise ValueError(f"document_chunk_tokens: must be an integer >= 2 or None (a chunk's first token is "
                             f"context only), got {chunk!r}")
        if self.baselines is not None:
            baseline_specs(self.baselines)
        _check_positive("batch_tokens", self.batch_tokens)
        _check_positive("ablation_targets", self.ablation_targets)
        _check_positive("bootstrap_samples", self.bootstrap_samples)
        for name in ("trailing_window", "block_size"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))


def _check_positive(name: str, *values) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def reference_block_size(runs: Sequence[EvalRun], options: EvalOptions) -> int:
    if options.block_size is not None:
        return options.block_size
    sizes = [grid[0] for run in runs if (grid := pattern_block_grid(run.schedule)) is not None]
    if sizes:
        return max(set(sizes), key=lambda size: (sizes.count(size), -size))
    return max(1, max(run.train_seq_len for run in runs) // 4)


def run_block_grid(run: EvalRun, reference: int) -> BlockGrid:
    grid = pattern_block_grid(run.schedule)
    return BlockGrid(*grid, "pattern") if grid is not None else BlockGrid(reference, 0, "reference")


def default_lengths(runs: Sequence[EvalRun]) -> tuple[int, ...]:
    longest = max(run.train_seq_len for run in runs)
    return tuple(sorted({max(1, longest * n // 4) for n in (1, 2, 4, 8, 16)}))


# --------------------------------------------------------------------------------------------------
# Scoring


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
    result["by_position"] = {"edges": edges.tolist(), **_curve(sums, counts, **stats)}
    result["by_block_offset"] = {"grid": grid.to_json()}
    edge = edge_offsets(grid.size)
    for name, shift in (("own", 0), ("shifted", grid.size // 2)):
        offsets = block_offsets(position, grid.size, grid.offset, shift)
        sums, counts = bucket_sums(doc, offsets, loss, num_docs, grid.size)
        near, far = (bucket_sums(doc[part], np.zeros(part.sum(), np.int64), loss[part], num_docs, 1)
                     for part in (offsets < edge, offsets >= edge))
        result["by_block_offset"][name] = {
            "shift": shift,
            **_curve(sums, counts, **stats),
            "block_start_offsets": edge,
            "block_start_bits_per_byte": loss_interval(near[0][:, 0], near[1][:, 0], **stats),
            "block_rest_bits_per_byte": loss_interval(far[0][:, 0], far[1][:, 0], **stats),
            "block_start_excess_bits_per_byte": _excess_interval(near, far, stats),
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


# --------------------------------------------------------------------------------------------------
# Orchestration


def select_documents(eval_set: str, options: EvalOptions, data_dir: str) -> tuple[list[np.ndarray], list[str], int]:
    """(documents, their names, documents in the split) of one eval set, subsampled as the options say."""
    corpus, _, split = eval_set.partition(":")
    data.require_prepared(corpus, data_dir=data_dir)
    documents = data.load_documents(corpus, split, data_dir=data_dir)
    names = data.load_manifest(corpus, data_dir=data_dir)["splits"][split]["documents"]
    if documents and documents[0].dtype != np.uint8:
        raise ValueError(f"eval set {eval_set}: bits per byte needs byte tokens (uint8), the corpus holds "
                         f"{documents[0].dtype} tokens")
    total = len(documents)
    if options.max_documents is not None and options.max_documents < total:
        picked = np.unique(np.linspace(0, total - 1, options.max_documents).round().astype(int)) \
            if options.max_documents else np.zeros(0, int)
        documents, names = [documents[i] for i in picked], [names[i] for i in picked]
    if options.max_document_tokens is not None:
        documents = [d[:options.max_document_tokens] for d in documents]
    if sum(max(len(d) - 1, 0) for d in documents) == 0:
        raise ValueError(f"eval set {eval_set} is empty: {len(documents)} of its {total} documents selected "
                         f"(max_documents={options.max_documents}, max_document_tokens="
                         f"{options.max_document_tokens}) leave no token to predict")
    return documents, names, total


def chunk_documents(documents: Sequence[np.ndarray], names: Sequence[str],
                    chunk_tokens: int) -> tuple[list[np.ndarray], list[str]]:
    """(chunks, their names): every document cut into consecutive chunks of `chunk_tokens` tokens (the last
    may be shorter), named "name#0", "name#1", ...; chunks of fewer than 2 tokens predict nothing and are
    dropped."""
    chunks, chunk_names = [], []
    for tokens, name in zip(documents, names):
        for index, start in enumerate(range(0, len(tokens), chunk_tokens)):
            if len(tokens) - start >= 2:
                chunks.append(tokens[start:start + chunk_tokens])
                chunk_names.append(f"{name}#{index}")
    return chunks, chunk_names


def _active_fraction(schedule: PatternOrSchedule, layers: int, length: int) -> float:
    causal = length * (length + 1) / 2
    return float(np.mean([schedule.layer(i).count_active(length) / causal for i in range(layers)]))


def _length_problem(run: EvalRun, length: int) -> str | None:
    try:
        run.config.attention.check_seq_len(length, field="eval length")
    except ValueError as error:
        return str(error)
    return None


def _training_facts(run: EvalRun) -> dict:
    summary = run.train_summary or {}
    layers = summary.get("attention_layers") or []
    return {
        "tokens_per_sec": summary.get("mean_tokens_per_sec"),
        "active_fraction": float(np.mean([layer["active_fraction"] for layer in layers])) if layers else None,
        "final_loss_avg": summary.get("final_loss_avg"),
        "wall_time_s": summary.get("wall_time_s"),
        "seq_len": run.train_seq_len,
        "steps": summary.get("final_step", run.step),
        "seed": run.config.seed,
    }


def _progress(total: int, description: str, unit: str):
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def evaluate(runs: Sequence[EvalRun], options: EvalOptions) -> dict:
    """Evaluates every run on every eval set and length, then the diagnostics; returns the results that
    `report.write_report` writes (every number of the report)."""
    if not runs:
        raise ValueError("nothing to evaluate: no runs")
    started = time.perf_counter()
    lengths = options.lengths or default_lengths(runs)
    chunk = options.document_chunk_tokens
    if chunk is not None and chunk < max(lengths) + 1:
        raise ValueError(f"document_chunk_tokens: chunks of {chunk} tokens hold no window of the longest length "
                         f"C = {max(lengths)}, whose context they would cut; use at least C + 1 = {max(lengths) + 1}")
    reference = reference_block_size(runs, options)
    width = options.trailing_window or reference
    data_dir = options.data_dir or runs[0].config.data.data_dir
    eval_sets = {}
    for eval_set in options.eval_sets:
        documents, names, total = select_documents(eval_set, options, data_dir)
        eval_sets[eval_set] = {"total": total, "selected": len(documents)}
        if options.document_chunk_tokens is not None:
            documents, names = chunk_documents(documents, names, options.document_chunk_tokens)
        eval_sets[eval_set].update(documents=documents, names=names)

    models = []
    for run in tqdm(runs, desc="models", unit="model", dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 30.0):
        run_started = time.perf_counter()
        grid = run_block_grid(run, reference)
        usable = [length for length in lengths if _length_problem(run, length) is None]
        skipped = [{"length": length, "reason": _length_problem(run, length)} for length in lengths
                   if length not in usable]
        if not usable:
            raise ValueError(f"{run.label}: none of the lengths {list(lengths)} can be evaluated: "
                             f"{skipped[0]['reason']}")
        scorer = Scorer(run.model)
        work = sum(planned_tokens(s["documents"], length, width, options.ablation_targets)
                   for s in eval_sets.values() for length in usable)
        language = {}
        with _progress(work, run.label, "tok") as bar:
            for eval_set, selected in eval_sets.items():
                per_length = []
                for length in usable:
                    bar.set_description(f"{run.label} {eval_set} C={length} ({len(selected['documents'])} docs)")
                    per_length.append(evaluate_length(scorer, selected["documents"], length, grid=grid, width=width,
                                                      options=options, bar=bar))
                language[eval_set] = {"lengths": per_length, "skipped": skipped, "document_names": selected["names"]}
        reach_length = max(usable)
        reach = reachability.reachability(run.schedule, reach_length, run.config.model.num_layers)
        entry = {
            "label": run.label,
            "workdir": run.workdir,
            "step": run.step,
            "trained_pattern": run.trained_config.attention.spec,
            "eval_pattern": run.config.attention.spec,
            "overrides": run.overrides,
            "num_layers": run.config.model.num_layers,
            "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(run.model, nnx.Param)))),
            "block_grid": grid.to_json(),
            "training": _training_facts(run),
            "active_fraction": {str(length): _active_fraction(run.schedule, run.config.model.num_layers, length)
                                for length in usable},
            "language_model": language,
            "eval_tokens_per_sec": scorer.tokens / scorer.run_seconds if scorer.run_seconds else None,
            "compile_seconds": scorer.compile_seconds,
            "reachability": reach.to_json(),
        }
        if options.diagnostics is not None:
            entry["diagnostics"] = diagnostics.run_diagnostics(run.model, run.config, grid.size, grid.offset,
                                                               options.diagnostics, label=run.label,
                                                               train_seq_len=run.train_seq_len)
        entry["eval_seconds"] = time.perf_counter() - run_started
        models.append(entry)

    settings = {
        "lengths": list(lengths),
        "eval_sets": {name: {"documents": s["selected"], "documents_in_split": s["total"],
                             "document_names": s["names"],
                             "tokens": int(sum(len(d) for d in s["documents"]))}
                      for name, s in eval_sets.items()},
        "max_documents": options.max_documents,
        "max_document_tokens": options.max_document_tokens,
        "document_chunk_tokens": options.document_chunk_tokens,
        "reference_block_size": reference,
        "trailing_window": width,
        "ablation_targets": options.ablation_targets,
        "bootstrap_samples": options.bootstrap_samples,
        "confidence": 0.95,
        "seed": options.seed,
        "batch_tokens": options.batch_tokens,
        "data_dir": str(data_dir),
        "diagnostics": dataclasses.asdict(options.diagnostics) if options.diagnostics is not None else None,
    }
    paired, paired_skipped = paired_differences(models, settings, options.baselines)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "settings": settings,
        "models": models,
        "paired": paired,
        "paired_skipped": paired_skipped,
        "wall_time_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------
# Across runs: paired differences, merged results


def baseline_specs(baselines: Sequence[str]) -> tuple[str, ...]:
    """The canonical specs of baseline patterns ("block(512, 0)" -> "block(512)"), each once."""
    if isinstance(baselines, str):
        raise ValueError(f"baselines: expected a sequence of pattern specs, got the string {baselines!r}")
    specs = []
    for spec in baselines:
        try:
            specs.append(parse(spec).spec)
        except ValueError as error:
            raise ValueError(f"baselines: {str(error).splitlines()[0]}") from error
    return tuple(dict.fromkeys(specs))


def variant_name(model: dict) -> str:
    """The variant a run (a `results["models"]` entry) is a seed of: its eval pattern, followed by the trained
    value of each field the evaluation overrode (a dense model evaluated as window(64) is no seed of a model
    trained as window(64))."""
    overrides = model.get("overrides") or {}
    if not overrides:
        return model["eval_pattern"]
    trained = ", ".join(f"{field} {change['trained']}" for field, change in sorted(overrides.items()))
    return f"{model['eval_pattern']} [trained {trained}]"


def default_baselines(models: Sequence[dict]) -> tuple[str, ...]:
    """dense and every plain block(B) (one pattern for all layers, offset 0) that a run evaluates unchanged."""
    blocks = [m["eval_pattern"] for m in models
              if not m.get("overrides") and isinstance(block := parse(m["eval_pattern"]), Block) and block.offset == 0]
    return tuple(dict.fromkeys(["dense", *blocks]))


def paired_differences(models: Sequence[dict], settings: dict,
                       baselines: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(differences, skipped): each variant's loss minus each baseline's, per eval set and length, in bits per
    byte, overall and at block start (own-grid offsets < PAIRED_START_OFFSETS), paired over documents.

    models, settings: those of a results dict. The runs of one variant (`variant_name`, the eval pattern) are
    its seeds: their per-document sums are added, which makes each document's loss the seed average, and
    `bootstrap_ratio_difference` resamples the documents once for both sides. baselines: pattern specs; None:
    `default_baselines`. A pair is compared only where every run of both sides has per-document sums over the
    same document names on the same block grid; otherwise it goes to `skipped` with the reason.

    differences: {variant, baseline, variant_runs, baseline_runs, eval_set, length, documents, overall,
    block_start ({mean, low, high} each), per_run_overall and per_run_block_start ({run label: point
    difference of that run alone against the pooled baseline}), seed_matched (`_seed_matched`)}. skipped:
    {variant, baseline, eval_set, length, reason}, None where the reason holds for every eval set or length.
    """
    groups: dict[str, list[dict]] = {}
    for model in models:
        groups.setdefault(variant_name(model), []).append(model)
    wanted = default_baselines(models) if baselines is None else baseline_specs(baselines)
    stats = dict(samples=settings["bootstrap_samples"], seed=settings["seed"],
                 confidence=settings.get("confidence", 0.95))
    differences, skipped = [], []
    for baseline in wanted:
        if baseline not in groups:
            if baselines is not None:
                skipped.append({"variant": None, "baseline": baseline, "eval_set": None, "length": None,
                                "reason": "no run evaluates this pattern unchanged"})
            continue
        for variant, variant_runs in groups.items():
            if variant == baseline:
                continue
            baseline_runs = groups[baseline]
            pair = {"variant": variant, "baseline": baseline}
            problem = _grid_problem([*variant_runs, *baseline_runs])
            if problem:
                skipped.append({**pair, "eval_set": None, "length": None, "reason": problem})
                continue
            for eval_set in settings["eval_sets"]:
                problem = _names_problem([*variant_runs, *baseline_runs], eval_set)
                if problem:
                    skipped.append({**pair, "eval_set": eval_set, "length": None, "reason": problem})
                    continue
                lengths = set.intersection(*(set(_length_entries(m, eval_set))
                                             for m in [*variant_runs, *baseline_runs]))
                for length in sorted(lengths):
                    variant_entries = [_length_entries(m, eval_set)[length] for m in variant_runs]
                    baseline_entries = [_length_entries(m, eval_set)[length] for m in baseline_runs]
                    problem = _sums_problem([*variant_runs, *baseline_runs], [*variant_entries, *baseline_entries],
                                            eval_set)
                    if problem:
                        skipped.append({**pair, "eval_set": eval_set, "length": length, "reason": problem})
                        continue
                    differences.append({
                        **pair,
                        "variant_runs": [m["label"] for m in variant_runs],
                        "baseline_runs": [m["label"] for m in baseline_runs],
                        "eval_set": eval_set,
                        "length": length,
                        **_paired_numbers(variant_runs, variant_entries, baseline_runs, baseline_entries, stats),
                    })
    return differences, skipped


def _length_entries(model: dict, eval_set: str) -> dict[int, dict]:
    return {entry["length"]: entry for entry in model["language_model"][eval_set]["lengths"]}


def _grid_problem(runs: Sequence[dict]) -> str | None:
    grids = [(m["block_grid"]["size"], m["block_grid"]["offset"]) for m in runs]
    other = next((i for i, grid in enumerate(grids) if grid != grids[0]), None)
    if other is None:
        return None
    return (f"block grids differ: {runs[0]['label']} has B={grids[0][0]} offset {grids[0][1]}, {runs[other]['label']} "
            f"B={grids[other][0]} offset {grids[other][1]} (block start would mean other positions)")


def _names_problem(runs: Sequence[dict], eval_set: str) -> str | None:
    names = [m["language_model"][eval_set].get("document_names") for m in runs]
    missing = next((m["label"] for m, n in zip(runs, names) if n is None), None)
    if missing is not None:
        return f"{missing} has no per-document sums (results written before they existed)"
    other = next((i for i, n in enumerate(names) if n != names[0]), None)
    if other is None:
        return None
    ours, theirs = names[0], names[other]
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"document names differ: {runs[0]['label']} has {len(ours)}, {runs[other]['label']} {len(theirs)}, "
            f"first different at unit {index}")


def _sums_problem(runs: Sequence[dict], entries: Sequence[dict], eval_set: str) -> str | None:
    for model, entry in zip(runs, entries):
        documents = len(model["language_model"][eval_set]["document_names"])
        sums = entry.get("per_document")
        if sums is None:
            return f"{model['label']} has no per-document sums (results written before they existed)"
        if any(len(sums[key]) != documents for key in ("nll_nats", "tokens", "start_nll_nats", "start_tokens")):
            return f"{model['label']}: per-document sums of another length than its {documents} document names"
        if sums["start_offsets"] != PAIRED_START_OFFSETS:
            return (f"{model['label']}: block start is offsets < {sums['start_offsets']}, not < "
                    f"{PAIRED_START_OFFSETS}")
    return None


def _pooled_sums(entries: Sequence[dict], prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(NLL nats, tokens) float64 [documents] added over the runs' entries: every run scores the same tokens,
    so their ratio per document is the runs' average loss there."""
    nll = np.sum([entry["per_document"][prefix + "nll_nats"] for entry in entries], axis=0, dtype=np.float64)
    tokens = np.sum([entry["per_document"][prefix + "tokens"] for entry in entries], axis=0, dtype=np.float64)
    return nll, tokens


def _pooled_loss(entries: Sequence[dict], prefix: str = "") -> float:
    """The pooled loss (nats per token) of the entries' per-document sums over all documents."""
    nll, tokens = _pooled_sums(entries, prefix)
    return _safe_ratio(nll.sum(), tokens.sum())


def _paired_numbers(variant_runs: Sequence[dict], variant_entries: Sequence[dict], baseline_runs: Sequence[dict],
                    baseline_entries: Sequence[dict], stats: dict) -> dict:
    baseline_nll, baseline_tokens = _pooled_sums(baseline_entries)
    numbers = {
        "documents": len(baseline_nll),
        "overall": difference_interval(*_pooled_sums(variant_entries), baseline_nll, baseline_tokens, **stats),
        "block_start": difference_interval(*_pooled_sums(variant_entries, "start_"),
                                           *_pooled_sums(baseline_entries, "start_"), **stats),
    }
    for key, prefix in (("overall", ""), ("block_start", "start_")):
        baseline_loss = _pooled_loss(baseline_entries, prefix)
        numbers[f"per_run_{key}"] = {
            model["label"]: _number(bits_per_byte(_pooled_loss([entry], prefix) - baseline_loss))
            for model, entry in zip(variant_runs, variant_entries)}
    numbers["seed_matched"] = _seed_matched(variant_runs, variant_entries, baseline_runs, baseline_entries,
                                            stats["confidence"])
    return numbers


def _seed_matched(variant_runs: Sequence[dict], variant_entries: Sequence[dict], baseline_runs: Sequence[dict],
                  baseline_entries: Sequence[dict], confidence: float) -> dict:
    """Differences between runs trained with the same seed, and their mean over seeds with a Student t interval.

    Runs of one seed see the same data order and, where the shapes agree, the same initial weights, so pairing
    them removes that share of the seed-to-seed variation; the t interval over seeds covers the rest, which the
    bootstrap over documents does not. {seeds, overall, block_start, reason}: seeds the sorted training seeds
    both sides have; overall and block_start {per_seed: [bits per byte, one per seed], mean, low, high}, low
    and high None with fewer than two seeds. Where a run's training seed is unknown (results written before it
    was recorded) or no seed is on both sides: seeds [], the numbers None and the reason.
    """
    unknown = next((m["label"] for m in [*variant_runs, *baseline_runs] if m.get("training", {}).get("seed") is None),
                   None)
    empty = {"seeds": [], "overall": None, "block_start": None}
    if unknown is not None:
        return {**empty, "reason": f"{unknown} has no training seed (results written before it was recorded)"}

    def by_seed(runs, entries):
        grouped: dict[int, list[dict]] = {}
        for model, entry in zip(runs, entries):
            grouped.setdefault(model["training"]["seed"], []).append(entry)
        return grouped

    variant_seeds, baseline_seeds = by_seed(variant_runs, variant_entries), by_seed(baseline_runs, baseline_entries)
    seeds = sorted(set(variant_seeds) & set(baseline_seeds))
    if not seeds:
        return {**empty, "reason": f"no training seed on both sides (variant {sorted(variant_seeds)}, "
                                   f"baseline {sorted(baseline_seeds)})"}
    matched = {"seeds": seeds, "reason": None}
    for key, prefix in (("overall", ""), ("block_start", "start_")):
        per_seed = np.array([bits_per_byte(_pooled_loss(variant_seeds[seed], prefix)
                                           - _pooled_loss(baseline_seeds[seed], prefix)) for seed in seeds])
        low = high = None
        if len(seeds) > 1:
            half_width = (scipy.stats.t.ppf(0.5 + confidence / 2, len(seeds) - 1) * per_seed.std(ddof=1)
                          / math.sqrt(len(seeds)))
            low, high = _number(per_seed.mean() - half_width), _number(per_seed.mean() + half_width)
        matched[key] = {"per_seed": _numbers(per_seed), "mean": _number(per_seed.mean()), "low": low, "high": high}
    return matched


def merge_results(results_list: Sequence[dict], sources: Sequence[str] | None = None,
                  baselines: Sequence[str] | None = None) -> dict:
    """One results dict holding the models of several (runs evaluated one by one, e.g. in separate jobs), with
    the paired differences recomputed across all of them.

    sources: where each results dict came from (its folder), for messages and labels: a label that more than
    one of them uses gets " (NAME)" appended, NAME the folder's name (its path where two share a name). Every
    setting in MERGED_SETTINGS must agree, else ValueError naming it and both values; batch_tokens and
    data_dir are the first's. baselines: as for `paired_differences`.
    """
    if not results_list:
        raise ValueError("merge: give at least one results file")
    sources = [f"results {i + 1}" for i in range(len(results_list))] if sources is None else list(sources)
    if len(sources) != len(results_list):
        raise ValueError(f"merge: {len(sources)} sources for {len(results_list)} results")
    first = results_list[0]["settings"]
    for source, results in zip(sources[1:], results_list[1:]):
        for name in MERGED_SETTINGS:
            difference = _first_difference(first.get(name), results["settings"].get(name), name)
            if difference is not None:
                where, ours, theirs = difference
                raise ValueError(f"settings.{where}: {_short_repr(ours)} in {sources[0]} but {_short_repr(theirs)} "
                                 f"in {source}; only results of one evaluation setup can be merged")
    used = [m["label"] for results in results_list for m in results["models"]]
    models = []
    for name, results in zip(_labels([Path(source) for source in sources]), results_list):
        models += [dict(m, label=f"{m['label']} ({name})") if used.count(m["label"]) > 1 else m
                   for m in results["models"]]
    labels = [m["label"] for m in models]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise ValueError(f"merge: two runs are labelled {repeated!r} even with their source named; is one results "
                         f"file given twice?")
    settings = copy.deepcopy(first)
    paired, paired_skipped = paired_differences(models, settings, baselines)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": ", ".join(dict.fromkeys(results["backend"] for results in results_list)),
        "settings": settings,
        "models": models,
        "paired": paired,
        "paired_skipped": paired_skipped,
        "merged_from": [{"source": source, "created": results["created"], "backend": results["backend"],
                         "runs": len(results["models"])} for source, results in zip(sources, results_list)],
        "wall_time_s": sum(results["wall_time_s"] for results in results_list),
    }


def _first_difference(ours, theirs, where: str) -> tuple[str, object, object] | None:
    """(where, ours, theirs) at the first place two JSON values differ (a missing key counts as None; lists of
    unequal length differ as a whole), or None."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [*ours, *(key for key in theirs if key not in ours)]:
            found = _first_difference(ours.get(key), theirs.get(key), f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for index, (a, b) in enumerate(zip(ours, theirs)):
            found = _first_difference(a, b, f"{where}[{index}]")
            if found is not None:
                return found
    return None if ours == theirs else (where, ours, theirs)


def _short_repr(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
