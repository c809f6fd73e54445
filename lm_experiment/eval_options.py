"""What an evaluation measures and how (`EvalOptions`), and the defaults derived from the runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lm_experiment import diagnostics
from lm_experiment.eval_runs import BlockGrid, EvalRun, pattern_block_grid
from sparse_attention.patterns import parse

DEFAULT_EVAL_SETS = ("code:long", "books:long")
# Paired differences at block start: window positions at offsets < this on the run's own grid (shift 0).
PAIRED_START_OFFSETS = 8


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
