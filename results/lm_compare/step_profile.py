"""Where a `compare` training step's device time goes, kernel by kernel, fresh and after training.

    python results/lm_compare/step_profile.py OUT_DIR [TRAIN_STEPS [VARIANT [IMPL]]]

step_cost.py found the time in the backward pass and growing with the trained state. This traces the
gradient of the loss (jitted alone, as step_cost.py times it) with jax.profiler on batches 0-4, once
with the fresh state and once after TRAIN_STEPS (default 150) updates, and sums the GPU's kernel time
by kernel name from the trace (jax.profiler.ProfileData, no TensorBoard needed). VARIANT is one of
step_cost.py's (default block); IMPL the attention implementation (default: the preset's).

Writes OUT_DIR/step_profile.json (per state: every kernel's summed ms per gradient and call count) and
prints the kernels that take the most time, fresh beside trained.
"""

import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
from jax.profiler import ProfileData

from lm_experiment import training
from sparse_attention.atomic_io import write_json

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import rows_of, variant_config  # noqa: E402

PROFILED_BATCHES = 5
SHOWN = 25


def kernel_ms(function, batches) -> dict:
    """{kernel name: [ms per call of `function`, launches per call]} from a trace of function on batches."""
    jax.block_until_ready(function(batches[0]))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for batch in batches:
                jax.block_until_ready(function(batch))
        profile = ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
    total_ns, launches = defaultdict(float), defaultdict(int)
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Stream lines hold the kernels; the "XLA Ops"/"XLA Modules" lines summarize the same time.
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                total_ns[event.name] += event.duration_ns
                launches[event.name] += 1
    if not total_ns:
        lines = {plane.name: [line.name for line in plane.lines] for plane in profile.planes}
        raise RuntimeError(f"no GPU stream lines in the trace; its planes and lines: {lines}")
    calls = len(batches)
    return {name: [total_ns[name] / calls / 1e6, launches[name] // calls]
            for name in sorted(total_ns, key=total_ns.get, reverse=True)}


def main(out_dir: str, train_steps: str = "150", variant: str = "block", impl: str | None = None) -> None:
    config = variant_config(variant, "compare", impl)
    trainer = training.Trainer(config, training.make_mesh(config.mesh))
    tokens = training.training_tokens(config)
    batches = [jax.block_until_ready(trainer.make_batch(rows_of(config, tokens, i)))
               for i in range(PROFILED_BATCHES)]
    loss_and_grad = jax.jit(jax.value_and_grad(trainer.loss))
    state = trainer.init_state()
    profiles = {"fresh": kernel_ms(lambda batch: loss_and_grad(state.params, batch), batches)}
    for step in range(int(train_steps)):
        state, _ = trainer.step(state, trainer.make_batch(rows_of(config, tokens, step)))
    jax.block_until_ready(state)
    trained = f"after {train_steps} steps"
    profiles[trained] = kernel_ms(lambda batch: loss_and_grad(state.params, batch), batches)
    write_json(Path(out_dir) / "step_profile.json",
               {"variant": variant, "pattern": config.attention.pattern, "impl": impl,
                "device": jax.devices()[0].device_kind, "jax": jax.__version__, "batches": PROFILED_BATCHES,
                "kernel_ms_per_gradient_and_launches": profiles})
    for label, kernels in profiles.items():
        print(f"{label}: {sum(ms for ms, _ in kernels.values()):.1f} ms of kernels per gradient, "
              f"{sum(n for _, n in kernels.values())} launches")
    names = sorted(set(profiles["fresh"]) | set(profiles[trained]),
                   key=lambda name: -max(profiles["fresh"].get(name, [0])[0], profiles[trained].get(name, [0])[0]))
    print(f"{'fresh ms':>9s} {'trained ms':>10s} {'launches':>8s}  kernel")
    for name in names[:SHOWN]:
        fresh, after = profiles["fresh"].get(name, [0.0, 0]), profiles[trained].get(name, [0.0, 0])
        print(f"{fresh[0]:9.2f} {after[0]:10.2f} {max(fresh[1], after[1]):8d}  {name[:140]}")
    shares = np.array([ms for ms, _ in profiles["fresh"].values()])
    print(f"fresh: the top 5 kernels hold {shares[:5].sum() / shares.sum():.0%} of kernel time")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
