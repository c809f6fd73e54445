"""The evaluation report: report.md, results.json and PNG plots, each written atomically.

    write_report(evaluation.evaluate(runs, options), "reports/compare")

  report.md                 tables: paired differences of each variant against the baselines (seeds pooled),
                            bits per byte and perplexity per run and context length with 95 % intervals,
                            active-area fraction, training tokens/s, trailing window and ablation, block-start
                            loss, diagnostics, reachability
  results.json              every number of the report (and the curves behind the plots)
  loss_vs_position.png      bits per byte against window position, log-spaced buckets, per eval set
  loss_vs_block_offset.png  bits per byte against offset in the block, own grid and shifted grid
  loss_at_block_start.png   the same, zoomed on the first BLOCK_START_ZOOM offsets, without bands
  edge_pair_recall.png      measured accuracy over (key offset, blocks later) beside the reachability prediction
  variable_tracking.png     accuracy against chain length per depth, with the reachable fraction
  coverage_vs_depth.png     reachable share of causal pairs against depth for each eval pattern

Every table row and plot legend carries the run's label, which names an evaluation pattern that differs
from the trained one ("dense [eval window(64)]"). In the line plots, runs that evaluate the same pattern
(seeds of one variant) share a color and differ in line style.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from lm_experiment.diagnostics import Diagnostics
from lm_experiment.measures import MEASURES, Interval, totals
from lm_experiment.measures.block_offset import ByBlockOffset
from lm_experiment.measures.by_position import ByPosition
from lm_experiment.report_text import (common_lengths, interval_text, length_entries, number_text, table,
                                       training_length_shown)
from sparse_attention.atomic_io import atomic_open, write_json

PLOTS = ("loss_vs_position.png", "loss_vs_block_offset.png", "loss_at_block_start.png", "edge_pair_recall.png",
         "variable_tracking.png", "coverage_vs_depth.png")
LINE_STYLES = ("-", "--", ":", "-.")
# Offsets shown by loss_at_block_start.png: a cut edge costs the first few tokens of a block the most.
BLOCK_START_ZOOM = 16


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """ValueError naming --out unless out_dir is a folder or can be made one: checked before any work, so
    that a long evaluation does not end in a path it cannot write."""
    out = Path(out_dir)
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        where = "" if existing == out else f", so {out} cannot be created"
        raise ValueError(f"--out: {existing} is a file, not a folder{where}")


def write_report(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Writes results.json, the plots and report.md into out_dir (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    written = [out / "results.json"]
    with_diagnostics = all("diagnostics" in model for model in results["models"])
    for name, plot in (("loss_vs_position.png", plot_loss_vs_position),
                       ("loss_vs_block_offset.png", plot_loss_vs_block_offset),
                       ("loss_at_block_start.png", plot_loss_at_block_start),
                       ("edge_pair_recall.png", plot_edge_pair_recall if with_diagnostics else None),
                       ("variable_tracking.png", plot_variable_tracking if with_diagnostics else None),
                       ("coverage_vs_depth.png", plot_coverage_vs_depth)):
        if plot is not None:
            figure = plot(results)
            with atomic_open(out / name) as file:
                figure.savefig(file, format="png", dpi=110)
            _close(figure)
            written.append(out / name)
    text = markdown(results, [path.name for path in written if path.suffix == ".png"])
    with atomic_open(out / "report.md", "w") as file:
        file.write(text)
    return [out / "report.md", *written]


# --------------------------------------------------------------------------------------------------
# report.md


def markdown(results: dict, plots: list[str]) -> str:
    settings, models = results["settings"], results["models"]
    lines = ["# Evaluation report", ""]
    lines += [f"Created {results['created']} on {results['backend']}; evaluation took "
              f"{results['wall_time_s']:.0f} s. Definitions: docs/evaluation.md. Every number here is in "
              "`results.json`.", ""]
    overridden = [m["label"] for m in models if m["overrides"]]
    lines += ["## Runs", ""]
    if overridden:
        lines += ["Evaluated with a pattern or numerics other than the trained ones (a deliberate override, "
                  f"named in the label): {', '.join(overridden)}.", ""]
    rows = []
    for m in models:
        training = m["training"]
        rows.append([m["label"], f"`{m['workdir']}`", str(m["step"]), f"`{m['trained_pattern']}`",
                     f"`{m['eval_pattern']}`", str(m["num_layers"]), f"{m['parameters']:,}",
                     str(training["seq_len"]), number_text(training["active_fraction"]),
                     number_text(training["tokens_per_sec"], ",.0f"),
                     number_text(None if training["final_loss_avg"] is None
                                  else training["final_loss_avg"] / math.log(2))])
    lines += table(["run", "workdir", "step", "trained pattern", "eval pattern", "layers", "parameters",
                     "train length", "active fraction (trained pattern, train length)", "train tokens/s",
                     "final train loss (bits/byte)"], rows)
    lines += _settings_lines(settings)
    if "merged_from" in results:
        lines += _merged_lines(results["merged_from"])

    lines += _paired_lines(results)
    lines += _skipped_lines(models)

    lengths = sorted({int(length) for m in models for length in m["active_fraction"]})
    lines += ["## Active-area fraction", "",
              "Attended (query, key) pairs over the C (C + 1) / 2 causal pairs, mean over layers, at each evaluated "
              "length (dense = 1).", ""]
    lines += table(["run", *(f"C={length}" for length in lengths)],
                   [[m["label"], *(number_text(m["active_fraction"].get(str(length))) for length in lengths)]
                     for m in models])

    for measure in MEASURES:
        if measure.report is not None:
            lines += measure.report(results)
    if all("diagnostics" in m for m in models):
        lines += _diagnostics_lines(results)
    lines += _reachability_lines(results)
    lines += ["## Timing", ""]
    seconds = "eval seconds (incl. diagnostics)" if any("diagnostics" in m for m in models) else "eval seconds"
    lines += table(["run", seconds, "scoring tokens/s", "compile seconds"],
                   [[m["label"], f"{m['eval_seconds']:.0f}", number_text(m["eval_tokens_per_sec"], ",.0f"),
                      f"{m['compile_seconds']:.1f}"] for m in models])
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def bits_per_byte_tables(results: dict) -> str:
    """The report's bits-per-byte section (markdown), one table per eval set."""
    return "\n".join(totals.unit_tables(results, "bits_per_byte", "Bits per byte", "bits per byte"))


def _settings_lines(settings: dict) -> list[str]:
    lines = ["## Settings", ""]
    for name, info in settings["eval_sets"].items():
        subset = (f"{info['documents']} of {info['documents_in_split']} documents"
                  + (" (evenly spaced in manifest order)" if info["documents"] < info["documents_in_split"] else ""))
        cut = (f", the first {settings['max_document_tokens']:,} tokens of each"
               if settings["max_document_tokens"] is not None else "")
        chunks = settings.get("document_chunk_tokens")
        units = (f", cut into {len(info['document_names'])} chunks of up to {chunks:,} tokens (the units of the "
                 "intervals)" if chunks is not None else "")
        lines.append(f"- `{name}`: {subset}{cut}{units}: {info['tokens']:,} tokens.")
    subsampled = settings["max_documents"] is not None or settings["max_document_tokens"] is not None
    if subsampled:
        lines.append("- **Subsampled**: documents and tokens were limited by flags (max_documents="
                     f"{settings['max_documents']}, max_document_tokens={settings['max_document_tokens']}), so "
                     "these numbers describe that subset, with intervals over its documents only.")
    lines += [
        f"- Context lengths C: {', '.join(map(str, settings['lengths']))}. Each document is cut into "
        "non-overlapping windows of C + 1 tokens sharing their edge token, so every token after the first is "
        "predicted once, with (position in window + 1) tokens of context.",
        f"- Intervals: {settings['bootstrap_samples']} bootstrap resamples of documents, 95 % percentile "
        f"interval, seed {settings['seed']}.",
        f"- Trailing window and ablation width W = {settings['trailing_window']}; up to "
        f"{settings['ablation_targets']} ablation targets per window. Reference block grid for patterns "
        f"without blocks: {settings['reference_block_size']}.",
    ]
    diagnostics = settings.get("diagnostics")
    if diagnostics is not None:
        lines.append(
            f"- Diagnostics: fine-tuned with {diagnostics['batch_size']} sequences per step at learning rate "
            f"{diagnostics['learning_rate']}: {diagnostics['steps']} steps for edge-pair recall, "
            f"{diagnostics['tracking_steps']} per depth for variable tracking; {diagnostics['eval_samples']} "
            "held-out sequences per cell (details below).")
    return lines + [""]


def _merged_lines(merged_from: list[dict]) -> list[str]:
    lines = [f"Merged from {len(merged_from)} results files evaluated separately with the same settings "
             "(`eval.py --merge`):", ""]
    lines += [f"- `{part['source']}`: {part['runs']} run(s), created {part['created']} on {part['backend']}"
              for part in merged_from]
    return lines + [""]


def _seed_matched_text(entry: dict | None) -> str:
    """"mean [low, high] (per seed) / ..." of a paired entry's seed-matched differences, overall then block start."""
    matched = (entry or {}).get("seed_matched") or {}
    if not matched.get("seeds"):
        return "–"
    parts = []
    for key in ("overall", "block_start"):
        per_seed = ", ".join(number_text(value, "+.3f") for value in matched[key]["per_seed"])
        parts.append(f"{interval_text(Interval.from_json(matched[key]))} ({per_seed})")
    return " / ".join(parts)


def _paired_lines(results: dict) -> list[str]:
    """The paired-differences section; nothing for results written before they existed or without pairs."""
    differences, skipped = results.get("paired", []), results.get("paired_skipped", [])
    if not differences and not skipped:
        return []
    lines = ["## Paired differences", "",
             "Bits per byte of the variant minus the baseline, over all predicted tokens / at block start (window "
             "positions at offsets 0-7 of the run's own block grid, the reference grid for runs without blocks); "
             "negative: the variant has the lower loss. The runs of a variant (one eval pattern) are its seeds: "
             "their per-document sums are pooled, so each document's loss is the seed average. Intervals are 95 % "
             "paired percentile bootstrap intervals over documents (units: chunks where documents were cut), "
             "one resample for both sides; they do not cover seed-to-seed variation. The second table gives each "
             "run of the variant alone against the pooled baseline. The third pairs runs trained with the same "
             "seed: the mean over seeds of their differences with a 95 % Student t interval over seeds (none with "
             "one seed), then each seed's difference; this interval does cover seed-to-seed variation.", ""]
    for eval_set in results["settings"]["eval_sets"]:
        entries = [entry for entry in differences if entry["eval_set"] == eval_set]
        if not entries:
            continue
        lengths = sorted({entry["length"] for entry in entries})
        pairs = list(dict.fromkeys((entry["variant"], entry["baseline"]) for entry in entries))
        cells = {(entry["variant"], entry["baseline"], entry["length"]): entry for entry in entries}
        rows, spread, matched = [], [], []
        for variant, baseline in pairs:
            found = [cells.get((variant, baseline, length)) for length in lengths]
            first = next(entry for entry in found if entry is not None)
            name = (f"{variant} − {baseline} ({len(first['variant_runs'])} vs {len(first['baseline_runs'])} "
                    f"runs)")
            rows.append([name, *("–" if entry is None else f"{interval_text(Interval.from_json(entry['overall']))} / "
                                 f"{interval_text(Interval.from_json(entry['block_start']))}" for entry in found)])
            spread.append([name, *("–" if entry is None else " / ".join(", ".join(
                number_text(value, "+.3f") for value in entry[f"per_run_{key}"].values())
                for key in ("overall", "block_start")) for entry in found)])
            seeds = (first.get("seed_matched") or {}).get("seeds")
            if seeds:
                matched.append([f"{variant} − {baseline} (seeds {', '.join(map(str, seeds))})",
                                *(_seed_matched_text(entry) for entry in found)])
        lines += [f"### {eval_set} ({entries[0]['documents']} units)", ""]
        lines += table(["variant − baseline", *(f"C={length}: overall / block start" for length in lengths)], rows)
        lines += table(["variant − baseline",
                        *(f"C={length}: each run, overall / block start" for length in lengths)], spread)
        if matched:
            lines += table(["variant − baseline, same seeds",
                            *(f"C={length}: overall / block start" for length in lengths)], matched)
    if skipped:
        lines += ["Pairs not compared:", ""]
        for entry in skipped:
            pair = (f"{entry['variant']} − {entry['baseline']}" if entry["variant"]
                    else f"baseline {entry['baseline']}")
            where = [entry["eval_set"]] if entry["eval_set"] else []
            where += [f"C={entry['length']}"] if entry["length"] else []
            lines.append(f"- {pair}{' (' + ', '.join(where) + ')' if where else ''}: {entry['reason']}")
        lines.append("")
    return lines


def _skipped_lines(models: list[dict]) -> list[str]:
    lines = []
    for m in models:
        skipped = next(iter(m["language_model"].values()))["skipped"]
        lines += [f"- {m['label']}: C={s['length']} skipped: {s['reason']}" for s in skipped]
    return (["Lengths a pattern cannot lay out:", "", *lines, ""]) if lines else []


def _diagnostics_lines(results: dict) -> list[str]:
    runs = [(m["label"], Diagnostics.from_json(m["diagnostics"])) for m in results["models"]]
    first = runs[0][1]
    lines = ["## Synthetic boundary diagnostics", "",
             f"Both tasks are fine-tuned per run (and per depth) from the checkpoint, with the run's own pattern, "
             f"then scored on held-out sequences of {first.seq_len} bytes shared by all runs; neither format "
             "occurs in training, so zero-shot scores would only measure the format. Accuracy near chance is an "
             "honest result for tiny byte models after a short fine-tune.", ""]
    lines += ["### Edge-pair recall", "",
              "A value at offset o of a block, queried k blocks later (query at offset "
              f"{first.edge_pair.query_offset} of its block). Reachable: the value's position is in R_L(query) "
              f"for the eval pattern at depth L. Chance: {first.edge_pair.chance:.3f}.", ""]
    rows = []
    for label, diagnostics in runs:
        edge = diagnostics.edge_pair
        cells = np.array(edge.reachable)
        rows.append([label, f"{cells.sum()} / {cells.size}", number_text(edge.accuracy_where_reachable),
                     number_text(edge.accuracy_where_unreachable),
                     f"{edge.fine_tune.first_loss:.2f} → {edge.fine_tune.last_loss:.2f}"])
    lines += table(["run", "reachable cells", "accuracy (reachable)", "accuracy (unreachable)",
                   "fine-tune loss (nats)"], rows)
    lines += ["### Cross-block variable tracking", "",
              "A chain of h assignments, one per block, with a decoy chain; the query follows in the next block. "
              "Cells: accuracy (share of samples whose value is reachable at that depth). Blind choice between the "
              "two values scores 0.5, any uppercase letter 1/26.", ""]
    for label, diagnostics in runs:
        tracking = diagnostics.variable_tracking
        rows = []
        for depth, accuracy in zip(tracking.depths, tracking.accuracy):
            fraction = tracking.value_reachable_fraction[tracking.predicted_depths.index(depth)]
            rows.append([str(depth), *(f"{a:.2f} ({f:.2f})" for a, f in zip(accuracy, fraction))])
        reach = ", ".join(f"d={d}: {h if h is not None else 'none'}"
                          for d, h in tracking.reachable_chain_length.items())
        lines += [f"**{label}** (longest chain with every value reachable: {reach})", ""]
        lines += table(["depth", *(f"h={h}" for h in tracking.chain_lengths)], rows)
    return lines


def _reachability_lines(results: dict) -> list[str]:
    rows = []
    for m in results["models"]:
        reach = m["reachability"]
        reached = reach["full_coverage_status"] == "reached"
        full = reach["full_coverage_depth"] if reached else reach["full_coverage_status"]
        rows.append([m["label"], f"`{reach['pattern']}`", str(reach["seq_len"]), str(reach["layers"]),
                     f"{reach['coverage']:.4f}", str(full), f"{reach['reach_distance']['mean']:.1f}"])
    return ["## Reachability of the eval patterns", "",
            "Share of causal pairs (i, j <= i) with j in R_L(i) at the model's depth L and the longest evaluated "
            "length (sparse_attention.reachability).", ""] + table(
        ["run", "pattern", "S", "L", "coverage", "full coverage depth", "mean reach distance"], rows)


# --------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _close(figure) -> None:
    _pyplot().close(figure)


def line_styles(models: list[dict]) -> dict[str, tuple[str, str]]:
    """label -> (color, line style): one color per evaluated pattern, one line style per run of it."""
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    patterns: dict[str, int] = {}
    seen: dict[str, int] = {}
    styles = {}
    for m in models:
        pattern = m["eval_pattern"]
        patterns.setdefault(pattern, len(patterns))
        repeat = seen.get(pattern, 0)
        seen[pattern] = repeat + 1
        styles[m["label"]] = (colors[patterns[pattern] % len(colors)], LINE_STYLES[repeat % len(LINE_STYLES)])
    return styles


def plot_loss_vs_position(results: dict):
    plt = _pyplot()
    eval_sets = list(results["settings"]["eval_sets"])
    figure, axes = plt.subplots(1, len(eval_sets), figsize=(6.5 * len(eval_sets), 4.6), squeeze=False)
    styles = line_styles(results["models"])
    for ax, eval_set in zip(axes[0], eval_sets):
        length = common_lengths(results, eval_set)[-1]
        for m in results["models"]:
            by_position = ByPosition.from_json(length_entries(m, eval_set)[length])
            edges = np.array(by_position.edges, float)
            centers = np.sqrt(np.maximum(edges[:-1], 0.5) * edges[1:])
            mean, low, high = by_position.curve.arrays()
            color, style = styles[m["label"]]
            ax.plot(centers, mean, marker="o", markersize=3, color=color, linestyle=style, label=m["label"])
            ax.fill_between(centers, low, high, color=color, alpha=0.2)
        ax.set_xscale("log")
        ax.set(xlabel="position in window (log-spaced buckets)", ylabel="bits per byte",
               title=f"{eval_set}, C={length}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle("loss against position (95 % bootstrap bands over documents)")
    figure.tight_layout()
    return figure


def _block_offset_figure(results: dict, *, zoom: bool):
    """Loss against offset within the block, own grid and B/2-shifted control; `zoom`: the first
    BLOCK_START_ZOOM offsets only, with markers and without bands."""
    plt = _pyplot()
    eval_sets = list(results["settings"]["eval_sets"])
    styles = line_styles(results["models"])
    figure, axes = plt.subplots(len(eval_sets), 2, figsize=(13, 4.2 * len(eval_sets)), squeeze=False)
    for row, eval_set in zip(axes, eval_sets):
        length = training_length_shown(results, eval_set)
        for ax, grid_name in zip(row, ("own", "shifted")):
            for m in results["models"]:
                offsets = ByBlockOffset.from_json(length_entries(m, eval_set)[length])
                mean, low, high = getattr(offsets, grid_name).curve.arrays()
                shown = min(BLOCK_START_ZOOM, len(mean)) if zoom else len(mean)
                x = np.arange(shown)
                source = "" if offsets.grid.source == "pattern" else ", reference grid"
                color, style = styles[m["label"]]
                ax.plot(x, mean[:shown], linewidth=1.2, color=color, linestyle=style,
                        marker="o" if zoom else None, markersize=3,
                        label=f"{m['label']} (B={offsets.grid.size}{source})")
                if not zoom:
                    ax.fill_between(x, low, high, color=color, alpha=0.15)
            title = "own block grid" if grid_name == "own" else "grid shifted by B/2 (control)"
            ax.set(xlabel="offset within block", ylabel="bits per byte", title=f"{eval_set}, C={length}: {title}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize="small")
    figure.suptitle("loss at the start of the block (t mod B, first offsets)" if zoom
                    else "loss against offset within the block (t mod B)")
    figure.tight_layout()
    return figure


def plot_loss_vs_block_offset(results: dict):
    return _block_offset_figure(results, zoom=False)


def plot_loss_at_block_start(results: dict):
    return _block_offset_figure(results, zoom=True)


def plot_edge_pair_recall(results: dict):
    plt = _pyplot()
    models = results["models"]
    figure, axes = plt.subplots(2, len(models), figsize=(3.2 * len(models) + 1.5, 7.5), squeeze=False,
                                layout="constrained")
    edges = [Diagnostics.from_json(m["diagnostics"]).edge_pair for m in models]
    image = None
    for column, (m, edge) in enumerate(zip(models, edges)):
        for row, (key, title) in enumerate((("accuracy", "measured accuracy"), ("reachable", "reachable (predicted)"))):
            ax = axes[row, column]
            values = np.array(getattr(edge, key), float)
            image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            for (i, j), value in np.ndenumerate(values):
                ax.text(j, i, f"{value:.2f}" if key == "accuracy" else ("yes" if value else "no"), ha="center",
                        va="center", fontsize=7, color="white" if value < 0.5 else "black")
            ax.set_xticks(range(len(edge.blocks_later)), edge.blocks_later)
            ax.set_yticks(range(len(edge.offsets)), edge.offsets)
            ax.set_title(f"{m['label']}: {title}", fontsize="medium")
            if row == 1:
                ax.set_xlabel("blocks later (k)")
            if column == 0:
                ax.set_ylabel("key offset in block (o)")
    figure.colorbar(image, ax=axes, shrink=0.6, label="accuracy / reachable")
    figure.suptitle(f"edge-pair recall (chance {edges[0].chance:.3f})")
    return figure


def plot_variable_tracking(results: dict):
    plt = _pyplot()
    models = results["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        tracking = Diagnostics.from_json(m["diagnostics"]).variable_tracking
        lengths = tracking.chain_lengths
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, (depth, accuracy) in enumerate(zip(tracking.depths, tracking.accuracy)):
            color = colors[index % len(colors)]
            fraction = tracking.value_reachable_fraction[tracking.predicted_depths.index(depth)]
            ax.plot(lengths, accuracy, marker="o", color=color, label=f"depth {depth}: accuracy")
            ax.plot(lengths, fraction, linestyle="--", color=color, alpha=0.7, label=f"depth {depth}: reachable")
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ax.axhline(tracking.chance.any_value, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="chain length h (blocks)", title=m["label"], ylim=(-0.03, 1.03))
        ax.set_xticks(lengths)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (solid) / value reachable (dashed)")
    axes[0, -1].legend(fontsize="x-small", loc="upper right")
    figure.suptitle("cross-block variable tracking (dotted: 1/2 and 1/26)")
    figure.tight_layout()
    return figure


def plot_coverage_vs_depth(results: dict):
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = line_styles(results["models"])
    for m in results["models"]:
        reach = m["reachability"]
        color, style = styles[m["label"]]
        ax.plot(range(len(reach["coverage_by_depth"])), reach["coverage_by_depth"], marker="o", color=color,
                linestyle=style, label=f"{m['label']}: {reach['pattern']}")
    seq_len = results["models"][0]["reachability"]["seq_len"]
    ax.set(xlabel="depth (layers)", ylabel="coverage of causal pairs", ylim=(0, 1.02),
           title=f"reachability coverage against depth, S = {seq_len}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return figure
