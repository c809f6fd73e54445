"""Across runs: paired differences between variants and baselines, per document and seed-matched, and
the merging of results written apart (docs/evaluation.md)."""

from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.stats

from lm_experiment.eval_options import PAIRED_START_OFFSETS, baseline_specs
from lm_experiment.eval_runs import run_labels
from lm_experiment.eval_statistics import bits_per_byte, difference_interval, json_number, json_numbers, safe_ratio
from lm_experiment.measures.per_document import PerDocument
from sparse_attention.patterns import Block, parse

# Settings two results files must share to be merged: everything that changes which tokens are scored or
# how a number and its interval are computed (batch_tokens and data_dir change neither).
MERGED_SETTINGS = ("lengths", "max_documents", "max_document_tokens", "document_chunk_tokens", "eval_sets",
                   "reference_block_size", "trailing_window", "ablation_targets", "bootstrap_samples", "confidence",
                   "seed", "diagnostics")


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
        sums = PerDocument.from_json(entry)
        if sums is None:
            return f"{model['label']} has no per-document sums (results written before they existed)"
        if any(len(values) != documents for values in (sums.nll_nats, sums.tokens, sums.start_nll_nats,
                                                       sums.start_tokens)):
            return f"{model['label']}: per-document sums of another length than its {documents} document names"
        if sums.start_offsets != PAIRED_START_OFFSETS:
            return f"{model['label']}: block start is offsets < {sums.start_offsets}, not < {PAIRED_START_OFFSETS}"
    return None


def _pooled_sums(entries: Sequence[dict], prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(NLL nats, tokens) float64 [documents] added over the runs' entries: every run scores the same tokens,
    so their ratio per document is the runs' average loss there."""
    sums = [PerDocument.from_json(entry) for entry in entries]
    nll = np.sum([getattr(s, prefix + "nll_nats") for s in sums], axis=0, dtype=np.float64)
    tokens = np.sum([getattr(s, prefix + "tokens") for s in sums], axis=0, dtype=np.float64)
    return nll, tokens


def _pooled_loss(entries: Sequence[dict], prefix: str = "") -> float:
    """The pooled loss (nats per token) of the entries' per-document sums over all documents."""
    nll, tokens = _pooled_sums(entries, prefix)
    return safe_ratio(nll.sum(), tokens.sum())


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
            model["label"]: json_number(bits_per_byte(_pooled_loss([entry], prefix) - baseline_loss))
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
            low, high = json_number(per_seed.mean() - half_width), json_number(per_seed.mean() + half_width)
        matched[key] = {"per_seed": json_numbers(per_seed), "mean": json_number(per_seed.mean()), "low": low,
                        "high": high}
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
    for name, results in zip(run_labels([Path(source) for source in sources]), results_list):
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
