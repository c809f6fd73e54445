"""The device trace summary: kernels on GPU stream lines only, overlapping intervals counted once."""

import jax
import jax.numpy as jnp
import pytest

from lm_experiment import decode_bench, device_trace


def metadata(pid, name, tid=None):
    if tid is None:
        return dict(ph="M", pid=pid, name="process_name", args=dict(name=name))
    return dict(ph="M", pid=pid, tid=tid, name="thread_name", args=dict(name=name))


def kernel(pid, tid, name, ts, dur):
    return dict(ph="X", pid=pid, tid=tid, name=name, ts=ts, dur=dur)


def test_summary_counts_stream_kernels_and_their_union():
    events = [metadata(1, "/host:CPU"), metadata(1, "python", tid=5), kernel(1, 5, "host work", 0.0, 1000.0),
              metadata(2, "/device:GPU:0"), metadata(2, "Stream #13(Compute)", tid=13),
              metadata(2, "Stream #14(Compute)", tid=14), metadata(2, "XLA Ops", tid=99),
              kernel(2, 99, "fusion", 0.0, 50.0),  # the ops line repeats the kernels: not counted
              kernel(2, 13, "fusion", 10.0, 20.0), kernel(2, 13, "gemm", 40.0, 10.0),
              kernel(2, 14, "fusion", 25.0, 10.0),  # overlaps [10, 30) by 5 us
              kernel(2, 13, "fusion", 90.0, 10.0)]
    summary = device_trace.summarise(dict(traceEvents=events))
    assert summary["status"] == "ok" and summary["kernels"] == 4
    assert summary["kernel_ms"] == pytest.approx(50e-3)
    assert summary["busy_ms"] == pytest.approx(45e-3)  # [10, 35) + [40, 50) + [90, 100)
    assert summary["span_ms"] == pytest.approx(90e-3)
    assert summary["busy_fraction"] == pytest.approx(0.5)
    assert summary["top"][0] == dict(name="fusion", count=3, total_ms=pytest.approx(40e-3))
    assert summary["top"][1] == dict(name="gemm", count=1, total_ms=pytest.approx(10e-3))


def test_summary_without_a_gpu_says_so():
    events = [metadata(1, "/host:CPU"), metadata(1, "python", tid=5), kernel(1, 5, "host work", 0.0, 1000.0)]
    assert device_trace.summarise(dict(traceEvents=events)) == dict(status="no GPU stream lines in the trace")


def test_traced_call_reads_the_profilers_own_trace():
    # On a CPU the profiler's real trace has host lines only.
    summary = device_trace.traced_call(lambda: jax.jit(lambda x: x @ x)(jnp.ones((64, 64))), jax.block_until_ready)
    assert summary == dict(status="no GPU stream lines in the trace")


def test_decode_bench_trace_rows_are_per_step():
    traced = dict(status="ok", kernels=40, kernel_ms=2.0, busy_ms=1.5, span_ms=4.0, busy_fraction=0.375, top=[])
    row = decode_bench.per_step(traced, steps=4)
    assert (row["kernels_per_step"], row["kernel_ms_per_step"], row["busy_ms_per_step"],
            row["gap_ms_per_step"]) == (10, 0.5, 0.375, 0.625)
    assert decode_bench.per_step(dict(status="no GPU stream lines in the trace"), 4)["status"] != "ok"
    assert "gaps" in decode_bench.format_trace(row)
