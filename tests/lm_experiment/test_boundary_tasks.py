import json
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import boundary_tasks as boundary_config
from lm_experiment import boundary_report, boundary_tasks
from lm_experiment.boundary_tasks import VALUE, BoundaryTaskConfig, CopyTask, HopTask
from sparse_attention import reachability

REPO = Path(__file__).resolve().parents[2]


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """Two patterns at depth 1 on 64-token sequences: trains in seconds on a CPU."""
    config = boundary_config.get_config("tiny")
    config.patterns = ("dense", "block(8)")
    config.depths = (1,)
    config.sequence = dict(seq_len=64, block_size=8, symbols=8)
    config.copy = dict(distances=(1, 2, 4, 7, 8, 9, 16, 40), phases=(0, 1, 7), steps=400)
    config.hops = dict(hops=(1, 2), crossings=(0, 1), chains=2, steps=40, curriculum=False)
    config.model = dict(d_model=32, num_heads=2, mlp_hidden=64, compute_dtype="float32", shared_layers=False)
    config.train = dict(batch=32, seeds=1, learning_rate=3e-3, warmup_steps=20, log_every=100)
    config.eval = dict(samples_per_cell=48, accuracy_bar=0.9, confidence=0.95, batch=128)
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


@pytest.mark.parametrize("preset", boundary_config.PRESETS)
def test_presets_are_valid(preset):
    config = BoundaryTaskConfig.from_config_dict(boundary_config.get_config(preset))
    for task in config.tasks:
        assert config.make_task(task).cells


@pytest.mark.parametrize("changes, message", [
    ({"sequence.symbols": 1}, "sequence.symbols"),
    ({"tasks": ("copy", "sort")}, "tasks: must be distinct names from copy, hops"),
    ({"patterns": ("block(0)",)}, "patterns"),
    ({"copy.phases": (8,)}, "copy.phases: must be < the block size 8"),
    ({"copy.distances": (60,)}, "copy.distances: 60 does not fit"),
    ({"hops.crossings": (8,)}, "hops.crossings"),
    ({"tasks": ("hops",), "hops.hops": (2,), "sequence": dict(seq_len=64, block_size=8, symbols=8)},
     "hops.hops: 2 chains of 2 hops in one block"),
    ({"tasks": ("hops",), "hops.chains": 5, "hops.hops": (4,)}, "hops.hops: 5 chains of 4 need 20 names"),
])
def test_bad_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        config = BoundaryTaskConfig.from_config_dict(tiny_config(**{"tasks": ("copy", "hops"), **changes}))
        for task in config.tasks:
            config.make_task(task)


def test_unknown_missing_and_mistyped_keys_are_refused():
    config = tiny_config()
    config.train.momentum = 0.9
    with pytest.raises(ValueError, match="train.momentum: unknown or missing key"):
        BoundaryTaskConfig.from_config_dict(config)
    config = tiny_config().to_dict()
    config["model"]["shared_layers"] = 1
    with pytest.raises(ValueError, match="model.shared_layers: must be True or False, got 1"):
        BoundaryTaskConfig.from_config_dict(config)
    config = tiny_config().to_dict()
    del config["seed"]
    with pytest.raises(ValueError, match="seed: missing key"):
        BoundaryTaskConfig.from_config_dict(config)


def test_copy_sequences_hold_one_value_and_probe_their_cell():
    task = CopyTask(64, 8, 8, distances=(1, 9, 40), phases=(0, 3, 7))
    rng = np.random.default_rng()
    batch = task.training_batch(rng, 16)
    values = batch.tokens >= VALUE
    assert (values.sum(axis=1) == 1).all()
    key = values.argmax(axis=1)
    assert np.array_equal(batch.weights, (np.arange(64)[None, :] > key[:, None]).astype(np.float32))
    assert (batch.targets == (batch.tokens[np.arange(16), key] - VALUE)[:, None]).all()
    probes = task.probes(rng, 20)
    cells = [task.cells[c] for c in probes.cells]
    assert np.array_equal(probes.queries - probes.keys, [c["distance"] for c in cells])
    assert np.array_equal(probes.queries % 8, [c["phase"] for c in cells])
    assert (probes.keys >= 0).all() and (probes.queries < 64).all()
    assert np.array_equal(probes.tokens[np.arange(len(cells)), probes.keys] - VALUE, probes.answers)
    assert ((probes.tokens >= VALUE).sum(axis=1) == 1).all()
    # Queries spread over every block that fits, not only the first.
    assert len(np.unique(probes.queries[probes.cells == 0] // 8)) > 3


def statements(tokens: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, first token, second token) of every two-token statement: filler never starts one, and
    statements never overlap, so reading left to right finds them all."""
    found, position = [], 0
    while position < len(tokens) - 1:
        if tokens[position] >= VALUE:
            found.append((position, tokens[position], tokens[position + 1]))
            position += 2
        else:
            position += 1
    return found


def follow_chain(task: HopTask, tokens: np.ndarray, use: int) -> tuple[int, list[int]]:
    """(value, starts of the statements visited): from the name used at position `use`, go to the latest
    earlier statement that defines it, and on through its source until a value."""
    program = statements(tokens)
    name, visited = tokens[use], []
    while True:
        start, _, source = max((s for s in program if s[0] + 1 < use and s[1] == name), key=lambda s: s[0])
        visited.append(start)
        if source < task.name_token:
            return source - VALUE, visited
        name, use = source, start + 1


def test_hop_curriculum_adds_longer_chains_in_equal_stages():
    task = HopTask(256, 32, 16, hops=(3, 1, 2), crossings=(0, 2), chains=4, curriculum=True)
    drawn = {progress: {cell["hops"] for cell in task.training_cells(progress)}
             for progress in (0.0, 0.33, 1 / 3, 0.5, 0.67, 0.99)}
    assert drawn == {0.0: {1}, 0.33: {1}, 1 / 3: {1, 2}, 0.5: {1, 2}, 0.67: {1, 2, 3}, 0.99: {1, 2, 3}}
    assert len(task.training_cells(0.0)) == 2  # both crossings of the 1-hop chains
    rng = np.random.default_rng(0)
    batch = task.training_batch(rng, 64, progress=0.1)
    # A 1-hop chain scores its query and nothing else: one scored position per chain.
    assert np.all(batch.weights.sum(axis=1) == 4)
    plain = HopTask(256, 32, 16, hops=(1, 2, 3), crossings=(0, 2), chains=4)
    assert plain.training_cells(0.0) == plain.cells
    settings = tiny_config().to_dict()
    settings["hops"]["curriculum"] = "yes"  # a plain dict: ml_collections would refuse the type itself
    with pytest.raises(ValueError, match="hops.curriculum: must be True or False"):
        BoundaryTaskConfig.from_config_dict(settings)


@pytest.mark.parametrize("hops, crossings, chains", [(1, 0, 2), (3, 0, 2), (2, 1, 2), (2, 3, 2), (2, 1, 4)])
def test_hop_sequences_are_programs_whose_links_cross_the_asked_edges(hops, crossings, chains):
    task = HopTask(128, 16, 8, hops=(hops,), crossings=(crossings,), chains=chains)
    rng = np.random.default_rng()
    for _ in range(20):
        tokens, targets, weights, route, answer = task.sequence(rng, hops, crossings)
        query = route[-1]
        program = statements(tokens)
        queries = [start for start, first, _ in program if first == task.query_token]
        assert len(program) == chains * (hops + 1) and len(queries) == chains
        assert tokens[query - 1] == task.query_token
        value, visited = follow_chain(task, tokens, query)
        assert value == answer and route[:-1].tolist() == [start + 1 for start in reversed(visited)]
        chain = sorted(visited) + [query - 1]
        assert len(visited) == hops
        assert np.array_equal(np.diff(np.array(chain) // 16), [crossings] * hops)
        # Scored: every query, and every statement that copies a name, each with its chain's value.
        scored = np.flatnonzero(weights)
        assert len(scored) == chains * hops and query in scored
        for position in scored:
            assert targets[position] == follow_chain(task, tokens, position)[0]


def test_wilson_interval_by_hand():
    low, high = boundary_tasks.wilson_interval(5, 20, 0.95)
    assert low == pytest.approx(0.1119, abs=1e-4) and high == pytest.approx(0.4687, abs=1e-4)
    low, high = boundary_tasks.wilson_interval(np.array([0, 10]), np.array([10, 10]), 0.95)
    assert low[0] == pytest.approx(0, abs=1e-12) and high[1] == pytest.approx(1)
    assert high[0] == pytest.approx(0.2775, abs=1e-4)


def test_chance_check_is_family_wise_over_the_task():
    def row(correct):
        return {"chance": 0.125, "cells": [{"unreachable": {"correct": c, "n": 200}} for c in correct]}

    rows = [row([25, 30, 24]), row([20, 45])]  # 45 / 200 = 0.225: far above 1/8
    boundary_tasks.check_chance(rows, 0.95)
    assert rows[0]["family_confidence"] == pytest.approx(1 - 0.05 / 5)
    assert rows[0]["agreement_unreachable"] == 1.0
    assert rows[1]["agreement_unreachable"] == 0.5
    assert rows[1]["cells"][1]["unreachable"]["at_chance"] is False


def test_shared_layers_train_one_block_applied_depth_times():
    config = BoundaryTaskConfig.from_config_dict(tiny_config(**{"model.shared_layers": True}))
    assert config.model_config(4).num_layers == 1
    looped = boundary_tasks.PatternModels(config, ("dense",), depth=4, steps=10)
    unshared = boundary_tasks.PatternModels(
        BoundaryTaskConfig.from_config_dict(tiny_config()), ("dense",), depth=4, steps=10)
    assert looped.repeats == 4 and unshared.repeats == 1
    blocks = {"looped": looped.params["blocks"], "unshared": unshared.params["blocks"]}
    assert len(blocks["looped"]) == 1 and len(blocks["unshared"]) == 4
    assert looped.parameters < unshared.parameters


def test_hop_probe_routes_need_h_plus_one_dense_layers():
    """The probes' routes run key, statement sources, query; under dense attention each link takes a layer after
    the one that binds names, so a route fits in order exactly when h + 1 <= depth."""
    task = HopTask(256, 32, 16, hops=(1, 2, 3), crossings=(0, 1, 2), chains=4)
    probes = task.probes(np.random.default_rng(), 5)
    hops = np.array([task.cells[c]["hops"] for c in probes.cells])
    assert np.array_equal(probes.keys, probes.routes[:, 0])
    assert np.array_equal((probes.routes >= 0).sum(1), hops + 1)
    for depth in (2, 3, 4):
        fits = reachability.layers_in_order("dense", 256, depth, probes.routes, task.route_start_layer) > 0
        assert np.array_equal(fits, hops + 1 <= depth)
    copy = CopyTask(64, 8, 8, distances=(1, 9), phases=(0, 5))
    copy_probes = copy.probes(np.random.default_rng(), 4)
    assert np.array_equal(copy_probes.routes, np.stack([copy_probes.keys, copy_probes.queries], 1))


def test_hop_bars_within_depth_and_in_order():
    """A chain of h links needs h + 1 layers: a depth-2 model is held to its one-hop cells only, a depth-3 one
    to two hops as well; the in-order bar counts each cell's in-order probes; the chance bar counts every
    unreachable cell."""
    def part(accuracy, n=200):
        return {"accuracy": accuracy, "n": n, "correct": round(accuracy * n), "at_chance": True}

    def row(depth, two_hop_accuracy, pattern="dense", two_hop_in_order=None):
        in_order = part(two_hop_accuracy) if depth >= 3 else part(0, n=0)
        cells = [{"hops": 1, "crossings": 0, "reachable": part(1.0), "unreachable": part(0, n=0),
                  "in_order": part(1.0)},
                 {"hops": 2, "crossings": 0, "reachable": part(two_hop_accuracy), "unreachable": part(0, n=0),
                  "in_order": in_order if two_hop_in_order is None else two_hop_in_order}]
        return {"task": "hops", "pattern": pattern, "depth": depth, "cells": cells}

    def bars(rows):
        return [check["holds"] for check in boundary_tasks.bar_checks({"config": {"accuracy_bar": 0.9},
                                                                       "results": rows})]

    assert bars([row(2, 0.3)]) == [True, True, True, True]
    assert bars([row(3, 0.3)]) == [False, True, False, False]
    # Reachable within depth but not in order (a relay short of layers): only the in-order bar forgives it.
    assert bars([row(3, 1.0), row(3, 0.3, "prefix", two_hop_in_order=part(0, n=0))]) == [True, True, False, True]
    assert boundary_tasks.agreement_within_depth(row(2, 0.3), 0.9) == 1.0
    assert boundary_tasks.agreement_within_depth(row(3, 0.3), 0.9) == 0.5
    assert boundary_tasks.agreement_within_depth(row(1, 0.3), 0.9) is None
    off_chance = row(2, 0.3, pattern="block(8)")
    off_chance["cells"][1]["unreachable"] = {**part(0.3), "at_chance": False}
    checks = boundary_tasks.bar_checks({"config": {"accuracy_bar": 0.9}, "results": [row(2, 0.3), off_chance]})
    assert not checks[1]["holds"] and "block(8) depth 2 h=2 e=0" in checks[1]["detail"]


def test_seeds_train_beside_each_other_and_the_first_is_the_one_seed_run():
    """Seed s of every pattern starts from config.seed + s; the batches are shared, so seed 0's models are the
    models of a one-seed run, and their predictions are the same."""
    changes = {"copy.steps": 30, "eval.samples_per_cell": 8}
    one = boundary_tasks.run(BoundaryTaskConfig.from_config_dict(tiny_config(**changes)))
    two = boundary_tasks.run(BoundaryTaskConfig.from_config_dict(tiny_config(**changes, **{"train.seeds": 2})))
    assert [(r["pattern"], r["seed"]) for r in two["results"]] == [("dense", 0), ("dense", 1), ("block(8)", 0),
                                                                   ("block(8)", 1)]
    def counts(row):  # the family-wise chance intervals widen with the number of rows, the counts do not
        return [(part, cell[part]["correct"], cell[part]["n"]) for cell in row["cells"]
                for part in ("reachable", "unreachable", "in_order")]

    for single, first in zip(one["results"], two["results"][::2]):
        assert counts(first) == counts(single)
        assert first["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert two["results"][0]["final_loss"] != two["results"][1]["final_loss"]
    assert "block(8) seed 1" in boundary_report.summary_text(two)
    with pytest.raises(ValueError, match="train.seeds"):
        BoundaryTaskConfig.from_config_dict(tiny_config(**{"train.seeds": 0}))


def test_topk_models_add_the_blocks_they_choose_and_are_not_held_to_chance_beyond_their_static_reach():
    """topk(8, 2) sees its own block plus two chosen ones: in the copy task the one value token is easy to
    choose, so the model answers keys that its static part, block(8), cannot reach, where block(8) stays at
    chance."""
    config = BoundaryTaskConfig.from_config_dict(tiny_config(patterns=("block(8)", "topk(8, 2)")))
    assert set(config.selections) == {"topk(8, 2)"}
    results = boundary_tasks.run(config)
    block, topk = results["results"]
    assert (block["chooses"], topk["chooses"]) == (False, True)
    assert [c["reachable_fraction"] for c in block["cells"]] == [c["reachable_fraction"] for c in topk["cells"]]
    assert block["agreement_unreachable"] == 1.0 and topk["agreement_unreachable"] is None
    assert all("at_chance" not in c["unreachable"] for c in topk["cells"])
    assert topk["pooled_unreachable"]["low"] > 0.5 > block["pooled_unreachable"]["high"]
    with pytest.raises(ValueError, match="the topk parts of one run must be one topk"):
        BoundaryTaskConfig.from_config_dict(tiny_config(patterns=("topk(8, 2)", "topk(8, 1)")))


@pytest.fixture(scope="module")
def tiny_results():
    return boundary_tasks.run(BoundaryTaskConfig.from_config_dict(tiny_config()))


def test_tiny_copy_task_learns_exactly_what_reachability_allows(tiny_results):
    rows = {row["pattern"]: row for row in tiny_results["results"]}
    dense, block = rows["dense"], rows["block(8)"]
    assert dense["unreachable_parts"] == 0 and dense["min_accuracy"] >= 0.95
    # block(8) at depth 1 sees its own block only: distances 1..7 from phase 7 are reachable, 8 and more never.
    for cell in block["cells"]:
        expected = cell["distance"] <= cell["phase"]
        assert cell["reachable_fraction"] == float(expected)
    assert block["agreement_reachable"] == 1.0
    assert block["agreement_unreachable"] == 1.0
    pooled = block["pooled_unreachable"]
    assert pooled["low"] <= 1 / 8 <= pooled["high"]
    assert block["agreement_in_order"] == 1.0 and block["in_order_parts"] == block["reachable_parts"]
    checks = boundary_tasks.bar_checks(tiny_results)
    assert [check["holds"] for check in checks] == [True, True, True, True]


def test_outputs_and_summary_rows(tiny_results, tmp_path):
    paths = boundary_report.write(tiny_results, tmp_path / "out")
    assert {p.name for p in paths} == {"report.md", "summary.json", "results.json", "copy_accuracy.png",
                                       "agreement.png"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["pattern"], r["depth"]) for r in summary] == [("dense", 1), ("block(8)", 1)]
    assert {"pattern", "depth", "agreement_reachable", "agreement_unreachable"} <= set(summary[0])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| dense reaches >= 0.95 on every cell | yes |" in report
    text = boundary_report.summary_text(tiny_results).splitlines()
    assert text[0].startswith("holds: copy: dense reaches >= 0.95") and len(text) == 4 + 1 + 2
    assert text[-1].split()[:4] == ["copy", "block(8)", "1", "1.000"]
    with pytest.raises(ValueError, match="exists and is not a folder"):
        boundary_report.check_out_dir(tmp_path / "out" / "report.md")


def test_cli_trains_both_tasks_and_writes_the_report(tmp_path):
    overrides = ["--config.tasks=('copy', 'hops')", "--config.patterns=('dense', 'block(8)')", "--config.copy.steps=5",
                 "--config.hops.steps=5", "--config.hops.chains=2", "--config.hops.crossings=(0, 1)",
                 "--config.eval.samples_per_cell=4", "--config.depths=(2,)"]
    command = [sys.executable, "-m", "lm_experiment.boundary_tasks", "--config", "configs/boundary_tasks.py:tiny",
               "--out", str(tmp_path / "cli"), *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert {(r["task"], r["depth"]) for r in results["results"]} == {("copy", 2), ("hops", 2)}
    assert (tmp_path / "cli" / "hops_accuracy.png").exists()
    hop_rows = [r for r in results["results"] if r["task"] == "hops" and r["pattern"] == "block(8)"]
    # block(8): links one edge apart never reach the value at depth 2; inside one block they always do.
    by_cell = {(c["hops"], c["crossings"]): c["reachable_fraction"] for c in hop_rows[0]["cells"]}
    assert by_cell[(1, 1)] == 0.0 and by_cell[(1, 0)] == 1.0
    bad = subprocess.run([*command[:3], "--config", "configs/boundary_tasks.py:tiny", "--out", str(tmp_path / "x"),
                          "--config.copy.phases=(8,)"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "copy.phases: must be < the block size 8" in bad.stderr


def test_report_tables_keep_their_columns_for_union_patterns():
    config = BoundaryTaskConfig.from_config_dict(tiny_config(patterns=("window(4) | sinks(1)",),
                                                             copy=dict(distances=(1, 9), phases=(0,), steps=2)))
    report = boundary_report.markdown(boundary_tasks.run(config))
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert any("window(4) \\| sinks(1)" in line for line in tables)
    header = next(line for line in tables if line.startswith("| task | pattern |"))
    row = next(line for line in tables if line.startswith("| copy | window(4)"))
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", header)) == 11
