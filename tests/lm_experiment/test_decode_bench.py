"""The decoding benchmark's smoke run: every case timed or refused, caches as large as the pattern reaches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_experiment import decode_bench
from lm_experiment.config import AttentionConfig
from lm_experiment.model import DecoderLM


def test_smoke_run_writes_rows_whose_local_caches_stay_flat(tmp_path, capsys):
    out = tmp_path / "decode.json"
    report = decode_bench.main(["--smoke", "--contexts", "64,1024", "--batches", "1,2", "--steps", "4", "--runs", "2",
                                "--warmup", "1", "--patterns", "dense;block(512);repaired(512, 64, prefix)",
                                "--attention-peer", "--trace", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {(r["pattern"], r["batch"], r["context"]): r for r in report["results"]}
    assert len(rows) == 12 and all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values())
    assert all(r["trace"] == dict(status="no GPU stream lines in the trace") for r in rows.values())  # CPU
    # Slots: dense keeps context + steps (rounded up); block(512) its block once the context passes it; prefix B + R.
    assert rows["dense", 1, 1024]["cache_slots"] == [2048, 2048]  # 1,028 positions, in multiples of 1,024
    assert rows["block(512)", 1, 1024]["cache_slots"] == [512, 512]
    assert rows["repaired(512, 64, prefix)", 2, 1024]["cache_slots"] == [576, 576]
    assert rows["block(512)", 2, 1024]["cache_bytes"] == 2 * rows["block(512)", 1, 1024]["cache_bytes"] - 2 * 512 * 4
    assert [r["context"] for r in report["attention_peer"]] == [64, 1024, 64, 1024]
    assert "at the floors" in capsys.readouterr().out

    # The floor: every parameter (float32 here) and a context-token prefill's caches read once per step.
    config = decode_bench.model_config("small", smoke=True)
    model = DecoderLM(config, AttentionConfig(pattern="dense", schedule=(), impl="reference", interpret=False),
                      rngs=nnx.Rngs(0))
    parameters = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for (pattern, batch, context), row in rows.items():
        slots = min(context, 512) if pattern == "block(512)" else min(context, 576) if "prefix" in pattern else context
        per_layer = 2 * batch * slots * config.num_kv_heads * config.head_dim * 4 + 4 * slots  # k, v; positions
        assert row["floor_bytes"] == parameters + config.num_layers * per_layer, (pattern, batch, context)
        assert row["floor_ms"] == np.float64(1e3 * row["floor_bytes"] / report["meta"]["copy_bytes_per_s"])
        assert row["x_floor"] == row["ms_per_step"] / row["floor_ms"]
    ratios = {(r["pattern"], r["batch"], r["context"]): r for r in report["ratios"]}
    assert len(ratios) == 8 and ("dense", 1, 64) not in ratios
    block = ratios["block(512)", 2, 1024]
    assert block["at_floors"] == rows["dense", 2, 1024]["floor_ms"] / rows["block(512)", 2, 1024]["floor_ms"] > 1
    assert block["measured"] == rows["dense", 2, 1024]["ms_per_step"] / rows["block(512)", 2, 1024]["ms_per_step"]


def test_caches_after_a_prompt_hold_the_positions_a_prefill_leaves():
    model = DecoderLM(decode_bench.model_config("small", smoke=True),
                      AttentionConfig(pattern="sinks(2) | window(5)", schedule=(), impl="reference", interpret=False),
                      rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (1, 30), 0, 256)
    _, prefilled = model.prefill(prompt, model.empty_caches(1, 34))
    synthetic = decode_bench.caches_after(model, 1, 30, 4, jax.random.key(1))
    for real, made in zip(prefilled, synthetic):
        np.testing.assert_array_equal(real.positions, made.positions)
        assert made.k.shape == real.k.shape and bool(jnp.all(jnp.isfinite(made.k)))


def test_both_steps_are_timed_and_ratios_take_dense_at_its_fastest(tmp_path):
    report = decode_bench.main(["--smoke", "--contexts", "64", "--batches", "1", "--steps", "2", "--runs", "1",
                                "--warmup", "1", "--patterns", "dense;block(8)", "--impls", "xla,triton",
                                "--interpret", "--out", str(tmp_path / "decode.json")])
    rows = {(r["pattern"], r["impl"]): r for r in report["results"]}
    assert sorted(rows) == [("block(8)", "triton"), ("block(8)", "xla"), ("dense", "triton"), ("dense", "xla")]
    fastest_dense = min((rows["dense", impl] for impl in ("xla", "triton")), key=lambda r: r["ms_per_step"])
    for ratio in report["ratios"]:
        assert ratio["dense_impl"] == fastest_dense["impl"]
        assert ratio["measured"] == fastest_dense["ms_per_step"] / rows["block(8)", ratio["impl"]]["ms_per_step"]


def test_unknown_impls_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        decode_bench.main(["--smoke", "--impls", "xla,cuda"])
    assert "--impls must be a comma-separated list of xla, triton; got 'xla,cuda'" in capsys.readouterr().err
