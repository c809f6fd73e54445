"""The kernel benchmark's bookkeeping: floors, peer ratios, the FlexAttention peer and its masks.

Timings themselves are not tested (they belong to `python -m lm_experiment.bench`); the smoke run checks
the report's shape on CPU with the Pallas kernels in interpret mode.
"""

import importlib.util
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_experiment import bench, bench_choice, flex_peer, timing
from sparse_attention.patterns import parse

H200_CEILINGS = dict(matmul_flops_per_s=790e12, copy_bytes_per_s=4.3e12)


def test_bench_smoke_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main(["--smoke", "--seq", "48", "--patterns", "dense;window(16)", "--impls",
                         "triton,mosaic_tpu,cudnn,flex,reference", "--modes", "fwd,fwd_bwd", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert len(saved["results"]) == 2 * 2 * 5
    ceilings = saved["meta"]["ceilings"]
    assert ceilings["matmul_flops_per_s"] > 0 and ceilings["copy_bytes_per_s"] > 0
    for row in saved["results"]:
        assert set(row) >= {"seq_len", "pattern", "impl", "mode", "ms", "tflops", "active_fraction",
                            "memory_bytes", "status", "floor_ms", "x_floor"}
        if row["impl"] in ("cudnn", "flex"):  # GPU peers: unsupported on CPU (cuDNN also rejects float32)
            assert row["status"] == "ok" or row["status"].startswith(("unsupported", "error")), row
        else:
            assert row["status"] == "ok" and row["ms"] > 0 and row["tflops"] > 0, row
            assert row["x_floor"] == pytest.approx(row["ms"] / row["floor_ms"])
    # Ratios are quoted for our fastest implementation of each case, against the peers that ran.
    assert {(r["pattern"], r["mode"]) for r in saved["ratios"]} == {(p, m) for p in ("dense", "window(16)")
                                                                   for m in ("fwd", "fwd_bwd")}
    for ratio in saved["ratios"]:
        assert ratio["best"] in ("triton", "mosaic_tpu")
    window = [r for r in saved["results"] if r["pattern"] == "window(16)"][0]
    assert window["active_fraction"] == pytest.approx(parse("window(16)").count_active(48) / (48 * 49 / 2))
    table = capsys.readouterr().out
    assert "window(16)" in table and "fwd_bwd" in table and "x floor" in table


def test_floor_of_block_forward_at_32k_is_the_bytes_moved():
    # The kernel issue's example: q, k, v read and out written at 32k x 16 heads x 128 in bfloat16 is 512 MiB,
    # 0.125 ms at 4.3 TB/s; block(512)'s 69 GFLOP take 0.087 ms at 790 TFLOP/s.
    shape = bench.Shape(batch=1, seq_len=32768, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16")
    active, flops, bytes_moved = bench.case_work(parse("block(512)"), "fwd", shape)
    assert active == 64 * (512 * 513 // 2)
    assert flops == 4 * 16 * 128 * active
    assert bytes_moved == 512 * 2**20
    assert bench.floor_ms(flops, bytes_moved, H200_CEILINGS) == pytest.approx(512 * 2**20 / 4.3e12 * 1e3)
    # Forward + backward moves q, k, v, out and d_out again and writes dq, dk, dv: 12 tensors in all; and
    # with GQA the key and value tensors shrink.
    _, _, bytes_fwd_bwd = bench.case_work(parse("block(512)"), "fwd_bwd", shape)
    assert bytes_fwd_bwd == 12 * 128 * 2**20
    gqa = bench.Shape(batch=1, seq_len=32768, heads=16, kv_heads=4, head_dim=128, dtype="bfloat16")
    assert bench.case_work(parse("block(512)"), "fwd", gqa)[2] == (2 * 16 + 2 * 4) * 8 * 2**20
    # Dense at 32k is compute-bound: its floor is the FLOPs.
    _, flops, bytes_moved = bench.case_work(parse("dense"), "fwd", shape)
    assert bench.floor_ms(flops, bytes_moved, H200_CEILINGS) == pytest.approx(flops / 790e12 * 1e3)


def test_peer_ratios_take_our_fastest_implementation_against_each_peer():
    def row(impl, ms, pattern="block(512)", mode="fwd", status="ok"):
        return dict(seq_len=4096, pattern=pattern, mode=mode, impl=impl, ms=ms, status=status)

    rows = [row("mosaic_gpu", 1.2), row("triton", 1.0), row("flex", 2.0), row("xla", 0.1),
            row("mosaic_gpu", 3.0, "dense"), row("cudnn", 2.0, "dense"), row("flex", 1.0, "dense", status="oom"),
            row("flex", 1.0, "window(8)")]
    ratios = {r["pattern"]: r for r in bench.peer_ratios(rows)}
    # xla is not one of our kernels; a peer that did not run gives no ratio; a case without ours is left out.
    assert ratios["block(512)"] == dict(seq_len=4096, pattern="block(512)", mode="fwd", best="triton",
                                        best_ms=1.0, vs_flex=0.5)
    assert ratios["dense"] == dict(seq_len=4096, pattern="dense", mode="fwd", best="mosaic_gpu", best_ms=3.0,
                                   vs_cudnn=1.5)
    assert "window(8)" not in ratios


def test_paired_ratios_time_our_fastest_against_in_process_peers_in_interleaved_rounds(monkeypatch):
    # A fake clock: mosaic_gpu's dense call costs 3 ms, cuDNN's 2 ms; waits cost nothing.
    clock, asked = [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench.jax, "block_until_ready", lambda x: x)
    cost = {"mosaic_gpu": 0.003, "cudnn": 0.002}

    def call_for(impl, spec, mode):
        asked.append((impl, spec, mode))
        return lambda: clock.__setitem__(0, clock[0] + cost[impl])

    def row(impl, ms, pattern="dense"):
        return dict(seq_len=4096, pattern=pattern, mode="fwd", impl=impl, ms=ms, status="ok")

    rows = [row("mosaic_gpu", 3.1), row("triton", 3.5), row("cudnn", 2.2), row("flex", 4.0),
            row("mosaic_gpu", 1.0, "block(512)"), row("flex", 2.0, "block(512)")]
    paired = bench.paired_ratios(rows, call_for, rounds=12)
    # Only our fastest implementation, only against cuDNN (FlexAttention runs in its own process).
    assert asked == [("mosaic_gpu", "dense", "fwd"), ("cudnn", "dense", "fwd")]
    assert len(paired) == 1 and paired[0]["rounds"] == 12
    assert [paired[0][key] for key in ("ratio", "low", "high")] == pytest.approx([1.5, 1.5, 1.5])
    ratios = {r["pattern"]: r for r in bench.peer_ratios(rows, paired)}
    assert ratios["dense"]["vs_cudnn"] == pytest.approx(3.1 / 2.2)
    assert ratios["dense"]["vs_cudnn_paired"] == pytest.approx([1.5, 1.5, 1.5])
    assert "vs_cudnn_paired" not in ratios["block(512)"]
    assert "interleaved 1.500 [1.500, 1.500]" in bench.format_ratio(ratios["dense"])


def test_bench_smoke_times_pairs_against_an_in_process_peer(tmp_path, monkeypatch):
    # cuDNN does not run on CPU; xla stands in for it, to run the pairing end to end on compiled cases.
    monkeypatch.setattr(bench, "PAIRED_PEERS", ("xla",))
    report = bench.main(["--smoke", "--seq", "48", "--patterns", "window(16)", "--impls", "triton,xla", "--modes",
                         "fwd,fwd_bwd", "--paired-rounds", "5", "--out", str(tmp_path / "bench.json")])
    assert [(pair["mode"], pair["best"], pair["peer"], pair["rounds"]) for pair in report["paired"]] == [
        ("fwd", "triton", "xla", 5), ("fwd_bwd", "triton", "xla", 5)]
    for pair, ratio in zip(report["paired"], report["ratios"]):
        assert 0 < pair["low"] <= pair["ratio"] <= pair["high"]
        assert ratio["vs_xla_paired"] == [pair["ratio"], pair["low"], pair["high"]]


def test_bench_writes_each_pair_as_soon_as_its_case_has_run(tmp_path, monkeypatch):
    # A run stopped by a time limit keeps the pairs and ratios of the cases it finished: the fwd case is paired
    # in the report written right after xla's fwd row, before xla's fwd_bwd row runs.
    monkeypatch.setattr(bench, "PAIRED_PEERS", ("xla",))
    written = []
    monkeypatch.setattr(bench.atomic_io, "write_json", lambda path, report: written.append(
        (len(report["results"]), [pair["mode"] for pair in report["paired"]], len(report.get("ratios", [])))))
    bench.main(["--smoke", "--seq", "48", "--patterns", "window(16)", "--impls", "triton,xla", "--modes",
                "fwd,fwd_bwd", "--paired-rounds", "3", "--out", str(tmp_path / "bench.json")])
    assert written[:4] == [(1, [], 1), (2, [], 2), (3, ["fwd"], 2), (4, ["fwd", "fwd_bwd"], 2)]


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_flex_peer_without_torch_says_why(tmp_path):
    args, seq_lens, patterns, _, modes, kv_heads, _ = bench.parse_args(
        ["--smoke", "--seq", "48", "--patterns", "dense;block(16)", "--out", str(tmp_path / "b.json")])
    rows = bench.flex_rows(seq_lens, patterns, modes, args, kv_heads)
    assert len(rows) == 2 * 2
    assert all(r["status"] == "unsupported: torch is not installed (it is not a requirement)" for r in rows)


MASK_SPECS = ["dense", "block(512)", "window(1024)", "repaired(512, 64, bridge)", "repaired(512, 64, prefix)",
              "block(512, 256)", "random_blocks(512, 3, 0)", "sinks(64) | window(1024)", "strided(64)",
              "dilated(8, 3)", "random_blocks(16, 5, 7) & window(100)", "block(100) | sinks(3)"]


@pytest.mark.parametrize("spec", MASK_SPECS)
def test_pattern_masks_on_torch_tensors_match_numpy(spec):
    # What the FlexAttention peer relies on: Pattern.mask evaluated on torch tensors, directly and as a
    # mask_mod through FlexAttention's own vmapped evaluation, attends exactly the NumPy pairs.
    torch = pytest.importorskip("torch", reason="torch is not installed (the FlexAttention peer's dependency)")
    from torch.nn.attention.flex_attention import create_mask

    pattern, seq_len = parse(spec), 1100
    positions = np.arange(seq_len)
    expected = np.broadcast_to(pattern.mask(positions[:, None], positions[None, :]), (seq_len, seq_len))
    indices = torch.arange(seq_len, dtype=torch.int32)
    direct = torch.broadcast_to(pattern.mask(indices[:, None], indices[None, :]), (seq_len, seq_len))
    np.testing.assert_array_equal(direct.numpy(), expected)
    as_mask_mod = create_mask(lambda b, h, q, k: pattern.mask(q, k), None, None, seq_len, seq_len, device="cpu")
    np.testing.assert_array_equal(as_mask_mod[0, 0].numpy(), expected)


def test_median_ms_times_rounds_of_back_to_back_calls(monkeypatch):
    # A fake clock: each call costs 2 ms of host time and each wait 1 ms; a round of n calls costs 2n + 1.
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 0.002

    def wait(_):
        clock[0] += 0.001

    calls = []
    ms = timing.median_ms(lambda: calls.append(call()), wait, runs=100, warmup=2)
    per_round = math.ceil(timing.ROUND_SECONDS / 0.003)  # sized from one waited call, 3 ms
    assert ms == pytest.approx((2 * per_round + 1) / per_round)
    assert len(calls) == 2 + 1 + max(timing.MIN_ROUNDS, 100 // per_round) * per_round


def test_interleaved_ms_alternates_rounds_of_each_function(monkeypatch):
    # A fake clock: a call of "a" costs 2 ms of host time, one of "b" 4 ms, each wait 1 ms.
    clock, order = [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def costing(name, seconds):
        def call():
            clock[0] += seconds
            order.append(name)
        return call

    def wait(_):
        clock[0] += 0.001

    samples = timing.interleaved_ms({"a": costing("a", 0.002), "b": costing("b", 0.004)}, wait, rounds=7, warmup=1)
    per_round = {name: math.ceil(timing.ROUND_SECONDS / (cost + 0.001)) for name, cost in (("a", 0.002), ("b", 0.004))}
    assert [len(values) for values in samples.values()] == [7, 7]
    assert samples["a"] == pytest.approx([(2 * per_round["a"] + 1) / per_round["a"]] * 7)
    assert samples["b"] == pytest.approx([(4 * per_round["b"] + 1) / per_round["b"]] * 7)
    timed = order[4:]  # after each function's warmup call and its sizing call
    assert timed == (["a"] * per_round["a"] + ["b"] * per_round["b"]) * 7


@pytest.mark.parametrize("n", [1, 5, 6, 10, 30, 101])
def test_ratio_interval_is_the_sign_test_interval_of_the_median(n):
    rng = np.random.default_rng(n)
    numerator, denominator = list(rng.uniform(1, 2, n)), list(rng.uniform(1, 2, n))
    median, low, high = timing.ratio_interval(numerator, denominator)
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    assert median == pytest.approx(float(np.median(ratios)))
    # Outside [j-th smallest, j-th largest] lie j - 1 ratios on each side: at most 2.5 % likely for each
    # side by the Binomial(n, 1/2), and j is the largest such count (or 1 where none is small enough).
    j = ratios.index(low) + 1
    assert high == ratios[n - j] and low <= median <= high
    below = sum(math.comb(n, i) for i in range(j)) / 2 ** n  # P(Binomial(n, 1/2) <= j - 1)
    if n >= 6:
        assert below <= 0.025 < below + math.comb(n, j) / 2 ** n
    else:
        assert (low, high) == (ratios[0], ratios[-1])
    with pytest.raises(ValueError, match="equally long"):
        timing.ratio_interval(numerator, denominator[:-1] or [1.0, 1.0])


TOPK_SPECS = ["topk(16, 2)", "topk(16, 3) | repaired(16, 4, bridge)", "topk(8, 2) | window(20)",
              "topk(16, 1) | sinks(3)"]


@pytest.mark.parametrize("spec", TOPK_SPECS)
@given(seq_len=st.integers(1, 90), kv_heads=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_topk_case_counts_each_attended_pair_once(spec, seq_len, kv_heads, seed):
    pattern = parse(spec)
    topk = pattern.block_selection()
    chosen = bench_choice.fixed_choice(pattern, seq_len, batch=2, kv_heads=kv_heads, seed=seed)
    blocks = -(-seq_len // topk.size)
    assert chosen.shape == (2, kv_heads, blocks, topk.count)
    positions = np.arange(seq_len)
    static = np.broadcast_to(pattern.mask(positions[:, None], positions[None, :]), (seq_len, seq_len))
    counts = []
    for b, h in np.ndindex(2, kv_heads):
        for i in range(blocks):  # min(K, i) distinct earlier blocks, then -1
            picked = chosen[b, h, i]
            n = min(topk.count, i)
            assert (picked[n:] == -1).all() and len(set(picked[:n])) == n
            assert ((0 <= picked[:n]) & (picked[:n] < i)).all()
        counts.append((static | bench_choice.choice_mask(chosen[b, h], topk.size, seq_len)).sum())
    assert bench_choice.attended_pairs(pattern, seq_len, chosen) == pytest.approx(np.mean(counts))
    assert bench_choice.fixed_choice(parse("block(16)"), seq_len, 1, 1) is None


@pytest.mark.parametrize("spec,seq_len,heads,kv_heads", [("topk(128, 2)", 700, 1, 1),
                                                         ("topk(256, 2) | repaired(256, 64, bridge)", 1100, 4, 2),
                                                         ("window(300)", 650, 1, 1)])
def test_flex_block_lists_attend_exactly_the_case_pairs(spec, seq_len, heads, kv_heads):
    # FlexAttention attends a full tile's every pair and a partial tile's where mask_mod (the static mask)
    # holds: rebuilt from the lists, that must be the static mask plus the chosen blocks, per query head.
    pattern = parse(spec)
    chosen = bench_choice.fixed_choice(pattern, seq_len, batch=1, kv_heads=kv_heads, seed=3)
    num_partial, partial, num_full, full = flex_peer.tile_lists(pattern, seq_len, chosen, heads)
    positions = np.arange(seq_len)
    static = np.broadcast_to(pattern.mask(positions[:, None], positions[None, :]), (seq_len, seq_len))
    tile = flex_peer.FLEX_TILE
    for head in range(full.shape[1]):
        expected = static.copy()
        if chosen is not None:
            expected |= bench_choice.choice_mask(chosen[0, head * kv_heads // heads], pattern.block_selection().size,
                                                 seq_len)
        rebuilt = np.zeros((seq_len, seq_len), bool)
        for row in range(full.shape[2]):
            rows = slice(row * tile, (row + 1) * tile)
            for column in full[0, head, row, : num_full[0, head, row]]:
                rebuilt[rows, column * tile : (column + 1) * tile] = True
            for column in partial[0, head, row, : num_partial[0, head, row]]:
                keys = slice(column * tile, (column + 1) * tile)
                rebuilt[rows, keys] |= static[rows, keys]
        np.testing.assert_array_equal(rebuilt, expected)


def test_selection_costs_quote_time_per_pair_against_block_and_the_choice_against_the_attention():
    def row(impl, ms, pattern, mode="fwd", pairs=100.0):
        return dict(seq_len=4096, pattern=pattern, mode=mode, impl=impl, ms=ms, status="ok", active_pairs=pairs)

    rows = [row("triton", 2.0, "block(512)", pairs=100.0), row("mosaic_gpu", 1.0, "block(512)", pairs=100.0),
            row("triton", 3.0, "topk(512, 4)", pairs=250.0), row("xla", 0.5, "topk(512, 4)", pairs=250.0),
            row("selection", 0.3, "topk(512, 4)", pairs=250.0),
            row("triton", 9.0, "topk(512, 4)", "fwd_bwd", 250.0), row("triton", 5.0, "block(512)", "fwd_bwd"),
            row("triton", 1.0, "topk(256, 4)", pairs=10.0)]
    costs = {c["mode"]: c for c in bench.selection_costs(rows)}
    # Our kernels only (xla is not one), the fastest block(512) (mosaic_gpu), and no cost without block(B).
    assert costs["fwd"] == dict(seq_len=4096, pattern="topk(512, 4)", mode="fwd", impl="triton", ms=3.0,
                                block_impl="mosaic_gpu", block_ms=1.0, pair_time_vs_block=pytest.approx(1.2),
                                selection_ms=0.3, selection_share=pytest.approx(0.1))
    assert costs["fwd_bwd"]["pair_time_vs_block"] == pytest.approx((9.0 / 250) / (5.0 / 100))
    assert "selection_ms" not in costs["fwd_bwd"]
    assert len(bench.selection_costs(rows)) == 2


def test_bench_smoke_times_topk_with_its_selection(tmp_path):
    report = bench.main(["--smoke", "--seq", "300", "--patterns", "block(128);topk(128, 2)", "--impls",
                         "cudnn,triton,selection", "--modes", "fwd", "--out", str(tmp_path / "b.json")])
    status = {(r["pattern"], r["impl"]): r["status"] for r in report["results"]}
    assert status[("topk(128, 2)", "triton")] == "ok" and status[("topk(128, 2)", "selection")] == "ok"
    assert status[("topk(128, 2)", "cudnn")].startswith("unsupported: takes no chosen blocks")
    assert status[("block(128)", "selection")].startswith("unsupported")
    (cost,) = report["selection_costs"]
    assert cost["pattern"] == "topk(128, 2)" and cost["pair_time_vs_block"] > 0 and cost["selection_share"] > 0
