"""The context-limit probe on the tiny preset: real compiles and steps, rows in the report, the stop rules."""

import json

import pytest

from lm_experiment import context_limit


def test_probe_trains_each_length_and_skips_steps_past_the_time_cap(tmp_path):
    out = tmp_path / "limit.json"
    # A cap of 0 s: the first length runs (nothing to project from), every longer one is only compiled.
    report = context_limit.main(["--preset", "tiny", "--variants", "dense,repaired", "--seq-lens", "256,128",
                                 "--impl", "xla", "--steps", "2", "--max-step-seconds", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = report["results"]
    assert [(r["variant"], r["seq_len"], r["status"]) for r in rows] == [
        ("dense", 128, "ok"), ("dense", 256, "fits, not run"),
        ("repaired", 128, "ok"), ("repaired", 256, "fits, not run")]
    assert [r["variant_pattern"] for r in rows] == ["dense", "dense"] + ["repaired(64, 8, bridge)"] * 2
    for short, long in (rows[0:2], rows[2:4]):
        assert 0 < short["memory_bytes"] < long["memory_bytes"]
        assert short["step_seconds"] > 0 and short["tokens_per_sec"] == pytest.approx(128 / short["step_seconds"])
        assert long["step_seconds"] is None


def test_probe_config_is_one_sequence_on_one_device():
    config = context_limit.probe_config("window", "small", 65536, "xla")
    assert (config.train.seq_len, config.train.global_batch, config.train.grad_accum) == (65536, 1, 1)
    assert (config.attention.impl, config.mesh.data, config.mesh.fsdp) == ("xla", 1, 1)
    assert config.attention.pattern == "window(256)"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        context_limit.parse_args(["--seq-lens", "1k"])
    with pytest.raises(SystemExit):
        context_limit.parse_args(["--steps", "0"])


def test_compile_only_runs_nothing(tmp_path):
    report = context_limit.main(["--preset", "tiny", "--variants", "block", "--seq-lens", "128", "--impl", "xla",
                                 "--compile-only", "--out", str(tmp_path / "limit.json")])
    [row] = report["results"]
    assert (row["status"], row["step_seconds"]) == ("fits, not run", None) and row["memory_bytes"] > 0
