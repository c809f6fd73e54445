"""Issue 15: `mosaic_gpu`'s backward with dq computed in the dk/dv kernel (`BlockSizes.fused_dq`, 5 matrix
multiplies per tile pair, dq reduce-added in float32) against a separate dq kernel (7), forward + backward:

    python results/kernel_bench/fused_dq/measure.py --out fused_dq.json [--select REGEX] [--block-sizes JSON]

Each case compiles both variants once, then times them alternately, fused, separate, fused, separate, so that
drift shows as the spread between repeats; cuDNN's forward + backward is timed once beside them where it
covers the pattern. Timing is the benchmark's (`lm_experiment/timing.py`); inputs are the benchmark's (batch
1, bfloat16, normal random).
"""

import argparse
import dataclasses
import json
import platform
import re
import time

import jax

from lm_experiment.bench import Shape, Unsupported, attention_function, timed_function, make_inputs
from lm_experiment.timing import median_ms
from sparse_attention.atomic_io import write_json
from sparse_attention.kernels import mosaic_gpu
from sparse_attention.patterns import parse

SPARSE = ("block(512)", "repaired(512, 64, bridge)", "repaired(512, 64, prefix)", "block(512, 256)",
          "random_blocks(512, 3, 0)", "sinks(64) | window(1024)")
# (seq_len, q heads, kv heads, head_dim, patterns)
CASES = (
    (32768, 16, 16, 128, ("dense", "window(1024)", *SPARSE)),
    (131072, 16, 16, 128, ("dense", "window(1024)", "block(512)", "repaired(512, 64, bridge)")),
    (32768, 16, 4, 128, ("dense", "window(1024)", "block(512)", "repaired(512, 64, bridge)")),
    (32768, 16, 16, 64, ("dense", "window(1024)", "block(512)", "repaired(512, 64, bridge)")),
)
VARIANTS = {"fused": True, "separate": False}


def compiled_fwd_bwd(spec: str, shape: Shape, inputs, fused_dq: bool, overrides: dict | None = None):
    """`mosaic_gpu`'s forward + backward, compiled; tiles: the defaults for the head_dim with `overrides`
    (BlockSizes fields, e.g. {"warpgroups_dkv": 1})."""
    pattern = parse(spec)
    defaults = mosaic_gpu.BlockSizes.for_head_dim(shape.head_dim, pattern, shape.seq_len)
    sizes = dataclasses.replace(defaults, **(overrides or {}), fused_dq=fused_dq)

    def forward(q, k, v):
        return mosaic_gpu.attention(q, k, v, pattern, scale=shape.head_dim ** -0.5, block_sizes=sizes)

    return timed_function(forward, "fwd_bwd").lower(*inputs).compile()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--select", default=".", help="regex: only the cases whose 'SEQ Q/KV dD PATTERN' matches")
    parser.add_argument("--block-sizes", type=json.loads, default={},
                        help="JSON object of mosaic_gpu.BlockSizes fields overriding the head_dim's defaults")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if "fused_dq" in args.block_sizes:
        parser.error("--block-sizes: fused_dq is what this script varies; give the other BlockSizes fields")
    rows = []
    for seq_len, heads, kv_heads, head_dim, patterns in CASES:
        shape = Shape(1, seq_len, heads, kv_heads, head_dim, "bfloat16")
        inputs = make_inputs(shape)
        for spec in patterns:
            if not re.search(args.select, f"{seq_len} {heads}/{kv_heads} d{head_dim} {spec}"):
                continue
            compiled = {name: compiled_fwd_bwd(spec, shape, inputs, fused, args.block_sizes)
                        for name, fused in VARIANTS.items()}
            row = dict(seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=spec)
            for repeat in range(args.repeats):
                for name, function in compiled.items():
                    row[f"{name}_ms_{repeat}"] = median_ms(lambda: function(*inputs), jax.block_until_ready,
                                                           args.runs, warmup=2)
            try:
                peer = attention_function("cudnn", parse(spec), shape, "fwd_bwd", False, None)
                cudnn = timed_function(peer, "fwd_bwd")
                row["cudnn_ms"] = median_ms(lambda: cudnn(*inputs), jax.block_until_ready, args.runs, warmup=2)
            except Unsupported:
                row["cudnn_ms"] = None
            fused = min(row[f"fused_ms_{r}"] for r in range(args.repeats))
            separate = min(row[f"separate_ms_{r}"] for r in range(args.repeats))
            row.update(fused_ms=fused, separate_ms=separate, fused_over_separate=fused / separate,
                       fused_over_cudnn=None if row["cudnn_ms"] is None else fused / row["cudnn_ms"])
            rows.append(row)
            times = " ".join(f"{row[f'{n}_ms_{r}']:8.3f}" for r in range(args.repeats) for n in VARIANTS)
            cudnn_ms = row["cudnn_ms"]
            cudnn_text = "" if cudnn_ms is None else f" cudnn {cudnn_ms:8.3f} ({fused / cudnn_ms:.3f})"
            print(f"{seq_len:>7} {heads}/{kv_heads} d{head_dim} {spec:<26} fused/separate: {times}  "
                  f"ratio {fused / separate:.3f}{cudnn_text}", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs=args.runs, repeats=args.repeats,
                select=args.select, block_sizes=args.block_sizes)
    write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
