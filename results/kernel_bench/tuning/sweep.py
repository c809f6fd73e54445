"""Issue 15: `mosaic_gpu` with other tiles, stages and warpgroups (`BlockSizes`) against its defaults and cuDNN:

    python results/kernel_bench/tuning/sweep.py --seq 32768 --kv-heads 16 --head-dim 128 \
        --patterns "window(1024);dense" --modes fwd,fwd_bwd \
        --variants '[{"block_k": 64, "stages": 3}, {"warpgroups_dkv": 1}]' --out sweep.json

Every variant overrides some fields of the defaults, `BlockSizes.for_head_dim(head_dim, pattern, seq)`, which
always run first. Each
case compiles all its variants and cuDNN (where it supports the pattern) once, then times them in `--rounds`
interleaved rounds (`timing.interleaved_ms`), so that drift during the run falls on all alike; it reports each
one's median time, and its time over the defaults' and over cuDNN's as the median of the round-by-round ratios
with a 95 % interval (`timing.ratio_interval`). A variant that does not compile (SMEM, registers, an invalid
field) is recorded with its error. The JSON is rewritten (atomically) after every case, so a run stopped by a
time limit keeps the cases it finished. Inputs are the benchmark's (`lm_experiment/bench.py`): batch 1,
bfloat16, normal random.
"""

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time

import jax

from lm_experiment.bench import Shape, Unsupported, attention_function, make_inputs, timed_function
from lm_experiment.timing import interleaved_ms, ratio_interval
from sparse_attention.atomic_io import write_json
from sparse_attention.kernels import mosaic_gpu
from sparse_attention.patterns import parse


def compiled(spec: str, shape: Shape, arguments, mode: str, overrides: dict):
    """`mosaic_gpu` for one pattern and mode (arguments: q, k, v[, d_out]) with the default BlockSizes for the
    head_dim, pattern and length changed by `overrides`."""
    pattern = parse(spec)
    sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(shape.head_dim, pattern, shape.seq_len),
                                **overrides)

    def forward(q, k, v):
        return mosaic_gpu.attention(q, k, v, pattern, scale=shape.head_dim ** -0.5, block_sizes=sizes)

    return timed_function(forward, mode).lower(*arguments).compile()


CUDNN = "cudnn"  # cuDNN's entry among the timed functions


def _ratio_text(row: dict, key: str, label: str) -> str:
    if key not in row:
        return ""
    return f"  / {label} {row[key]:.3f} [{row[key + '_low']:.3f}, {row[key + '_high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--patterns", default="window(1024);dense", help="';'-separated pattern specs")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--variants", type=json.loads, required=True,
                        help="JSON list of objects of BlockSizes fields overriding the defaults")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not isinstance(args.variants, list) or not all(isinstance(v, dict) for v in args.variants):
        parser.error("--variants: a JSON list of objects, e.g. '[{\"block_k\": 64}]'")
    modes = args.modes.split(",")
    if unknown := set(modes) - {"fwd", "fwd_bwd"}:
        parser.error(f"--modes: {sorted(unknown)} are not modes; valid: fwd, fwd_bwd")
    variants = [{}] + [v for v in args.variants if v]
    shape = Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, "bfloat16")
    inputs = make_inputs(shape)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seq_len=args.seq, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, rounds=args.rounds, confidence=0.95,
                defaults={spec: dataclasses.asdict(
                    mosaic_gpu.BlockSizes.for_head_dim(args.head_dim, parse(spec), args.seq))
                    for spec in args.patterns.split(";")})
    rows = []
    for spec in args.patterns.split(";"):
        for mode in modes:
            arguments = inputs if mode == "fwd_bwd" else inputs[:3]
            functions = {}
            for overrides in variants:
                name = json.dumps(overrides, sort_keys=True)
                try:
                    functions[name] = compiled(spec, shape, arguments, mode, overrides)
                except Exception as error:  # a variant that does not fit is a result, not a failure
                    rows.append(dict(pattern=spec, mode=mode, variant=name, status=f"error: {error}"[:400]))
                    print(f"{spec:<26} {mode:<8} {name:<48} error: {str(error).splitlines()[0][:120]}", flush=True)
            calls = {name: functools.partial(function, *arguments) for name, function in functions.items()}
            try:
                peer = timed_function(attention_function("cudnn", parse(spec), shape, mode, False, None), mode)
                calls[CUDNN] = functools.partial(peer.lower(*arguments).compile(), *arguments)
            except Unsupported:
                pass
            samples = interleaved_ms(calls, jax.block_until_ready, args.rounds, warmup=2)
            for name in functions:
                row = dict(pattern=spec, mode=mode, variant=name, status="ok", ms=statistics.median(samples[name]),
                           rounds=len(samples[name]))
                for key, base in (("over_default", "{}"), ("over_cudnn", CUDNN)):
                    if base in samples:
                        row[key], row[f"{key}_low"], row[f"{key}_high"] = ratio_interval(samples[name], samples[base])
                if CUDNN in samples:
                    row["cudnn_ms"] = statistics.median(samples[CUDNN])
                rows.append(row)
                print(f"{spec:<26} {mode:<8} {name:<48} {row['ms']:9.3f} ms"
                      f"{_ratio_text(row, 'over_default', 'default')}{_ratio_text(row, 'over_cudnn', 'cuDNN')}",
                      flush=True)
            write_json(args.out, dict(meta=meta, rows=rows))  # after every case: a stopped run keeps its rows


if __name__ == "__main__":
    main()
