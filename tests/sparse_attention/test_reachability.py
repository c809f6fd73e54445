import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_attention import reachability as reach
from sparse_attention.patterns import as_schedule


def brute_force(pattern, seq_len, layers):
    """(covered pairs at depths 0..layers, disconnected_adjacent, full_coverage_depth, earliest [S]).

    Boolean matrix powers: A_l is the S x S mask plus the diagonal, R_l = R_{l-1} | (A_l @ R_{l-1}); the
    full-coverage search runs until every causal pair is covered or a whole period changes nothing.
    """
    schedule = as_schedule(pattern)
    positions = np.arange(seq_len)
    diagonal = np.eye(seq_len, dtype=bool)
    layers_masks = (schedule.layer(i).mask(positions[:, None], positions[None, :]) for i in range(schedule.period))
    masks = [np.asarray(mask, bool) for mask in layers_masks]
    hops = [(mask | diagonal).astype(np.float32) for mask in masks]
    total = seq_len * (seq_len + 1) // 2
    reached = [np.eye(seq_len, dtype=bool)]
    full_depth = None
    while True:
        depth = len(reached) - 1
        count = reached[depth].sum()
        if count == total:
            full_depth = depth
            break
        if depth >= schedule.period and count == reached[depth - schedule.period].sum():
            break
        previous = reached[depth]
        reached.append(previous | ((hops[depth % schedule.period] @ previous.astype(np.float32)) > 0))
    while len(reached) <= layers:
        previous = reached[-1]
        reached.append(previous | ((hops[(len(reached) - 1) % schedule.period] @ previous.astype(np.float32)) > 0))
    final = reached[layers]
    assert not np.triu(final, 1).any()  # causality
    earliest = np.argmax(final, axis=1)
    disconnected = int((~final[positions[1:], positions[1:] - 1]).sum())
    counts = [int(r.sum()) for r in reached[: layers + 1]]
    return counts, disconnected, full_depth, earliest


def assert_matches(result, expected, context=""):
    counts, disconnected, full_depth, earliest = expected
    where = f"{result.pattern} S={result.seq_len} L={result.layers} method={result.method} {context}"
    assert list(result.covered_pairs_by_depth) == counts, where
    assert result.disconnected_adjacent == disconnected, where
    assert result.full_coverage_depth == full_depth, where
    expected_status = reach.STATUS_REACHED if full_depth is not None else reach.STATUS_NEVER
    assert result.full_coverage_status == expected_status, where
    assert result.search_stopped_at_depth is None, where
    np.testing.assert_array_equal(result.earliest, earliest, err_msg=where)


def every_method(spec, seq_len, layers):
    """Results of every method that applies; the bitset at two tile sizes and with rows split over segments."""
    methods = reach.supported_methods(as_schedule(spec), seq_len)
    results = [reach.reachability(spec, seq_len, layers, method=m) for m in methods if m != "bitset"]
    results.append(reach.reachability(spec, seq_len, layers, method="bitset"))
    results.append(reach.reachability(spec, seq_len, layers, method="bitset", tile=8, gather_words=3))
    return results


EVERY_KIND = [
    "dense",
    "block(8)",
    "block(8, 3)",
    "window(5)",
    "repaired(8, 3, bridge)",
    "repaired(8, 3, prefix)",
    "repaired(8, 8, prefix)",
    "shifted(8)",
    "strided(5)",
    "dilated(4, 3)",
    "sinks(3)",
    "random_blocks(8, 2, 7)",
    "random_blocks(6, 3, 1)",
    # compositions
    "window(4) | sinks(2)",
    "block(16) | sinks(3)",
    "block(8) | strided(6)",
    "window(3) | strided(7)",
    "sinks(4) & window(3)",
    "strided(3) & window(10)",
    "block(16) & window(5)",
    "random_blocks(8, 1, 3) | window(3)",
    "(block(8) | strided(4)) & window(12)",
    # schedules
    "schedule(block(8), window(4))",
    "schedule(block(8), strided(3))",
    "schedule(window(3), dilated(3, 4))",
    "schedule(block(8), sinks(2))",
    "schedule(block(8), block(8, 4), window(2))",
    ["block(8)", "repaired(8, 2, bridge)", "strided(5)"],
]


@pytest.mark.parametrize("spec", EVERY_KIND, ids=str)
def test_every_method_matches_matrix_powers(spec):
    rng = np.random.default_rng()
    for seq_len in (1, 2, 64, int(rng.integers(20, 201))):
        for layers in (1, 3):
            expected = brute_force(spec, seq_len, layers)
            results = every_method(spec, seq_len, layers)
            assert results[0].method == reach.supported_methods(as_schedule(spec), seq_len)[0]
            for result in results:
                assert_matches(result, expected)


def test_methods_are_chosen_by_structure():
    assert reach.reachability("shifted(8)", 64, 2).method == "intervals"
    assert reach.reachability("window(4) | sinks(2)", 64, 2).method == "intervals"
    assert reach.reachability("strided(4) | window(3)", 64, 2).method == "offsets"
    assert reach.reachability("schedule(block(8), strided(4))", 64, 2).method == "bitset"
    with pytest.raises(ValueError, match="offsets"):
        reach.reachability("block(8)", 64, 2, method="offsets")
    with pytest.raises(ValueError, match="method must be one of"):
        reach.reachability("block(8)", 64, 2, method="fast")
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        reach.reachability("block(8)", 64, 0)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        reach.reachability("block(8)", -3, 1)


ACCEPTANCE = ["block(64)", "window(64)", "repaired(64, 8, bridge)", "repaired(64, 8, prefix)"]


def test_acceptance_report_matches_brute_force_at_1024(tmp_path):
    path = tmp_path / "report.json"
    argv = ["--seq-len", "1024", "--layers", "4", "--json", str(path)]
    for spec in ACCEPTANCE:
        argv += ["--pattern", spec]
    assert reach.main(argv) == 0
    report = json.loads(path.read_text())["results"]
    assert [entry["pattern"] for entry in report] == ACCEPTANCE
    for spec, entry in zip(ACCEPTANCE, report):
        counts, disconnected, full_depth, earliest = brute_force(spec, 1024, 4)
        assert entry["covered_pairs"] == counts[-1] and entry["causal_pairs"] == 1024 * 1025 // 2
        assert entry["coverage"] == counts[-1] / (1024 * 1025 // 2)
        assert entry["coverage_by_depth"] == [c / (1024 * 1025 // 2) for c in counts]
        assert entry["disconnected_adjacent"] == disconnected
        assert entry["full_coverage_depth"] == full_depth
        curve = entry["reach_curve"]
        assert curve["earliest"] == earliest[curve["position"]].tolist()
        distance = np.arange(1024) - earliest
        assert entry["reach_distance"] == {
            "mean": float(distance.mean()),
            "median": float(np.median(distance)),
            "max": int(distance.max()),
        }
        assert_matches(reach.reachability(spec, 1024, 4), (counts, disconnected, full_depth, earliest))
    by_pattern = {entry["pattern"]: entry for entry in report}
    assert by_pattern["block(64)"]["full_coverage_depth"] is None
    assert by_pattern["block(64)"]["disconnected_adjacent"] == 1024 // 64 - 1
    assert by_pattern["repaired(64, 8, bridge)"]["disconnected_adjacent"] == 0
    assert by_pattern["repaired(64, 8, prefix)"]["disconnected_adjacent"] == 0


def test_known_facts_block_and_repairs():
    rng = np.random.default_rng()
    for _ in range(5):
        size = int(rng.integers(2, 40))
        seq_len = size * int(rng.integers(1, 30))
        layers = int(rng.integers(1, 20))
        repair = int(rng.integers(1, size + 1))
        block = reach.reachability(f"block({size})", seq_len, layers)
        assert block.disconnected_adjacent == seq_len // size - 1
        assert block.full_coverage_status == ("reached" if seq_len == size else "never")
        for mode in ("bridge", "prefix"):
            repaired = reach.reachability(f"repaired({size}, {repair}, {mode})", seq_len, layers)
            assert repaired.disconnected_adjacent == 0
            assert repaired.full_coverage_status == "reached"


def _atoms():
    sizes = st.integers(1, 12)
    return st.one_of(
        st.just("dense"),
        st.builds(lambda b, o: f"block({b}, {o % b})", sizes, st.integers(0, 11)),
        st.builds("window({})".format, sizes),
        st.builds(
            lambda b, r, m: f"repaired({b}, {min(r, b)}, {m})", sizes, sizes, st.sampled_from(["bridge", "prefix"])
        ),
        st.builds("strided({})".format, sizes),
        st.builds("dilated({}, {})".format, st.integers(1, 6), st.integers(1, 5)),
        st.builds("sinks({})".format, st.integers(1, 6)),
        st.builds("random_blocks({}, {}, {})".format, st.integers(1, 10), st.integers(1, 3), st.integers(0, 99)),
    )


_compositions = st.recursive(
    _atoms(),
    lambda inner: st.builds(lambda a, b, op: f"({a}) {op} ({b})", inner, inner, st.sampled_from(["|", "&"])),
    max_leaves=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layer_specs=st.lists(_compositions, min_size=1, max_size=3),
    seq_len=st.integers(1, 90),
    layers=st.integers(1, 4),
)
def test_random_compositions_match_brute_force(layer_specs, seq_len, layers):
    spec = layer_specs[0] if len(layer_specs) == 1 else f"schedule({', '.join(layer_specs)})"
    expected = brute_force(spec, seq_len, layers)
    for result in every_method(spec, seq_len, layers):
        assert_matches(result, expected)


def test_bitset_search_limit_is_explicit():
    stopped = reach.reachability("window(4)", 100, 1, method="bitset", max_search_depth=5)
    assert stopped.full_coverage_depth is None
    assert stopped.full_coverage_status == "search_stopped"
    assert stopped.search_stopped_at_depth == 5
    assert stopped.to_json()["search_stopped_at_depth"] == 5
    found = reach.reachability("window(4)", 100, 1, method="bitset")
    assert found.full_coverage_depth == reach.reachability("window(4)", 100, 1).full_coverage_depth == 33


def test_intervals_at_65536_take_milliseconds():
    seq_len, layers = 65536, 12
    specs = ["dense", "block(64)", "window(64)", "repaired(64, 8, bridge)", "repaired(64, 8, prefix)",
             "shifted(64)", "sinks(4)", "window(64) | sinks(4)", "block(512) | sinks(16)"]
    start = time.perf_counter()
    results = {spec: reach.reachability(spec, seq_len, layers) for spec in specs}
    assert time.perf_counter() - start < 10  # about 0.1 s on 2 cores
    assert all(r.method == "intervals" for r in results.values())
    assert results["window(64)"].full_coverage_depth == -(-(seq_len - 1) // 63)
    assert results["block(64)"].disconnected_adjacent == seq_len // 64 - 1
    assert results["block(64)"].full_coverage_status == "never"
    assert results["dense"].full_coverage_depth == 1
    assert results["repaired(64, 8, bridge)"].disconnected_adjacent == 0
    # window(W) after L layers reaches back exactly L (W - 1) positions.
    distance = results["window(64)"].reach_distance
    assert distance[-1] == layers * 63 and (distance == np.minimum(np.arange(seq_len), layers * 63)).all()


def test_bitset_is_exact_at_8192_for_strided_and_dilated():
    seq_len = 8192
    for spec in ("strided(64)", "dilated(16, 8)"):
        offsets = reach.reachability(spec, seq_len, 2)
        bitset = reach.reachability(spec, seq_len, 2, method="bitset", max_search_depth=2)
        assert offsets.method == "offsets"
        assert bitset.covered_pairs_by_depth == offsets.covered_pairs_by_depth
        assert bitset.disconnected_adjacent == offsets.disconnected_adjacent == seq_len - 1
        np.testing.assert_array_equal(bitset.earliest, offsets.earliest)


def test_random_blocks_at_8192_agree_across_tilings():
    spec, seq_len, layers = "random_blocks(64, 2, 5)", 8192, 3
    wide = reach.reachability(spec, seq_len, layers)
    narrow = reach.reachability(spec, seq_len, layers, tile=32, gather_words=1 << 16)
    assert wide.method == narrow.method == "bitset"
    assert wide.covered_pairs_by_depth == narrow.covered_pairs_by_depth
    assert wide.full_coverage_status == narrow.full_coverage_status == "never"
    np.testing.assert_array_equal(wide.earliest, narrow.earliest)
    # A query block sees an earlier neighbour only when it picked it: its first token is cut off otherwise.
    pattern = as_schedule(spec)
    blocks = np.arange(1, seq_len // 64)
    picked_previous = (pattern.picked_blocks(blocks) == (blocks - 1)[:, None]).any(axis=1)
    assert wide.disconnected_adjacent == int((~picked_previous).sum())


def test_refuses_sizes_over_budget():
    with pytest.raises(ValueError, match="budget"):
        reach.reachability("block(64) | strided(64)", 1 << 17, 2)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "out" / "reach.json", tmp_path / "out" / "reach.png"
    specs = ["block(16)", "strided(8) | window(2)", "random_blocks(16, 1, 3)"]
    argv = ["--seq-len", "256", "--layers", "3", "--json", str(json_path), "--plot", str(plot_path)]
    for spec in specs:
        argv += ["--pattern", spec]
    assert reach.main(argv) == 0
    table = capsys.readouterr().out
    assert "disconnected_adjacent" in table and "full_coverage_depth" in table
    for spec in specs:
        assert spec in table
    report = json.loads(json_path.read_text())
    assert list(report) == ["results"]
    assert [entry["pattern"] for entry in report["results"]] == specs
    assert [entry["method"] for entry in report["results"]] == ["intervals", "offsets", "bitset"]
    for entry, spec in zip(report["results"], specs):
        expected = reach.reachability(spec, 256, 3)
        assert entry["seq_len"] == 256 and entry["layers"] == 3
        assert entry["coverage"] == expected.coverage
        assert entry["disconnected_adjacent"] == expected.disconnected_adjacent
        assert entry["full_coverage_depth"] == expected.full_coverage_depth
        assert len(entry["coverage_by_depth"]) == 4
        assert entry["reach_curve"]["position"][0] == 0 and entry["reach_curve"]["position"][-1] == 255
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["reach.json", "reach.png"]  # no temp files


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pattern", "blocky(8)", "--layers", "2", "--seq-len", "64"], "unknown pattern 'blocky'"),
        (["--pattern", "block(8)", "--layers", "0", "--seq-len", "64"], "layers must be a positive integer"),
        (["--pattern", "block(64) | strided(64)", "--layers", "2", "--seq-len", "131072"], "budget"),
        (["--pattern", "block(8)", "--seq-len", "64"], "--layers is required"),
        (["--pattern", "block(8)", "--layers", "2", "--seq-len", "64", "--method", "offsets"], "does not apply"),
    ],
)
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reach.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


CONFIG = '''
import ml_collections


def get_config(preset=None):
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"num_layers": 6 if preset == "deep" else 2})
    config.attention = ml_collections.ConfigDict()
    config.attention.pattern = "repaired(16, 4, prefix)"
    config.attention.schedule = ["block(16)", "window(4)"] if preset == "mixed" else []
    return config
'''


def test_cli_reads_pattern_schedule_and_layers_from_a_config(tmp_path):
    config_path = tmp_path / "reach_config.py"
    config_path.write_text(CONFIG)
    cases = [
        ("", "repaired(16, 4, prefix)", 2),
        (":deep", "repaired(16, 4, prefix)", 6),
        (":mixed", "schedule(block(16), window(4))", 2),
    ]
    for suffix, spec, layers in cases:
        json_path = tmp_path / "config.json"
        argv = ["--config", f"{config_path}{suffix}", "--seq-len", "128", "--json", str(json_path)]
        assert reach.main(argv) == 0
        (entry,) = json.loads(json_path.read_text())["results"]
        assert (entry["pattern"], entry["layers"]) == (spec, layers)
        expected = reach.reachability(spec, 128, layers)
        assert entry["covered_pairs"] == expected.covered_pairs
    assert reach.main(["--config", f"{config_path}:deep", "--seq-len", "128", "--layers", "1",
                       "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["results"][0]["layers"] == 1
    schedule, layers = reach.load_config(f"{config_path}:mixed")
    assert schedule.period == 2 and layers == 2
    with pytest.raises(ValueError, match="no such file"):
        reach.load_config(str(tmp_path / "missing.py"))


def test_reachable_matches_brute_force_propagation():
    rng = np.random.default_rng()
    seq_len = 48
    for spec in ("repaired(8, 2, bridge)", "sinks(2) | block(8)", "strided(5)", "shifted(8)"):
        layers = int(rng.integers(1, 4))
        schedule = as_schedule(spec)
        queries, keys = np.meshgrid(np.arange(seq_len), np.arange(seq_len), indexing="ij")
        got = reach.reachable(schedule, seq_len, layers, queries, keys)
        sets = [{i} for i in range(seq_len)]
        for layer in range(layers):
            pattern = schedule.layer(layer)
            sets = [set().union(*(sets[m] for m in range(i + 1) if m == i or pattern.mask(np.array(i), np.array(m))))
                     for i in range(seq_len)]
        assert np.array_equal(got, np.array([[j in sets[i] for j in range(seq_len)] for i in range(seq_len)]))


def test_reachable_refuses_positions_outside_the_sequence():
    with pytest.raises(ValueError, match=r"positions in \[0, 16\)"):
        reach.reachable("block(4)", 16, 2, [16], [0])


def arrival_by_sets(schedule, layers, route, start_layer):
    """layers_in_order for one route, by Python sets: each stage spreads from its stop until the next is reached."""
    holding, stage = {route[0]}, 1
    for layer in range(start_layer, layers):
        pattern = schedule.layer(layer)
        holding |= {i for i in range(min(holding), route[-1] + 1)
                    if any(m == i or pattern.mask(np.array(i), np.array(m)) for m in holding)}
        if route[stage] in holding:
            holding, stage = {route[stage]}, stage + 1
            if stage == len(route):
                return layer + 1
    return 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_specs=st.lists(_compositions, min_size=1, max_size=2), seq_len=st.integers(2, 40),
       layers=st.integers(1, 5), data=st.data())
def test_layers_in_order_matches_sets(layer_specs, seq_len, layers, data):
    spec = layer_specs[0] if len(layer_specs) == 1 else f"schedule({', '.join(layer_specs)})"
    schedule = as_schedule(spec)
    stops = st.lists(st.integers(0, seq_len - 1), min_size=2, max_size=4, unique=True).map(sorted)
    routes = data.draw(st.lists(stops, min_size=1, max_size=4))
    start_layer = data.draw(st.integers(0, layers - 1))
    padded = np.full((len(routes), 4), -1)
    for row, route in zip(padded, routes):
        row[:len(route)] = route
    got = reach.layers_in_order(schedule, seq_len, layers, padded, start_layer)
    assert got.tolist() == [arrival_by_sets(schedule, layers, route, start_layer) for route in routes]


def test_layers_in_order_generalises_reachability_and_counts_links():
    rng = np.random.default_rng()
    keys = rng.integers(0, 96, 50)
    queries = keys + rng.integers(0, 96 - keys)
    for spec in ("repaired(16, 2, prefix)", "shifted(16)", "window(5)"):
        assert np.array_equal(reach.layers_in_order(spec, 96, 3, np.stack([keys, queries], 1)) > 0,
                              reach.reachable(spec, 96, 3, queries, keys))
    # Dense: each link takes one layer, so a chain of h links leaving after layer 1 arrives after layer h + 1.
    assert reach.layers_in_order("dense", 64, 6, [[3, 10, 20, 40], [3, 40, -1, -1]], 1).tolist() == [4, 2]
    assert reach.layers_in_order("dense", 64, 3, [[3, 10, 20, 40]], 1).tolist() == [0]
    # prefix(32, 4) reaches a key two blocks back in 2 layers, but a chain through the middle block needs a relay
    # into the middle block's last keys and another out of them: 1 + 2 + 2 layers.
    assert reach.reachable("repaired(32, 4, prefix)", 256, 4, 70, 10)
    assert reach.layers_in_order("repaired(32, 4, prefix)", 256, 5, [[10, 40, 70]], 1).tolist() == [5]


@pytest.mark.parametrize("route, start_layer, message", [
    ([[3]], 0, "route: each row must hold at least two positions"),
    ([[3, 70]], 0, r"route: each row must hold at least two positions in \[0, 64\)"),
    ([[3, -1, 9]], 0, "then -1 padding"),
    ([[3, 9]], 2, r"start_layer must be in \[0, 2\)"),
])
def test_layers_in_order_refuses_bad_routes(route, start_layer, message):
    with pytest.raises(ValueError, match=message):
        reach.layers_in_order("block(8)", 64, 2, route, start_layer)
