"""Issue 15: one forward + backward call of each backward, for Nsight Compute to profile kernel by kernel:

    ncu --clock-control none --set full --kernel-name regex:sparse_attention_dkdv -o backward \
        python results/kernel_bench/fused_dq/profile_backward.py [--seq 16384 --head-dim 128 --pattern dense]

It compiles everything first, then runs `mosaic_gpu` with dq in the dk/dv kernel ("fused"), then with the
separate dq kernel ("separate"), then cuDNN where it covers the pattern, one call each, so the profiled
launches come in that order (both dk/dv kernels are named sparse_attention_dkdv: the first is the fused one).
With `--mode fwd`, one forward call of `mosaic_gpu` and then of cuDNN. Inputs are the benchmark's (batch 1,
bfloat16, normal random).
"""

import argparse

import jax

from lm_experiment.bench import Shape, Unsupported, attention_function, timed_function, make_inputs
from measure import VARIANTS, compiled_fwd_bwd
from sparse_attention.patterns import parse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--pattern", default="dense")
    parser.add_argument("--mode", default="fwd_bwd", choices=("fwd", "fwd_bwd"))
    args = parser.parse_args()
    shape = Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, "bfloat16")
    inputs = jax.block_until_ready(make_inputs(shape))  # q, k, v, d_out
    if args.mode == "fwd_bwd":
        functions = {name: compiled_fwd_bwd(args.pattern, shape, inputs, fused) for name, fused in VARIANTS.items()}
    else:
        inputs = inputs[:3]  # a forward takes no d_out
        ours = attention_function("mosaic_gpu", parse(args.pattern), shape, "fwd", False, None)
        functions = {"mosaic_gpu": timed_function(ours, "fwd").lower(*inputs).compile()}
    try:
        cudnn = attention_function("cudnn", parse(args.pattern), shape, args.mode, False, None)
        functions["cudnn"] = timed_function(cudnn, args.mode).lower(*inputs).compile()
    except Unsupported as reason:
        print(f"cudnn: {reason}")
    for name, function in functions.items():
        jax.block_until_ready(function(*inputs))
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main()
