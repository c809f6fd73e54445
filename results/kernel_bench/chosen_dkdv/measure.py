"""Issue 18: dk/dv of a `topk` choice from transposed lists built on the device, against a formulation that
needs none. Runs only at commit 6a708eb, the one that had both (`triton.CHOSEN_DKDV`; the scan was removed
after this measurement, `docs/benchmarks.md`):

    git checkout 6a708eb && python results/kernel_bench/chosen_dkdv/measure.py --out chosen_dkdv.json

"transposed": `common.choosers` builds, on the device, each key block's list of the query blocks that chose
it; dk/dv walks that list. "scan": dk/dv reads every later query block's K choices in the kernel and walks
the blocks that name its key block. Both run forward + backward of `triton` (the implementation whose
topk rows the benchmark reports), batch 1, 16 heads, head_dim 128, bf16, on bench_choice's fixed choice;
alternated A, B, A, B so that drift shows as the spread between repeats. The device-side transposition is
also timed alone.
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from lm_experiment.bench import Shape, make_inputs
from lm_experiment.bench_choice import fixed_choice
from lm_experiment.timing import median_ms
from sparse_attention.kernels import common, triton
from sparse_attention.patterns import parse

PATTERNS = ("topk(512, 4)", "topk(512, 4) | repaired(512, 64, bridge)")


def timed(variant: str, spec: str, inputs, selected, runs: int) -> float:
    triton.CHOSEN_DKDV = variant  # read when the function below is traced, at its first (warm-up) call
    pattern = parse(spec)

    def forward(q, k, v):
        return triton.attention(q, k, v, pattern, scale=0.088, selected=selected)

    @jax.jit
    def forward_backward(q, k, v, d_out):
        _, vjp = jax.vjp(forward, q, k, v)
        return vjp(d_out)

    return median_ms(lambda: forward_backward(*inputs), jax.block_until_ready, runs, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", default="32768,131072")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for seq_len in (int(s) for s in args.seq.split(",")):
        shape = Shape(1, seq_len, 16, 16, 128, "bfloat16")
        inputs = make_inputs(shape)
        for spec in PATTERNS:
            selected = jnp.asarray(fixed_choice(parse(spec), seq_len, 1, 16))
            for repeat in range(2):
                for variant in ("transposed", "scan"):
                    ms = timed(variant, spec, inputs, selected, args.runs)
                    rows.append(dict(seq_len=seq_len, pattern=spec, variant=variant, repeat=repeat, fwd_bwd_ms=ms))
                    print(f"{seq_len:>7} {spec:<42} {variant:<10} {repeat} {ms:8.3f} ms", flush=True)
        transpose = jax.jit(common.choosers)
        ms = median_ms(lambda: transpose(selected), jax.block_until_ready, args.runs, warmup=2)
        rows.append(dict(seq_len=seq_len, variant="choosers alone", transpose_ms=ms))
        print(f"{seq_len:>7} choosers alone {ms:8.3f} ms", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
