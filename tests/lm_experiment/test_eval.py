"""Evaluation: the loss arithmetic and bootstrap intervals against hand computations, windowing and bucketing
on hand-made losses, the diagnostics' tasks and reachability overlay, an end-to-end eval of a minuscule
trained checkpoint (every output file, finite numbers, labelled override), and clear errors.

The minuscule run (tiny_run.py) trains 3 steps; the eval runs on 2 documents of 300 tokens per eval set with 1-3
fine-tuning steps, so compiling dominates.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import eval as eval_cli
from lm_experiment import (data, diagnostics, eval_options, eval_runs, eval_statistics, evaluation, paired, report,
                           report_text, scoring)
from lm_experiment.measures import Interval
from lm_experiment.checkpointing import save_config
from sparse_attention import reachability
from sparse_attention.patterns import parse
from tiny_run import tiny_config, train_tiny

FAST_EVAL = ["--lengths", "32", "64", "128", "--max-documents", "2", "--max-document-tokens", "300",
             "--bootstrap-samples", "50", "--ablation-targets", "4", "--diag-steps", "2", "--tracking-steps", "1",
             "--diag-samples", "2", "--diag-batch", "4", "--diag-depths", "1", "2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("eval"))


# --------------------------------------------------------------------------------------------------
# Arithmetic and statistics


def test_bits_per_byte_and_perplexity_by_hand():
    # Document A: 3 bytes at ln 2 nats each; document B: 1 byte at ln 8 nats. Pooled: 6 ln 2 / 4 tokens.
    sums, counts = np.array([3 * math.log(2), math.log(8)]), np.array([3.0, 1.0])
    bpb = eval_statistics.loss_interval(sums, counts, samples=10, seed=0)
    ppl = eval_statistics.loss_interval(sums, counts, samples=10, seed=0, unit="perplexity")
    nats = eval_statistics.loss_interval(sums, counts, samples=10, seed=0, unit="nats_per_token")
    assert bpb["mean"] == pytest.approx(1.5)
    assert ppl["mean"] == pytest.approx(2 ** 1.5)
    assert nats["mean"] == pytest.approx(1.5 * math.log(2))
    # Resamples are only A's (1 bit) or only B's (3 bits) at the extremes.
    assert 1.0 - 1e-9 <= bpb["low"] <= bpb["mean"] <= bpb["high"] <= 3.0 + 1e-9
    assert eval_statistics.bits_per_byte(math.log(2) * 8, bytes_per_token=2) == pytest.approx(4.0)


def test_bootstrap_of_identical_documents_has_zero_width():
    rng = np.random.default_rng()
    tokens = float(rng.integers(1, 1000))
    mean = rng.uniform(0.5, 5)
    point, low, high = eval_statistics.bootstrap_ratio(np.full(7, mean * tokens), np.full(7, tokens), samples=200,
                                                  seed=int(rng.integers(1000)))
    assert point == pytest.approx(mean) and low == pytest.approx(mean) and high == pytest.approx(mean)


def test_bootstrap_of_two_documents_matches_enumeration():
    # Two documents resample to AA, AB, BA, BB with probability 1/4, 1/4, 1/4, 1/4: the ratio is A's mean,
    # the pooled mean (twice) or B's mean. The 2.5th and 97.5th percentiles are therefore the two means, and
    # the 40th and 60th both the pooled mean.
    rng = np.random.default_rng()
    sums, counts = rng.uniform(1, 100, 2), rng.integers(1, 50, 2).astype(float)
    means = sums / counts
    pooled = sums.sum() / counts.sum()
    point, low, high = eval_statistics.bootstrap_ratio(sums, counts, samples=4000, seed=int(rng.integers(1000)))
    assert point == pytest.approx(pooled)
    assert low == pytest.approx(means.min()) and high == pytest.approx(means.max())
    _, low, high = eval_statistics.bootstrap_ratio(sums, counts, samples=4000, seed=1, confidence=0.2)
    assert low == pytest.approx(pooled) and high == pytest.approx(pooled)


def test_bootstrap_interval_of_many_documents_matches_the_normal_limit():
    rng = np.random.default_rng()
    documents, tokens, sigma = 400, 100.0, 0.3
    means = rng.normal(2.0, sigma, documents)
    point, low, high = eval_statistics.bootstrap_ratio(means * tokens, np.full(documents, tokens), samples=2000, seed=3)
    half_width = 1.96 * means.std() / math.sqrt(documents)
    assert point == pytest.approx(means.mean())
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert low < point < high


def test_bootstrap_leaves_out_entries_without_tokens():
    sums = np.array([[1.0, 0.0], [3.0, 0.0]])
    counts = np.array([[1.0, 0.0], [1.0, 0.0]])
    point, low, high = eval_statistics.bootstrap_ratio(sums, counts, samples=100, seed=0)
    assert point[0] == pytest.approx(2.0) and np.isnan(point[1]) and np.isnan(low[1]) and np.isnan(high[1])
    with pytest.raises(ValueError, match="at least one document"):
        eval_statistics.bootstrap_ratio(np.zeros(0), np.zeros(0), samples=10, seed=0)


def test_paired_difference_cancels_what_documents_share():
    # Documents differ by up to 3 nats, while A exceeds B by exactly 0.25 in each: the separate intervals of A
    # and B overlap widely, the paired interval of A - B is that 0.25 and nothing else.
    rng = np.random.default_rng(5)
    difficulty = rng.uniform(0.0, 3.0, 9)
    # As for block start and block rest: each document's share of the tokens is the same in both.
    tokens_a = rng.integers(5, 50, 9).astype(float)
    tokens_b = 7 * tokens_a
    sums_a, sums_b = (difficulty + 0.25) * tokens_a, difficulty * tokens_b
    args = dict(samples=500, seed=2)
    _, low_a, high_a = eval_statistics.bootstrap_ratio(sums_a, tokens_a, **args)
    _, low_b, high_b = eval_statistics.bootstrap_ratio(sums_b, tokens_b, **args)
    assert low_a < high_b and low_b < high_a
    point, low, high = eval_statistics.bootstrap_ratio_difference(sums_a, tokens_a, sums_b, tokens_b, **args)
    pooled = sums_a.sum() / tokens_a.sum() - sums_b.sum() / tokens_b.sum()
    assert point == pytest.approx(pooled) == pytest.approx(0.25)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)
    with pytest.raises(ValueError, match="per-document vectors"):
        eval_statistics.bootstrap_ratio_difference(sums_a, tokens_a, sums_b[:3], tokens_b[:3], **args)


# --------------------------------------------------------------------------------------------------
# Windows and bucketing


def test_log_position_edges_and_buckets():
    assert eval_statistics.log_position_edges(64).tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert eval_statistics.log_position_edges(100).tolist() == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert eval_statistics.log_position_edges(1).tolist() == [0, 1]
    assert eval_statistics.log_position_edges(2).tolist() == [0, 1, 2]
    positions = np.arange(100)
    buckets = eval_statistics.position_buckets(positions, 100)
    edges = eval_statistics.log_position_edges(100)
    for position, bucket in zip(positions, buckets):
        assert edges[bucket] <= position < edges[bucket + 1]


def test_block_offsets_on_own_and_shifted_grids():
    positions = np.arange(20)
    assert eval_statistics.block_offsets(positions, 8).tolist() == [p % 8 for p in range(20)]
    # block(8, 3): blocks start where (p + 3) % 8 == 0, i.e. at 5, 13; offset 0 there.
    offsets = eval_statistics.block_offsets(positions, 8, grid_offset=3)
    assert offsets[5] == 0 and offsets[13] == 0 and offsets[4] == 7
    pattern = parse("block(8, 3)")
    for p in range(1, 20):  # offset 0 exactly where the pattern cuts the edge to the previous token
        assert (offsets[p] == 0) == (not pattern.mask(np.array(p), np.array(p - 1)))
    # The control grid's edges sit B/2 later.
    shifted = eval_statistics.block_offsets(positions, 8, grid_offset=0, shift=4)
    assert shifted[4] == 0 and shifted[12] == 0 and shifted[3] == 7


def test_document_windows_predict_every_token_once():
    rng = np.random.default_rng()
    documents = [rng.integers(0, 256, n).astype(np.uint8) for n in (1, 2, 17, 64, 65, 130)]
    for length in (1, 7, 64):
        rows, owner, starts, targets = scoring.document_windows(documents, length)
        predicted = {(d, s + i + 1) for d, s, t in zip(owner, starts, targets) for i in range(t)}
        assert predicted == {(d, t) for d, doc in enumerate(documents) for t in range(1, len(doc))}
        for row, d, s, t in zip(rows, owner, starts, targets):
            assert np.array_equal(row[:t + 1], documents[d][s:s + t + 1])
        assert scoring.planned_tokens(documents, length, 10**9, 4) == len(rows) * length


def test_documents_are_cut_into_named_chunks():
    documents = [np.arange(n, dtype=np.uint8) for n in (10, 9, 1, 4)]
    chunks, names = evaluation.chunk_documents(documents, ["a", "b", "c", "d"], 4)
    # b's last chunk and c hold 1 token, which predicts nothing.
    assert names == ["a#0", "a#1", "a#2", "b#0", "b#1", "d#0"]
    assert [chunk.tolist() for chunk in chunks[:3]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(chunk) for chunk in chunks[3:]] == [4, 4, 4]
    for bad in (0, 1, True, 2.5):
        with pytest.raises(ValueError, match="document_chunk_tokens"):
            eval_options.EvalOptions(document_chunk_tokens=bad)


NAMES = tuple(f"doc{i}" for i in range(40))


def hand_made_model(label, pattern, nll, tokens, start_nll, start_tokens, *, names=NAMES, grid=(16, 0),
                    seed=None) -> dict:
    """A results["models"] entry that holds only what paired differences read: per-document sums at C=64 and,
    unless seed is None, the training seed."""
    sums = {"start_offsets": 8, "nll_nats": list(nll), "tokens": list(tokens), "start_nll_nats": list(start_nll),
            "start_tokens": list(start_tokens)}
    return {"label": label, "eval_pattern": pattern, "overrides": {},
            **({} if seed is None else {"training": {"seed": seed}}),
            "block_grid": {"size": grid[0], "offset": grid[1], "source": "pattern"},
            "language_model": {"books:long": {"document_names": list(names), "skipped": [],
                                              "lengths": [{"length": 64, "per_document": sums}]}}}


def hand_made_runs():
    # Documents differ in difficulty; the two window seeds exceed dense by 0.1 and 0.3 nats per token on every
    # document (0.4 and 0.6 at block start), so their pooled excess is 0.2 (0.5) everywhere.
    rng = np.random.default_rng(7)
    difficulty = rng.uniform(1.0, 3.0, len(NAMES))
    tokens = rng.integers(50, 500, len(NAMES))
    start = rng.integers(5, 20, len(NAMES))

    def run(label, pattern, excess, start_excess, **where):
        return hand_made_model(label, pattern, (difficulty + excess) * tokens, tokens,
                               (difficulty + 1 + start_excess) * start, start, **where)

    return run, [run("dense_s0", "dense", 0.0, 0.0), run("window_s0", "window(8)", 0.1, 0.4),
                 run("window_s1", "window(8)", 0.3, 0.6), run("block_s0", "block(16)", 0.05, 2.0),
                 run("shifted_s0", "shifted(16)", 0.0, 1.0)]


def test_paired_differences_of_hand_made_sums():
    run, models = hand_made_runs()
    settings = {"eval_sets": {"books:long": {}}, "bootstrap_samples": 300, "seed": 1, "confidence": 0.95}
    differences, skipped = paired.paired_differences(models, settings)
    assert skipped == []
    # Default baselines: dense and the plain block, not the shifted schedule.
    assert {(d["variant"], d["baseline"]) for d in differences} == {
        (variant, baseline) for baseline in ("dense", "block(16)")
        for variant in ("dense", "window(8)", "block(16)", "shifted(16)") if variant != baseline}
    (entry,) = [d for d in differences if d["variant"] == "window(8)" and d["baseline"] == "dense"]
    assert entry["variant_runs"] == ["window_s0", "window_s1"] and entry["baseline_runs"] == ["dense_s0"]
    assert (entry["eval_set"], entry["length"], entry["documents"]) == ("books:long", 64, len(NAMES))
    for key, nats in (("overall", 0.2), ("block_start", 0.5)):
        for bound in ("mean", "low", "high"):
            assert entry[key][bound] == pytest.approx(nats / math.log(2)), (key, bound)
    assert entry["per_run_overall"] == {"window_s0": pytest.approx(0.1 / math.log(2)),
                                        "window_s1": pytest.approx(0.3 / math.log(2))}
    assert entry["per_run_block_start"] == {"window_s0": pytest.approx(0.4 / math.log(2)),
                                            "window_s1": pytest.approx(0.6 / math.log(2))}
    assert entry["seed_matched"]["seeds"] == [] and "window_s0 has no training seed" in entry["seed_matched"]["reason"]
    json.dumps(differences, allow_nan=False)

    only_block, _ = paired.paired_differences(models, settings, baselines=("block(16, 0)",))
    assert {d["baseline"] for d in only_block} == {"block(16)"}
    _, missing = paired.paired_differences(models, settings, baselines=("window(4)",))
    assert missing[0]["baseline"] == "window(4)" and "no run" in missing[0]["reason"]
    with pytest.raises(ValueError, match="baselines: bad pattern spec 'blok"):
        paired.paired_differences(models, settings, baselines=("blok(16)",))


def test_seed_matched_differences_pair_runs_of_one_seed():
    run, _ = hand_made_runs()
    # Seed 1 is harder for both variants (+0.5 nats everywhere): matched by seed, each pair's difference is the
    # variant's own excess (0.1, 0.3, 0.2 over seeds 0-2 overall), which pooling across seeds would also give
    # here; only seeds on both sides count (the baseline's seed 3 and the variant's seed 4 do not).
    window = [run(f"window_s{seed}", "window(8)", excess + (0.5 if seed == 1 else 0.0), 0.4, seed=seed)
              for seed, excess in ((0, 0.1), (1, 0.3), (2, 0.2), (4, 9.0))]
    dense = [run(f"dense_s{seed}", "dense", 0.5 if seed == 1 else 0.0, 0.0, seed=seed) for seed in (0, 1, 2, 3)]
    settings = {"eval_sets": {"books:long": {}}, "bootstrap_samples": 50, "seed": 0, "confidence": 0.95}
    (entry,), _ = paired.paired_differences([*window, *dense], settings, ("dense",))
    matched = entry["seed_matched"]
    assert matched["seeds"] == [0, 1, 2] and matched["reason"] is None
    assert matched["overall"]["per_seed"] == pytest.approx(np.array([0.1, 0.3, 0.2]) / math.log(2))
    half_width = 4.302653 * 0.1 / math.sqrt(3) / math.log(2)  # t(0.975, 2 df) * sd over seeds / sqrt(3)
    assert matched["overall"]["mean"] == pytest.approx(0.2 / math.log(2))
    assert matched["overall"]["low"] == pytest.approx(0.2 / math.log(2) - half_width, rel=1e-5)
    assert matched["overall"]["high"] == pytest.approx(0.2 / math.log(2) + half_width, rel=1e-5)
    assert matched["block_start"]["per_seed"] == pytest.approx([0.4 / math.log(2)] * 3)
    assert matched["block_start"]["low"] == pytest.approx(matched["block_start"]["high"])

    (single,), _ = paired.paired_differences([window[0], dense[0]], settings, ("dense",))
    assert single["seed_matched"]["seeds"] == [0] and single["seed_matched"]["overall"]["low"] is None
    (apart,), _ = paired.paired_differences([window[3], dense[3]], settings, ("dense",))
    assert apart["seed_matched"]["seeds"] == [] and "variant [4], baseline [3]" in apart["seed_matched"]["reason"]
    text = "\n".join(report._paired_lines({"settings": settings, "paired": [entry], "paired_skipped": []}))
    assert "window(8) − dense (seeds 0, 1, 2)" in text and "(+0.144, +0.433, +0.289)" in text


def test_paired_differences_skip_what_cannot_be_paired():
    run, models = hand_made_runs()
    renamed = run("window_s2", "window(8)", 0.2, 0.5, names=(*NAMES[:-1], "other"))
    coarse = run("repaired_s0", "repaired(32, 4, bridge)", 0.0, 0.0, grid=(32, 0))
    settings = {"eval_sets": {"books:long": {}}, "bootstrap_samples": 50, "seed": 0}
    differences, skipped = paired.paired_differences([*models[:3], renamed, coarse], settings, ("dense",))
    assert differences == []
    reasons = {entry["variant"]: entry["reason"] for entry in skipped}
    assert "document names differ" in reasons["window(8)"] and "window_s2" in reasons["window(8)"]
    assert "block grids differ" in reasons["repaired(32, 4, bridge)"]


def hand_made_results(models, **settings) -> dict:
    return {"created": "2025-01-01T00:00:00+00:00", "backend": "cpu", "wall_time_s": 10.0, "models": models,
            "settings": {"lengths": [64], "eval_sets": {"books:long": {"document_names": list(NAMES)}},
                         "bootstrap_samples": 200, "seed": 0, "confidence": 0.95, **settings}}


def test_merge_results_pools_runs_and_refuses_other_settings():
    _, (dense, window_s0, window_s1, block, _) = hand_made_runs()
    merged = paired.merge_results(
        [hand_made_results([dense, window_s0]), hand_made_results([dense, window_s1, block], batch_tokens=4)],
        ["out/a", "out/b"])
    assert [m["label"] for m in merged["models"]] == ["dense_s0 (a)", "window_s0", "dense_s0 (b)", "window_s1",
                                                      "block_s0"]
    (entry,) = [d for d in merged["paired"] if (d["variant"], d["baseline"]) == ("window(8)", "dense")]
    assert entry["variant_runs"] == ["window_s0", "window_s1"]
    assert entry["baseline_runs"] == ["dense_s0 (a)", "dense_s0 (b)"]
    assert entry["overall"]["mean"] == pytest.approx(0.2 / math.log(2))
    assert merged["wall_time_s"] == 20.0 and [part["source"] for part in merged["merged_from"]] == ["out/a", "out/b"]
    with pytest.raises(ValueError, match=r"settings\.bootstrap_samples: 200 in out/a but 100 in out/b"):
        paired.merge_results([hand_made_results([dense]), hand_made_results([block], bootstrap_samples=100)],
                                 ["out/a", "out/b"])
    chunked = hand_made_results([block], document_chunk_tokens=4096)
    with pytest.raises(ValueError, match=r"settings\.document_chunk_tokens: None in .* but 4096"):
        paired.merge_results([hand_made_results([dense]), chunked])
    with pytest.raises(ValueError, match="given twice"):
        paired.merge_results([hand_made_results([dense])] * 2, ["out/a", "out/a"])


# --------------------------------------------------------------------------------------------------
# Diagnostics


def test_edge_pair_sequences_and_reachability():
    task = diagnostics.EdgePairTask(64, 16, 0, 0)
    batch = task.batch(np.random.default_rng(), np.array([0, 15]))
    assert task.query_positions.tolist() == [16, 32, 48]
    for row in range(2):
        uppercase = np.flatnonzero(np.isin(batch.tokens[row], diagnostics.UPPERCASE))
        assert uppercase.tolist() == [batch.keys[row, 0]]
        assert np.all(batch.answers[row] == batch.tokens[row, batch.keys[row, 0]])
        assert np.all(batch.tokens[row, batch.queries[row]] == diagnostics.QUERY)
    training = task.batch(np.random.default_rng(), np.array([3]), training=True)
    assert set(task.query_positions) <= set(training.queries[0].tolist())
    # block(16): no query of a later block sees the key; window(16) at depth 2 reaches back 30 positions.
    keys = np.array([0, 15])[:, None]
    assert not reachability.reachable(parse("block(16)"), 64, 2, task.query_positions[None, :], keys).any()
    window = reachability.reachable(parse("window(16)"), 64, 2, task.query_positions[None, :], keys)
    assert window.tolist() == [[True, False, False], [True, True, False]]


def test_variable_tracking_sequences():
    task = diagnostics.VariableTrackingTask(96, 16, 0)
    assert task.max_chain == 5
    lengths = np.array([1, 3, 5])
    batch = task.batch(np.random.default_rng(), lengths)
    for row, length in enumerate(lengths):
        text = bytes(batch.tokens[row].astype(np.uint8)).decode()
        assignments = {}
        for block in range(6):  # at most one statement of each chain per block
            part = text[block * 16:(block + 1) * 16]
            for at in range(len(part) - 3):
                if part[at + 1] == "=" and part[at + 3] == ";":
                    assignments[part[at]] = part[at + 2]
        query = batch.queries[row, 0]
        name = text[query - 1]
        assert text[query] == "?" and query // 16 == 5
        for _ in range(length):  # follow the chain back to its value
            name = assignments[name]
        assert name.isupper() and ord(name) == batch.answers[row, 0] == batch.tokens[row, batch.keys[row, 0]]
        assert len(assignments) == 2 * length


# --------------------------------------------------------------------------------------------------
# End to end


def test_eval_of_a_trained_checkpoint_writes_every_output(trained_run, tmp_path):
    out = tmp_path / "report"
    assert eval_cli.main(["--workdirs", str(trained_run), "--out", str(out), *FAST_EVAL]) == 0
    for name in ("report.md", "results.json", *report.PLOTS):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"settings", "models", "created", "wall_time_s"}
    (model,) = results["models"]
    assert model["label"] == "tiny" and model["eval_pattern"] == "repaired(16, 2, bridge)" and model["step"] == 3
    assert set(model) >= {"training", "active_fraction", "language_model", "diagnostics", "reachability"}
    assert model["training"]["seed"] == json.loads((trained_run / "config.json").read_text())["seed"]
    assert set(model["language_model"]) == {"code:long", "books:long"}
    for eval_set, entry in model["language_model"].items():
        assert [e["length"] for e in entry["lengths"]] == [32, 64, 128]
        for e in entry["lengths"]:
            assert e["documents"] == 2 and e["tokens"] == 2 * 299
            for key in ("bits_per_byte", "perplexity", "nats_per_token"):
                assert e[key]["low"] <= e[key]["mean"] <= e[key]["high"]
            assert e["bits_per_byte"]["mean"] == pytest.approx(e["nats_per_token"]["mean"] / math.log(2))
            assert e["perplexity"]["mean"] == pytest.approx(math.exp(e["nats_per_token"]["mean"]))
            assert e["by_block_offset"]["grid"] == {"size": 16, "offset": 0, "source": "pattern"}
            assert (e["distant_context_ablation"] is None) == (e["length"] <= 16)
    found = diagnostics.Diagnostics.from_json(model["diagnostics"])
    assert found.to_json() == model["diagnostics"]  # the typed result reads back what was written
    edge = found.edge_pair
    assert np.array(edge.accuracy).shape == np.array(edge.reachable).shape == (len(edge.offsets), 3)
    tracking = found.variable_tracking
    assert tracking.depths == [1, 2] and np.array(tracking.accuracy).shape == (2, 3)
    assert [tune.depth for tune in tracking.fine_tune] == [1, 2]

    def numbers(node):
        if isinstance(node, dict):
            return [x for value in node.values() for x in numbers(value)]
        if isinstance(node, list):
            return [x for value in node for x in numbers(value)]
        return [node] if isinstance(node, (int, float)) and not isinstance(node, bool) else []

    values = numbers(results)
    assert len(values) > 500 and all(math.isfinite(v) for v in values)
    text = (out / "report.md").read_text()
    assert "| tiny |" in text and "C=128" in text


def test_pattern_override_is_labelled(trained_run, tmp_path):
    out = tmp_path / "override"
    argv = ["--checkpoint", str(trained_run / "checkpoints" / "3"), "--pattern-override", "window(8)", "--out",
            str(out), "--no-diagnostics", *FAST_EVAL[:6], "--bootstrap-samples", "20"]
    assert eval_cli.main(argv) == 0
    (model,) = json.loads((out / "results.json").read_text())["models"]
    assert model["label"] == "tiny [eval window(8)]"
    assert model["overrides"]["attention.pattern"] == {"trained": "repaired(16, 2, bridge)", "eval": "window(8)"}
    assert model["block_grid"]["source"] == "reference"
    assert "tiny [eval window(8)]" in (out / "report.md").read_text()
    # The same override through --config.KEY=VALUE.
    runs = eval_runs.load_runs([str(trained_run)], overrides=eval_runs.parse_overrides(
        ["--config.attention.pattern=window(8)"]))
    assert runs[0].label == "tiny [eval window(8)]" and runs[0].schedule == parse("window(8)")


def test_merge_of_separately_evaluated_runs(trained_run, tmp_path, capsys):
    # Two evaluations apart (the trained pattern, and block(16) on the same grid), then one report from both.
    # C = W = 32: two blocks per window (where the patterns differ), no ablation.
    cheap = ["--no-diagnostics", "--eval-sets", "books:long", "--lengths", "32", "--trailing-window", "32",
             "--max-documents", "2", "--max-document-tokens", "200", "--document-chunk-tokens", "50",
             "--bootstrap-samples", "20", "--batch-tokens", "256"]
    assert eval_cli.main(["--workdirs", str(trained_run), "--out", str(tmp_path / "trained"), *cheap]) == 0
    assert eval_cli.main(["--workdirs", str(trained_run), "--pattern-override", "block(16)", "--out",
                          str(tmp_path / "block"), *cheap]) == 0
    alone = json.loads((tmp_path / "trained" / "results.json").read_text())
    names = alone["settings"]["eval_sets"]["books:long"]["document_names"]
    assert len(names) == 8 and names[0].endswith("#0") and names[3].endswith("#3")
    assert alone["settings"]["document_chunk_tokens"] == 50 and alone["paired"] == []

    out = tmp_path / "merged"
    argv = ["--merge", str(tmp_path / "trained" / "results.json"), str(tmp_path / "block"), "--out", str(out),
            "--baselines", "repaired(16, 2, bridge)"]
    assert eval_cli.main(argv) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in merged["models"]] == ["tiny", "tiny [eval block(16)]"]
    (entry,) = merged["paired"]
    assert entry["baseline"] == "repaired(16, 2, bridge)" and entry["variant_runs"] == ["tiny [eval block(16)]"]
    assert entry["documents"] == 8 and entry["overall"]["low"] <= entry["overall"]["mean"] <= entry["overall"]["high"]
    trained, block = (m["language_model"]["books:long"]["lengths"][0] for m in merged["models"])
    assert trained["per_document"]["tokens"] == [49] * 8
    assert entry["overall"]["mean"] == pytest.approx(block["bits_per_byte"]["mean"] - trained["bits_per_byte"]["mean"])
    assert entry["overall"]["mean"] != 0
    assert "## Paired differences" in (out / "report.md").read_text()

    assert eval_cli.main([*argv, "--workdirs", str(trained_run)]) == 2
    assert "cannot be combined with --workdirs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        eval_runs.load_runs([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    save_config(tmp_path / "empty", tiny_config())
    with pytest.raises(ValueError, match="has no checkpoints"):
        eval_runs.load_runs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="checkpoint"):
        eval_runs.load_runs(checkpoints=[str(tmp_path / "empty" / "checkpoints" / "7")])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        eval_runs.load_runs([])


def test_mismatched_config_gives_a_clear_error(trained_run, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"model\.d_model: the eval config has 64 .* trained with 32"):
        eval_runs.load_runs([str(trained_run)], overrides=[("model.d_model", 64)])
    with pytest.raises(ValueError, match="unknown key 'patern'"):
        eval_runs.load_runs([str(trained_run)], overrides=[("attention.patern", "dense")])
    with pytest.raises(ValueError, match="attention.pattern"):
        eval_runs.load_runs([str(trained_run)], pattern_override="blok(8)")
    argv = ["--workdirs", str(trained_run), "--out", str(tmp_path), "--config.model.num_layers=3"]
    assert eval_cli.main(argv) == 2
    assert "model.num_layers" in capsys.readouterr().err


def test_empty_eval_set_gives_a_clear_error(trained_run):
    runs = eval_runs.load_runs([str(trained_run)])
    for options in (eval_options.EvalOptions(max_documents=0, diagnostics=None),
                    eval_options.EvalOptions(max_document_tokens=1, diagnostics=None)):
        with pytest.raises(ValueError, match="code:long is empty"):
            evaluation.evaluate(runs, options)
    with pytest.raises(ValueError, match="document_chunk_tokens: chunks of 64 tokens .* C = 64"):
        evaluation.evaluate(runs, eval_options.EvalOptions(lengths=(32, 64), document_chunk_tokens=64,
                                                           diagnostics=None))
    with pytest.raises(ValueError, match="eval_sets"):
        eval_options.EvalOptions(eval_sets=("code",))
    with pytest.raises(ValueError, match="lengths"):
        eval_options.EvalOptions(lengths=(0,))


def test_runs_of_one_pattern_share_a_color_and_differ_in_line_style():
    models = [{"label": "block_s0", "eval_pattern": "block(64)"}, {"label": "dense_s0", "eval_pattern": "dense"},
              {"label": "block_s1", "eval_pattern": "block(64)"}, {"label": "dense_s1", "eval_pattern": "dense"}]
    styles = report.line_styles(models)
    assert styles["block_s0"][0] == styles["block_s1"][0] != styles["dense_s0"][0] == styles["dense_s1"][0]
    assert styles["block_s0"][1] == styles["dense_s0"][1] != styles["block_s1"][1] == styles["dense_s1"][1]


def test_report_numbers_that_round_to_zero_carry_no_sign():
    assert report_text.interval_text(Interval(-1e-9, -0.0004, 0.002)) == "0.000 [0.000, 0.002]"
    assert report_text.number_text(-0.00001, "+.3f") == "0.000" and report_text.number_text(-0.012, "+.3f") == "-0.012"
    assert report_text.number_text(1234.5, ",.0f") == "1,234"


def test_an_out_path_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out, message in ((taken, f"--out: {taken} is a file, not a folder"),
                         (taken / "report", f"--out: {taken} is a file, not a folder, so {taken / 'report'} cannot")):
        # A workdir that does not exist would fail later, in loading: the --out check must come first.
        assert eval_cli.main(["--workdirs", str(tmp_path / "missing"), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    report.check_out_dir(tmp_path / "new" / "deeper")  # creatable


def test_bad_data_is_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "data" / "code").mkdir(parents=True)
    (tmp_path / "data" / "code" / "manifest.json").write_text("{ cut short")
    arguments = ["--workdirs", str(trained_run), "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                 "--eval-sets", "code:long", *FAST_EVAL]
    assert eval_cli.main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"eval.py: error: cannot read {tmp_path / 'data' / 'code' / 'manifest.json'}")


def test_a_users_own_long_documents_in_two_commands(trained_run, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for index in range(3):
        (books / f"book{index}.txt").write_text(f"Chapter {index}. " + "It was a long night. " * 30)
    data_dir = tmp_path / "data"
    data.main(["prepare", "--corpus", "files", "--name", "mybooks", "--source", f"long={books}",
               "--data-dir", str(data_dir)])
    out = tmp_path / "report"
    assert eval_cli.main(["--workdirs", str(trained_run), "--eval-sets", "mybooks:long", "--data-dir", str(data_dir),
                          "--out", str(out), *FAST_EVAL, "--no-diagnostics"]) == 0
    (model,) = json.loads((out / "results.json").read_text())["models"]
    assert model["language_model"]["mybooks:long"]["lengths"][0]["documents"] == 2  # --max-documents 2


def test_eval_never_downloads_into_a_data_folder_it_was_not_given(trained_run, tmp_path, capsys):
    typo = tmp_path / "dta"
    arguments = ["--workdirs", str(trained_run), "--out", str(tmp_path / "out"), "--data-dir", str(typo),
                 *FAST_EVAL]
    assert eval_cli.main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"eval.py: error: corpus 'code' is not prepared under {typo}") and "prepare" in error
    assert not typo.exists() and not (tmp_path / "out").exists()
