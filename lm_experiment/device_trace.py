"""Where a short call's device time goes: JAX's profiler trace of one call, summarised by kernel.

A decoding step of a small model at batch 1 is a few hundred small kernels. Its wall time is either kernel
time (then faster kernels, or fewer, help) or gaps between kernels (launch and host overheads, which only
fusing kernels or capturing them in a graph removes). `traced_call` answers which, from one traced call:

  kernels        device kernels (and copies) on the GPU's stream lines of the trace
  kernel_ms      the sum of their durations
  busy_ms        the union of their intervals (kernels on several streams overlap)
  span_ms        first kernel start to last kernel end
  busy_fraction  busy_ms / span_ms; the rest of the span is gaps
  top            the kernel names with the most total time: name, count, total_ms

Only a GPU trace has stream lines; elsewhere the summary says so (`status`).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import tempfile
from typing import Callable

import jax

TOP_KERNELS = 12


def _device_stream_threads(events: list[dict]) -> set[tuple[int, int]]:
    """(pid, tid) of every line named 'Stream ...' in a process named '/device:GPU:...'."""
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and str(e.get("args", {}).get("name", "")).startswith("/device:GPU")}
    return {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
            and e["pid"] in devices and str(e.get("args", {}).get("name", "")).startswith("Stream")}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise(trace: dict) -> dict:
    """The summary of a Chrome/Perfetto trace (`{"traceEvents": [...]}`, times in microseconds)."""
    events = trace["traceEvents"]
    streams = _device_stream_threads(events)
    if not streams:
        return dict(status="no GPU stream lines in the trace")
    kernels = [e for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) in streams]
    if not kernels:
        return dict(status="no kernels on the GPU stream lines")
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in kernels:
        by_name[event["name"]].append(float(event["dur"]))
    span_us = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
    busy_us = _union_length(intervals)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    return dict(status="ok", kernels=len(kernels), kernel_ms=sum(e["dur"] for e in kernels) / 1e3,
                busy_ms=busy_us / 1e3, span_ms=span_us / 1e3, busy_fraction=busy_us / span_us if span_us else 1.0,
                top=[dict(name=name, count=len(durations), total_ms=sum(durations) / 1e3) for name, durations in top])


def traced_call(call: Callable[[], object], wait: Callable[[object], None]) -> dict:
    """Summary of one call of `call` (already compiled and warm), traced by JAX's profiler into a temporary
    directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="device_trace_") as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            wait(call())
        paths = sorted(pathlib.Path(log_dir).rglob("perfetto_trace.json.gz"))
        if not paths:
            return dict(status="the profiler wrote no perfetto trace")
        with gzip.open(paths[-1], "rt") as file:
            return summarise(json.load(file))
