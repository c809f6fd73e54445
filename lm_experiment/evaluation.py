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

import dataclasses
import datetime
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from lm_experiment import data, diagnostics
from lm_experiment.eval_options import EvalOptions, default_lengths, reference_block_size, run_block_grid
from lm_experiment.eval_runs import EvalRun
from lm_experiment.paired import paired_differences
from lm_experiment.scoring import Scorer, evaluate_length, planned_tokens
from sparse_attention import reachability
from sparse_attention.patterns import PatternOrSchedule


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
                                                               train_seq_len=run.train_seq_len).to_json()
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
