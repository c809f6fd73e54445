"""Issue 15: the `small` preset's training step at 32k with `mosaic_gpu`'s backward computing dq in the dk/dv
kernel ("fused", the default at the preset's head_dim 64) and with the separate dq kernel ("separate", the
backward before 25ce6af), in one process:

    python results/kernel_bench/fused_dq/train_step.py --out train_step.json [--variants block,dense]
        [--backwards separate,fused]
    # --interpret: the kernels in Pallas' GPU interpreter, for a preset mosaic_gpu takes (compare, small);
    # slow: the compare preset at --seq-len 256 did not finish within 15 minutes on a 2-core CPU

For each config file and backward: compile the real training step (`training.Trainer`, attention impl
mosaic_gpu), then time STEPS steps from a fresh state on the corpus's batches 0.., each step waited for on its
own; the median and its tokens/s. The backward is chosen by replacing `mosaic_gpu.fuses_dq`, which the
kernel's custom VJP reads when the step is traced.
"""

import argparse
import platform
import time

import jax
import numpy as np

from lm_experiment import data, training
from lm_experiment.config import ExperimentConfig
from lm_experiment.eval_runs import config_file_dict
from sparse_attention.atomic_io import write_json
from sparse_attention.kernels import mosaic_gpu

BACKWARDS = {"separate": False, "fused": True}


def step_config(variant: str, preset: str, seq_len: int, interpret: bool) -> ExperimentConfig:
    settings = config_file_dict(f"configs/{variant}.py:{preset}")
    settings["train"]["seq_len"] = seq_len
    settings["attention"].update(impl="mosaic_gpu", interpret=interpret)
    return ExperimentConfig.from_config_dict(settings)


def timed_step(config: ExperimentConfig, fused: bool, steps: int) -> dict:
    mosaic_gpu.fuses_dq = lambda block_sizes, head_dim, group, plan: fused
    trainer = training.Trainer(config, training.make_mesh(config.mesh))
    tokens = training.training_tokens(config)
    compile_s = trainer.compile()
    rows = [data.batch_for_step(tokens, seed=config.seed, step=step, process_index=0, process_count=1,
                                global_batch=config.train.global_batch, seq_len=config.train.seq_len)
            for step in range(steps)]
    state = trainer.init_state()
    times = []
    for row in rows:
        batch = jax.block_until_ready(trainer.make_batch(row))
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_ms = float(np.median(times) * 1e3)
    return dict(compile_s=compile_s, step_ms=step_ms, tokens_per_sec=trainer.tokens_per_step / step_ms * 1e3,
                steps_ms=[t * 1e3 for t in times])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="block,dense", help="config files under configs/")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--interpret", action="store_true",
                        help="the kernels in Pallas' GPU interpreter, to check this script on a CPU (PJRT_NPROC=16)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backwards", default=",".join(BACKWARDS), help=f"a subset of {', '.join(BACKWARDS)}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    backwards = args.backwards.split(",")
    if not set(backwards) <= set(BACKWARDS):
        parser.error(f"--backwards must be a subset of {', '.join(BACKWARDS)}, got {args.backwards!r}")
    rows = []
    for variant in args.variants.split(","):
        config = step_config(variant, args.preset, args.seq_len, args.interpret)
        for name in backwards:
            fused = BACKWARDS[name]
            row = dict(variant=variant, pattern=config.attention.pattern, backward=name,
                       **timed_step(config, fused, args.steps))
            rows.append(row)
            print(f"{variant:8s} {name:9s} {row['step_ms']:9.1f} ms  {row['tokens_per_sec']:11,.0f} tokens/s  "
                  f"(compile {row['compile_s']:.0f} s)", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), preset=args.preset, seq_len=args.seq_len,
                steps=args.steps, backwards=backwards)
    write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
