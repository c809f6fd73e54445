"""The longest context a variant trains at on one device: `python -m lm_experiment.context_limit`.

For each variant (configs/<variant>.py at a preset, batch 1) and each sequence length in increasing order:

1. compile the real train step (lm_experiment.training.Trainer) and read XLA's memory analysis;
2. if it fits in the device's memory, run `--steps` updates on random tokens and time the last one.

A variant's probe stops at its first length that does not fit or fails at run time (an out-of-memory
error), so the longest "ok" row is the longest context that trained. A length whose step would take
longer than `--max-step-seconds` (projected quadratically from the last measured step) is compiled and
checked for memory but not run: status "fits, not run"; `--compile-only` does that at every length.
Memory is what JAX lets XLA use: by default 75% of the GPU (raise it with XLA_PYTHON_CLIENT_MEM_FRACTION).
Prints a table and writes a JSON report (atomically, after every case).

    python -m lm_experiment.context_limit --preset small --variants dense,repaired \\
        --seq-lens 65536,131072,262144,524288,1048576,2097152 --impl triton
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import jax
import numpy as np

from lm_experiment import bench, training
from lm_experiment.config import ExperimentConfig
from lm_experiment.main_job import variant_config
from sparse_attention import atomic_io


def probe_config(variant: str, preset: str, seq_len: int, impl: str) -> ExperimentConfig:
    """configs/<variant>.py:<preset> with one sequence of seq_len per step, no accumulation, one device."""
    config = variant_config(variant, preset).to_dict()
    config["train"].update(seq_len=seq_len, global_batch=1, grad_accum=1)
    config["attention"]["impl"] = impl
    config["mesh"].update(data=1, fsdp=1)
    return ExperimentConfig.from_config_dict(config)


def probe(config: ExperimentConfig, *, steps: int, run: bool) -> dict:
    """One row: status ("ok", "fits, not run", "oom", "error: ..."), memory, and the last step's time."""
    device = jax.devices()[0]
    row = dict(variant_pattern=config.attention.pattern, seq_len=config.train.seq_len, status="ok",
               memory_bytes=None, compile_seconds=None, step_seconds=None, tokens_per_sec=None)
    try:
        trainer = training.Trainer(config, training.make_mesh(config.mesh, [device]))
        row["compile_seconds"] = trainer.compile()
        row["memory_bytes"] = bench.compiled_memory_bytes(trainer.compiled_step)
        limit = bench.device_memory_limit()
        if limit is not None and row["memory_bytes"] is not None and row["memory_bytes"] > limit:
            row["status"] = "oom"
            return row
        if not run:
            row["status"] = "fits, not run"
            return row
        state = trainer.init_state()
        tokens = np.random.default_rng(0).integers(0, 256, trainer.batch_shape, dtype=np.int32)
        batch = trainer.make_batch(tokens)
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            loss = float(metrics["loss"])  # waits for the step
            row["step_seconds"] = time.perf_counter() - start
        if not np.isfinite(loss):
            row["status"] = f"error: non-finite loss {loss}"
        row["tokens_per_sec"] = config.train.seq_len / row["step_seconds"]
    except Exception as error:  # an out-of-memory failure ends this variant's probe, not the report
        row["status"] = "oom" if bench.is_oom(error) else f"error: {type(error).__name__}: {str(error)[:300]}"
    finally:
        gc.collect()
        jax.clear_caches()
    return row


def format_row(variant: str, row: dict) -> str:
    memory = "" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**30:7.2f} GiB"
    step = "" if row["step_seconds"] is None else (f"{row['step_seconds']:8.2f} s/step "
                                                   f"{row['tokens_per_sec']:10.0f} tok/s")
    return f"{variant:<10} {row['variant_pattern']:<26} {row['seq_len']:>9} {row['status']:<14} {memory} {step}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--variants", default="dense,repaired",
                        help="comma-separated config files of configs/ (dense, block, window, repaired)")
    parser.add_argument("--seq-lens", default="65536,131072,262144,524288,1048576,2097152")
    parser.add_argument("--impl", default="auto", help="attention.impl for every probe")
    parser.add_argument("--steps", type=int, default=2, help="updates per length; the last one is timed")
    parser.add_argument("--max-step-seconds", type=float, default=60.0)
    parser.add_argument("--compile-only", action="store_true", help="check memory at every length, run nothing")
    parser.add_argument("--out", default="reports/context_limit.json")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        args.seq_lens = sorted(int(s) for s in args.seq_lens.split(",") if s.strip())
    except ValueError as error:
        parser.error(f"--seq-lens: {error}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    report = dict(meta=dict(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                            preset=args.preset, impl=args.impl, steps=args.steps, compile_only=args.compile_only,
                            memory_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                            max_step_seconds=args.max_step_seconds,
                            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                  results=[])
    print(f"# {report['meta']['device']} jax {jax.__version__} preset={args.preset} batch 1 impl={args.impl}",
          flush=True)
    for variant in args.variants:
        last = None  # (seq_len, step_seconds) of the last length that ran
        for seq_len in args.seq_lens:
            config = probe_config(variant, args.preset, seq_len, args.impl)
            projected = None if last is None else last[1] * (seq_len / last[0]) ** 2
            run = not args.compile_only and (projected is None or projected <= args.max_step_seconds)
            row = probe(config, steps=args.steps, run=run)
            row["variant"] = variant
            report["results"].append(row)
            print(format_row(variant, row), flush=True)
            atomic_io.write_json(args.out, report)
            if row["status"] == "ok":
                last = (seq_len, row["step_seconds"])
            elif row["status"] != "fits, not run":
                break
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
