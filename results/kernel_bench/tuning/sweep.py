"""Issue 15: `mosaic_gpu` with other tiles, stages and warpgroups (`BlockSizes`) against its defaults and cuDNN:

    python results/kernel_bench/tuning/sweep.py --seq 32768 --kv-heads 16 --head-dim 128 \
        --patterns "window(1024);dense" --modes fwd,fwd_bwd \
        --variants '[{"block_k": 64, "stages": 3}, {"warpgroups_dkv": 1}]' --out sweep.json

Every variant overrides some fields of `BlockSizes.for_head_dim(head_dim)`; the defaults always run first. Each
case compiles all its variants once, then times them in turn, `--repeats` times over, so that drift shows as
the spread between repeats; the reported time is the smallest repeat's median. A variant that does not compile
(SMEM, registers, an invalid field) is recorded with its error. Inputs and timing are the benchmark's
(`lm_experiment/bench.py`, `lm_experiment/timing.py`): batch 1, bfloat16, normal random.
"""

import argparse
import dataclasses
import json
import platform
import time

import jax

from lm_experiment.bench import Shape, Unsupported, attention_function, make_inputs, timed_function
from lm_experiment.timing import median_ms
from sparse_attention.atomic_io import write_json
from sparse_attention.kernels import mosaic_gpu
from sparse_attention.patterns import parse


def compiled(spec: str, shape: Shape, arguments, mode: str, overrides: dict):
    """`mosaic_gpu` for one pattern and mode (arguments: q, k, v[, d_out]) with the head_dim's default
    BlockSizes changed by `overrides`."""
    pattern = parse(spec)
    sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(shape.head_dim), **overrides)

    def forward(q, k, v):
        return mosaic_gpu.attention(q, k, v, pattern, scale=shape.head_dim ** -0.5, block_sizes=sizes)

    return timed_function(forward, mode).lower(*arguments).compile()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--patterns", default="window(1024);dense", help="';'-separated pattern specs")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--variants", type=json.loads, required=True,
                        help="JSON list of objects of BlockSizes fields overriding the head_dim's defaults")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
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
            times = {name: [] for name in functions}
            for _ in range(args.repeats):
                for name, function in functions.items():
                    times[name].append(median_ms(lambda: function(*arguments), jax.block_until_ready, args.runs,
                                                 warmup=2))
            try:
                peer = timed_function(attention_function("cudnn", parse(spec), shape, mode, False, None), mode)
                cudnn_ms = min(median_ms(lambda: peer(*arguments), jax.block_until_ready, args.runs, warmup=2)
                               for _ in range(args.repeats))
            except Unsupported:
                cudnn_ms = None
            default_ms = min(times["{}"]) if "{}" in times else None
            for name, repeats in times.items():
                best = min(repeats)
                row = dict(pattern=spec, mode=mode, variant=name, status="ok", ms=best, repeats_ms=repeats,
                           cudnn_ms=cudnn_ms, over_default=None if default_ms is None else best / default_ms,
                           over_cudnn=None if cudnn_ms is None else best / cudnn_ms)
                rows.append(row)
                spread = " ".join(f"{t:9.3f}" for t in repeats)
                cudnn_text = "" if cudnn_ms is None else f"  / cuDNN {cudnn_ms:9.3f} = {row['over_cudnn']:.3f}"
                default_text = "" if default_ms is None else f"  / default {row['over_default']:.3f}"
                print(f"{spec:<26} {mode:<8} {name:<48} {spread}{default_text}{cudnn_text}", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seq_len=args.seq, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, runs=args.runs, repeats=args.repeats,
                defaults=dataclasses.asdict(mosaic_gpu.BlockSizes.for_head_dim(args.head_dim)))
    write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
