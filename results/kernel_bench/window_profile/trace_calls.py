"""Issue 15: what one timed call of `lm_experiment.bench` spends on the GPU, ours against cuDNN's.

    python results/kernel_bench/window_profile/trace_calls.py [--seq 32768 --head-dim 128 --pattern "window(1024)"]

For each implementation and mode it compiles the benchmark's jitted call (`timed_function`), times it as the
benchmark does (median wall time of `--runs` calls), then traces one more call with JAX's profiler
(`lm_experiment.device_trace`): the kernels it ran, their summed and overlapping time, and the span from the
first kernel's start to the last one's end. Wall time minus span is what the call costs outside the GPU's
kernels (dispatch, launch, synchronisation). Prints one line per case and writes them as JSON to `--out`.
"""

import argparse
import json

import jax

from lm_experiment import timing
from lm_experiment.bench import Shape, Unsupported, attention_function, make_inputs, timed_function
from lm_experiment.device_trace import traced_call
from sparse_attention.atomic_io import write_json
from sparse_attention.patterns import parse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--pattern", default="window(1024)")
    parser.add_argument("--impls", default="mosaic_gpu,cudnn")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shape = Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, "bfloat16")
    inputs = jax.block_until_ready(make_inputs(shape))  # q, k, v, d_out
    rows = []
    for mode in args.modes.split(","):
        arguments = inputs if mode == "fwd_bwd" else inputs[:3]
        for impl in args.impls.split(","):
            try:
                function = attention_function(impl, parse(args.pattern), shape, mode, False, None)
            except Unsupported as reason:
                print(f"{impl} {mode}: {reason}")
                continue
            compiled = timed_function(function, mode).lower(*arguments).compile()
            wall_ms = timing.median_ms(lambda: compiled(*arguments), jax.block_until_ready, args.runs, warmup=2)
            trace = traced_call(lambda: compiled(*arguments), jax.block_until_ready)
            row = dict(impl=impl, mode=mode, pattern=args.pattern, seq_len=args.seq, head_dim=args.head_dim,
                       wall_ms=wall_ms, **trace)
            rows.append(row)
            if trace["status"] != "ok":
                print(f"{impl:<10} {mode:<7} wall {wall_ms:.3f} ms  trace: {trace['status']}", flush=True)
                continue
            kernels = ", ".join(f"{k['name'][:60]} x{k['count']} {k['total_ms']:.3f} ms" for k in trace["top"])
            print(f"{impl:<10} {mode:<7} wall {wall_ms:.3f} ms  kernels {trace['kernels']}  kernel "
                  f"{trace['kernel_ms']:.3f} ms  span {trace['span_ms']:.3f} ms  [{kernels}]", flush=True)
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
