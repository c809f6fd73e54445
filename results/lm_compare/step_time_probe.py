"""Why does a `compare` run's training step slow down as it trains? Times every step of one run alone.

    python results/lm_compare/step_time_probe.py OUT_DIR [PRESET]

PRESET defaults to configs/block.py:compare. Every step is timed on its own: host time (drawing the
batch and placing it on the device) and device time (the compiled step to the end of its last kernel,
waited for with block_until_ready, so no step overlaps the next). Three phases, all with the one compiled
step:

  trained   a fresh state trained for train.steps steps on the usual batches (step i gets batch i)
  fresh     a second fresh state, the first 50 steps on batches 0-49
  replay    the trained state of `trained`, 50 more steps on batches 0-49 again

If the step slows with the state (the weights and optimizer moments), `replay` is slow and `fresh` fast;
if it slows with time or with the process (allocator, host), both are slow. Writes OUT_DIR/step_times.json
({phase: {host_s, device_s}} per step) and prints the median times per 25 steps.
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lm_experiment import data, training
from lm_experiment.config import ExperimentConfig
from lm_experiment.eval_runs import config_file_dict
from sparse_attention.atomic_io import write_json

REPLAY_STEPS = 50


def timed_steps(trainer, state, tokens, config, batches):
    host, device = [], []
    for batch_index in batches:
        start = time.perf_counter()
        rows = data.batch_for_step(tokens, seed=config.seed, step=batch_index, process_index=0, process_count=1,
                                   global_batch=config.train.global_batch, seq_len=config.train.seq_len)
        batch = jax.block_until_ready(trainer.make_batch(rows))
        placed = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        host.append(placed - start)
        device.append(time.perf_counter() - placed)
    return state, {"host_s": host, "device_s": device}


def main(out_dir: str, preset: str = "configs/block.py:compare") -> None:
    config = ExperimentConfig.from_config_dict(config_file_dict(preset))
    trainer = training.Trainer(config, training.make_mesh(config.mesh))
    tokens = training.training_tokens(config)
    trainer.compile()
    steps = config.train.steps
    trained, phases = trainer.init_state(), {}
    trained, phases["trained"] = timed_steps(trainer, trained, tokens, config, range(steps))
    _, phases["fresh"] = timed_steps(trainer, trainer.init_state(), tokens, config, range(REPLAY_STEPS))
    _, phases["replay"] = timed_steps(trainer, trained, tokens, config, range(REPLAY_STEPS))
    write_json(Path(out_dir) / "step_times.json", {"preset": preset, "device": jax.devices()[0].device_kind,
                                                   "phases": phases})
    for name, times in phases.items():
        device = np.array(times["device_s"])
        host = np.array(times["host_s"])
        medians = [f"{np.median(device[i:i + 25]) * 1e3:.0f}" for i in range(0, len(device), 25)]
        print(f"{name}: device ms per 25 steps {' '.join(medians)}; host median {np.median(host) * 1e3:.1f} ms")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
