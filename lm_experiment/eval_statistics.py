"""The statistics of the evaluation: bootstrap intervals over documents, bits per byte, position and
block-offset buckets (docs/evaluation.md)."""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)


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
    point = safe_ratio(flat_num.sum(0), flat_den.sum(0))
    counts = _document_resamples(documents, samples, seed)
    resampled = safe_ratio(counts @ flat_num, counts @ flat_den)  # [samples, entries]
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
    point = safe_ratio(num_a.sum(), den_a.sum()) - safe_ratio(num_b.sum(), den_b.sum())
    counts = _document_resamples(len(num_a), samples, seed)
    resampled = safe_ratio(counts @ num_a, counts @ den_a) - safe_ratio(counts @ num_b, counts @ den_b)
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


def safe_ratio(numerator, denominator):
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


def json_number(value):
    """A float for JSON, None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else value


def json_numbers(values):
    return [json_number(v) for v in np.ravel(values)]


def loss_interval(nll_sums, counts, *, samples: int, seed: int, unit: str = "bits_per_byte") -> dict:
    """{"mean", "low", "high"} of the pooled loss of per-document sums [documents] in `unit`
    ("bits_per_byte", "perplexity" or "nats_per_token")."""
    point, low, high = bootstrap_ratio(nll_sums, counts, samples=samples, seed=seed)
    convert = {"bits_per_byte": bits_per_byte, "perplexity": perplexity, "nats_per_token": np.asarray}[unit]
    return {key: json_number(convert(value)) for key, value in (("mean", point), ("low", low), ("high", high))}


def difference_interval(nll_a, tokens_a, nll_b, tokens_b, *, samples: int, seed: int,
                        confidence: float = 0.95) -> dict:
    """{"mean", "low", "high"} in bits per byte of the pooled loss of per-document sums a minus that of b
    ([documents] each, nats and tokens), paired: one resample of the documents for both."""
    point, low, high = bootstrap_ratio_difference(nll_a, tokens_a, nll_b, tokens_b, samples=samples, seed=seed,
                                                  confidence=confidence)
    return {key: json_number(bits_per_byte(value)) for key, value in (("mean", point), ("low", low), ("high", high))}


def excess_interval(near, far, stats: dict) -> dict:
    """Block start minus block rest, bits per byte, paired over documents; near/far: (sums, counts)
    [documents, 1] each."""
    return difference_interval(near[0][:, 0], near[1][:, 0], far[0][:, 0], far[1][:, 0], **stats)


def bucket_curve(sums, counts, *, samples: int, seed: int) -> dict:
    """Bits per byte of every bucket [documents, buckets] with intervals, and the bucket's tokens."""
    point, low, high = bootstrap_ratio(sums, counts, samples=samples, seed=seed)
    return {
        "tokens": [int(c) for c in counts.sum(0)],
        "mean": json_numbers(bits_per_byte(point)),
        "low": json_numbers(bits_per_byte(low)),
        "high": json_numbers(bits_per_byte(high)),
    }
