"""The boundary tasks' outputs (`boundary_tasks.run`), each written atomically into one folder.

  summary.json        one row per (task, pattern, depth): agreement_reachable, agreement_unreachable, ...
  results.json        every cell: accuracy with its interval, reachable or not, and the loss curves
  report.md           the bars, the agreement table and per-(pattern, depth) accuracy tables with intervals
  copy_accuracy.png   accuracy over (distance, phase), one panel per (pattern, depth); dots: unreachable
  hops_accuracy.png   accuracy over (hops, crossings), one panel per (pattern, depth)
  agreement.png       each pattern's agreement with the prediction, per task and depth
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lm_experiment import boundary_tasks
from sparse_attention.atomic_io import atomic_open, write_json


def check_out_dir(path: str | os.PathLike) -> Path:
    """The output folder, checked before any work: ValueError if it is a file or its parent is missing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"--out: parent folder {out.absolute().parent} does not exist")
    return out


def write(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Writes every output; returns their paths (report.md first)."""
    out = check_out_dir(out_dir)
    out.mkdir(exist_ok=True)
    write_json(out / "summary.json", boundary_tasks.summary_rows(results))
    write_json(out / "results.json", results)
    written = [out / "summary.json", out / "results.json"]
    tasks = {row["task"] for row in results["results"]}
    for name, plot, task in (("copy_accuracy.png", plot_copy, "copy"), ("hops_accuracy.png", plot_hops, "hops"),
                             ("agreement.png", plot_agreement, None)):
        if task is None or task in tasks:
            figure = plot(results)
            with atomic_open(out / name) as file:
                figure.savefig(file, format="png", dpi=100)
            _pyplot().close(figure)
            written.append(out / name)
    with atomic_open(out / "report.md", "w") as file:
        file.write(markdown(results))
    return [out / "report.md", *written]


# --------------------------------------------------------------------------------------------------
# report.md


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _part(part: dict) -> str:
    if not part["n"]:
        return ""
    return f"{part['accuracy']:.2f} [{part['low']:.2f}, {part['high']:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a "|" inside a cell (a union pattern's spec) is escaped, not read as a column."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [
        "# Boundary tasks trained from scratch",
        "",
        *([] if results.get("complete", True) else
          ["**Partial: the run stopped before every (task, depth) was trained; the chance check covers the "
           "rows below only.**", ""]),
        f"{results['created']}, {results['backend']} ({results['device']}), jax {results['versions']['jax']}, "
        f"{results['wall_time_s']:.0f} s in all. Sequences of {config['seq_len']} tokens, blocks of "
        f"{config['block_size']}, K = {config['symbols']} values (chance {1 / config['symbols']:.4f}); models of "
        f"d_model {config['d_model']}, {config['num_heads']} heads, MLP {config['mlp_hidden']}, trained "
        f"{config['copy_steps']} (copy) and {config['hops_steps']} (hops) steps of {config['batch']} sequences, "
        f"{config.get('seeds', 1)} initialisation(s) per pattern (seed {config['seed']} on); "
        f"{config['samples_per_cell']} held-out probes per cell. Intervals: Wilson {config['confidence']:.0%}.",
        "",
    ]
    checks = boundary_tasks.bar_checks(results)
    for task in dict.fromkeys(c["task"] for c in checks):
        lines += [f"## The bars: {task}", ""]
        lines += _table(["bar", "holds", "detail"], [[c["bar"], "yes" if c["holds"] else "**no**", c["detail"]]
                                                     for c in checks if c["task"] == task])
        lines.append("")
    lines += [
        "## Agreement with the reachability prediction",
        "",
        f"agreement_reachable: share of reachable cells at accuracy >= {config['accuracy_bar']}; within depth: the "
        "same over the cells a model of that depth has the layers for (hops: h + 1 <= depth); in order: the same "
        "over each cell's probes whose route (key, each statement of the chain, query) fits in the layers one "
        "link after another (`reachability.layers_in_order`; for copy the same as reachable). "
        "agreement_unreachable: share of unreachable cells whose family-wise interval (Bonferroni over every "
        "unreachable cell of the task, all patterns and depths) holds chance. Pooled: every unreachable probe of "
        "the row together, with its 95 % interval. For patterns that choose blocks by content (topk), reachable "
        "and unreachable are the static part's: the chosen blocks may reach further, so those rows are not held "
        "to chance, and their pooled unreachable accuracy is what the choice recovered.",
        "",
    ]
    rows = []
    for row in results["results"]:
        pooled = row["pooled_unreachable"]
        rows.append([row["task"], boundary_tasks.row_label(config, row), str(row["depth"]),
                     f"{_fraction(row['agreement_reachable'])} of {row['reachable_parts']}",
                     _fraction(boundary_tasks.agreement_within_depth(row, config["accuracy_bar"])),
                     f"{_fraction(row['agreement_in_order'])} of {row['in_order_parts']}",
                     f"{_fraction(row['agreement_unreachable'])} of {row['unreachable_parts']}",
                     _fraction(row["min_accuracy_reachable"]), _part(pooled) or "-", f"{row['final_loss']:.3f}"])
    lines += _table(["task", "pattern", "depth", "agreement reachable", "within depth", "in order",
                     "agreement unreachable", "min accuracy reachable", "pooled unreachable accuracy", "final loss"],
                    rows)
    lines.append("")
    for row in results["results"]:
        lines += [f"### {row['task']}: {boundary_tasks.row_label(config, row)}, depth {row['depth']}", ""]
        lines += _copy_table(row, config) if row["task"] == "copy" else _hops_table(row, config["confidence"])
        lines.append("")
    return "\n".join(lines)


def summary_text(results: dict) -> str:
    """The bars and each row's agreement, for a terminal."""
    lines = [f"{'holds' if check['holds'] else 'FAILS'}: {check['task']}: {check['bar']} ({check['detail']})"
             for check in boundary_tasks.bar_checks(results)]
    lines.append(f"{'task':6} {'pattern':28} {'depth':>5} {'reachable ok':>13} {'unreachable ok':>15}")
    for row in results["results"]:
        lines.append(f"{row['task']:6} {boundary_tasks.row_label(results['config'], row):28} {row['depth']:>5} "
                     f"{_fraction(row['agreement_reachable']):>6} of {row['reachable_parts']:<4} "
                     f"{_fraction(row['agreement_unreachable']):>7} of {row['unreachable_parts']:<4}")
    return "\n".join(lines)


def _copy_table(row: dict, config: dict) -> list[str]:
    """Rows: distance; columns: phase; unreachable cells in italics."""
    block = config["block_size"]
    by_cell = {(c["distance"], c["phase"]): c for c in row["cells"]}
    rows = []
    for distance in config["distances"]:
        entries = []
        for phase in config["phases"]:
            cell = by_cell[(distance, phase)]
            entries.append(_part(cell["reachable"]) or f"*{_part(cell['unreachable'])}*")
        rows.append([f"{distance} ({distance / block:.2f} B)", *entries])
    return ["Accuracy [interval] by distance d (in tokens and blocks) and phase p; *italic*: key unreachable.", "",
            *_table(["d \\ p", *map(str, config["phases"])], rows)]


def _hops_table(row: dict, confidence: float) -> list[str]:
    """One line per cell; the in-order probes are among the reachable ones, so the reachable probes that are not
    in order are the difference of the two parts."""
    rows = []
    for c in row["cells"]:
        reached, ordered = c["reachable"], c["in_order"]
        out_of_order = boundary_tasks.part_interval(reached["correct"] - ordered["correct"],
                                                    reached["n"] - ordered["n"], confidence)
        rows.append([str(c["hops"]), str(c["crossings"]), f"{c['reachable_fraction']:.2f}",
                     f"{c['in_order_fraction']:.2f}", _part(ordered) or "-", _part(out_of_order) or "-",
                     _part(c["unreachable"]) or "-"])
    return _table(["hops", "edges per link", "key reachable", "in order", "accuracy (in order)",
                   "accuracy (reachable, not in order)", "accuracy (unreachable)"], rows)


# --------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell_accuracy(cell: dict) -> float:
    """Accuracy over all of a cell's probes, reachable or not."""
    parts = (cell["reachable"], cell["unreachable"])
    return sum(p["correct"] for p in parts) / max(sum(p["n"] for p in parts), 1)


def _heatmap_grid(results: dict, task: str, y: tuple[str, str, list], x: tuple[str, str, list], *,
                  panel_size: tuple[float, float], mark, colorbar_label: str):
    """One accuracy heat-map per (pattern, depth) of `task`, rows: patterns, columns: depths.

    y, x: (cell key, axis label, values); mark(ax, cells) draws each panel's overlay, cells[(y, x)]."""
    plt = _pyplot()
    config = results["config"]
    rows = {(boundary_tasks.row_label(config, r), r["depth"]): r for r in results["results"] if r["task"] == task}
    patterns = list(dict.fromkeys(key[0] for key in rows))  # labels: each pattern, and its seeds where several
    depths = [d for d in config["depths"] if any(key[1] == d for key in rows)]
    (y_key, y_label, y_values), (x_key, x_label, x_values) = y, x
    figure, axes = plt.subplots(len(patterns), len(depths), squeeze=False, sharex=True, sharey=True,
                                figsize=(panel_size[0] * len(depths), panel_size[1] * len(patterns)),
                                layout="constrained")
    image = None
    for i, pattern in enumerate(patterns):
        for j, depth in enumerate(depths):
            ax = axes[i, j]
            cells = {(c[y_key], c[x_key]): c for c in rows[(pattern, depth)]["cells"]}
            accuracy = np.array([[_cell_accuracy(cells[a, b]) for b in x_values] for a in y_values])
            image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            mark(ax, cells)
            ax.set_title(f"{pattern}, L={depth}", fontsize=8)
            if j == 0:
                ax.set_yticks(range(len(y_values)), [str(v) for v in y_values], fontsize=6)
                ax.set_ylabel(y_label, fontsize=7)
            if i == len(patterns) - 1:
                ax.set_xticks(range(len(x_values)), [str(v) for v in x_values], fontsize=6)
                ax.set_xlabel(x_label, fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.5, label=colorbar_label)
    return figure


def plot_copy(results: dict):
    distances, phases = results["config"]["distances"], results["config"]["phases"]

    def dot_unreachable(ax, cells):
        ys, xs = np.nonzero([[cells[d, p]["reachable_fraction"] < 1 for p in phases] for d in distances])
        ax.scatter(xs, ys, s=4, c="white", marker=".", linewidths=0)

    return _heatmap_grid(results, "copy", ("distance", "distance (tokens)", distances),
                         ("phase", "phase in block", phases), panel_size=(3.2, 2.6), mark=dot_unreachable,
                         colorbar_label="top-1 accuracy (dots: key unreachable)")


def plot_hops(results: dict):
    hops, crossings = results["config"]["hops"], results["config"]["crossings"]

    def write_reachable_share(ax, cells):
        for y, h in enumerate(hops):
            for x, e in enumerate(crossings):
                ax.text(x, y, f"{cells[h, e]['reachable_fraction']:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if _cell_accuracy(cells[h, e]) < 0.6 else "black")

    return _heatmap_grid(results, "hops", ("hops", "hops", hops), ("crossings", "block edges per link", crossings),
                         panel_size=(2.6, 2.2), mark=write_reachable_share,
                         colorbar_label="accuracy (text: share of probes with the key reachable)")


def plot_agreement(results: dict):
    plt = _pyplot()
    config = results["config"]
    tasks = [t for t in boundary_tasks.TASKS if any(r["task"] == t for r in results["results"])]
    figure, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.2 * len(tasks)), squeeze=False)
    width = 0.8 / len(config["depths"])
    labels = list(dict.fromkeys(boundary_tasks.row_label(config, r) for r in results["results"]))
    for i, task in enumerate(tasks):
        for j, (key, title) in enumerate((("agreement_reachable", f"reachable cells at accuracy >= "
                                                                 f"{config['accuracy_bar']}"),
                                          ("agreement_unreachable", "unreachable cells at chance"))):
            ax = axes[i, j]
            for k, depth in enumerate(config["depths"]):
                values = [next((r[key] for r in results["results"] if r["task"] == task and r["depth"] == depth
                                and boundary_tasks.row_label(config, r) == label), None) for label in labels]
                positions = np.arange(len(labels)) + (k - (len(config["depths"]) - 1) / 2) * width
                ax.bar(positions, [np.nan if v is None else v for v in values], width, label=f"depth {depth}")
            ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{task}: share of {title}", fontsize=9)
            ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
