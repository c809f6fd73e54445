"""Training step cost of each LM comparison variant, timed alone, and where a trained state's extra time goes.

    python results/lm_compare/step_cost.py OUT_DIR [STEPS_TIMED [TRAIN_STEPS [SIZE [IMPL]]]]

SIZE is the preset (default compare); IMPL the attention implementation (default: the preset's, auto), so
that the same measurement with another kernel shows whether the cost follows the kernel.

For every variant of run.sh: compile the training step, then time STEPS_TIMED (default 30) steps from a
fresh state on batches 0.., each step waited for on its own (median and tokens/s). step_time_probe.py
showed that a step's time grows with the trained state, so these are the costs at the start of training;
every variant is timed from the same point.

Then, for block (block(512) in compare): the forward loss, the loss with its gradient, and the optimizer
update, each jitted alone and timed on batches 0-9 with the fresh state and with the state after
TRAIN_STEPS (default 150) updates. The part whose time grows is where the slowdown lives. Last, the
gradient of the embedding lookup alone, in three forms (`embedding_costs`).

Writes OUT_DIR/step_cost.json and prints the tables.
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

from lm_experiment import data, training
from lm_experiment.config import ExperimentConfig
from lm_experiment.eval_runs import config_file_dict
from sparse_attention.atomic_io import write_json

VARIANTS = {  # run.sh's variants: config file and pattern
    "dense": ("dense", None), "block": ("block", None), "window": ("window", None),
    "window2b": ("window", "window(1024)"), "bridge": ("repaired", None), "prefix": ("repaired", None),
    "shifted": ("block", "shifted(512)"),
}


def variant_config(name: str, size: str, impl: str | None = None) -> ExperimentConfig:
    file, pattern = VARIANTS[name]
    settings = config_file_dict(f"configs/{file}.py:{size}{',prefix' if name == 'prefix' else ''}")
    if pattern is not None:
        settings["attention"]["pattern"] = pattern
    if impl is not None:
        settings["attention"]["impl"] = impl
    return ExperimentConfig.from_config_dict(settings)


def rows_of(config: ExperimentConfig, tokens: np.ndarray, step: int) -> np.ndarray:
    return data.batch_for_step(tokens, seed=config.seed, step=step, process_index=0, process_count=1,
                               global_batch=config.train.global_batch, seq_len=config.train.seq_len)


def median_ms(function, batches) -> float:
    times = []
    for batch in batches:
        start = time.perf_counter()
        jax.block_until_ready(function(batch))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def variant_costs(size: str, steps_timed: int, impl: str | None) -> dict:
    costs = {}
    for name in VARIANTS:
        config = variant_config(name, size, impl)
        trainer = training.Trainer(config, training.make_mesh(config.mesh))
        tokens = training.training_tokens(config)
        compile_s = trainer.compile()
        batches = [jax.block_until_ready(trainer.make_batch(rows_of(config, tokens, i))) for i in range(steps_timed)]
        state = [trainer.init_state()]

        def one_step(batch):
            state[0], metrics = trainer.step(state[0], batch)
            return metrics

        step_ms = median_ms(one_step, batches)
        costs[name] = {"pattern": config.attention.pattern, "compile_s": compile_s, "median_step_ms": step_ms,
                       "tokens_per_sec": trainer.tokens_per_step / step_ms * 1e3}
        print(f"{name:9s} {config.attention.pattern:28s} {step_ms:7.1f} ms  {costs[name]['tokens_per_sec']:10,.0f} "
              f"tokens/s  (compile {compile_s:.0f} s)", flush=True)
    block = costs["block"]["median_step_ms"]
    for cost in costs.values():
        cost["time_vs_block"] = cost["median_step_ms"] / block
    return costs


def part_costs(size: str, train_steps: int, impl: str | None) -> dict:
    config = variant_config("block", size, impl)
    trainer = training.Trainer(config, training.make_mesh(config.mesh))
    tokens = training.training_tokens(config)
    batches = [jax.block_until_ready(trainer.make_batch(rows_of(config, tokens, i))) for i in range(10)]
    loss = jax.jit(trainer.loss)
    loss_and_grad = jax.jit(jax.value_and_grad(trainer.loss))
    update = jax.jit(trainer.optimizer.update)
    state = trainer.init_state()
    parts = {}
    for label in ("fresh", f"after {train_steps} steps"):
        if label != "fresh":
            for step in range(train_steps):
                state, _ = trainer.step(state, trainer.make_batch(rows_of(config, tokens, step)))
            jax.block_until_ready(state)
        params, opt_state = state.params, state.opt_state
        grads = loss_and_grad(params, batches[0])[1]
        for function in (loss, loss_and_grad):  # compile outside the timing
            jax.block_until_ready(function(params, batches[0]))
        jax.block_until_ready(update(grads, opt_state, params))
        parts[label] = {
            "forward_ms": median_ms(lambda batch: loss(params, batch), batches),
            "forward_backward_ms": median_ms(lambda batch: loss_and_grad(params, batch), batches),
            "optimizer_update_ms": median_ms(lambda _: update(grads, opt_state, params), batches),
        }
        timings = "  ".join(f"{key} {value:.1f}" for key, value in parts[label].items())
        print(f"{config.attention.pattern} {label:18s} {timings}", flush=True)
    return parts


def embedding_costs(size: str) -> dict:
    """ms per gradient of the model's embedding lookup ([vocab, d_model] float32 table, the batch's tokens),
    in three forms: rows cast to bfloat16 before the gather (nnx.Embed, the model before the fix; the
    scatter-add runs in bfloat16), rows gathered in float32 and cast after (the model since), and a one-hot
    matmul. Each on the corpus's batches 0-9 and on uniformly random tokens of the same shape."""
    config = variant_config("block", size)
    tokens = training.training_tokens(config)
    shape = (config.model.vocab_size, config.model.d_model)
    table = jax.random.normal(jax.random.key(0), shape, jax.numpy.float32)
    bf16 = jax.numpy.bfloat16
    lookups = {
        "bfloat16_gather": lambda table, ids: table.astype(bf16)[ids],
        "float32_gather": lambda table, ids: table[ids].astype(bf16),
        "one_hot_matmul": lambda table, ids: jax.numpy.einsum(
            "bsv,vd->bsd", jax.nn.one_hot(ids, shape[0], dtype=bf16), table.astype(bf16),
            preferred_element_type=jax.numpy.float32),
    }
    corpus = [rows_of(config, tokens, i)[:, :-1] for i in range(10)]
    uniform = [np.random.default_rng(i).integers(0, shape[0], ids.shape, dtype=np.int32)
               for i, ids in enumerate(corpus)]
    # Random rows' gradients: a scatter-add's speed may depend on the values it adds, not only where.
    cotangent = jax.random.normal(jax.random.key(1), corpus[0].shape + shape[1:], jax.numpy.float32) * 1e-3
    costs = {}
    for form, lookup in lookups.items():
        lookup_grad = jax.jit(jax.grad(lambda table, ids: (lookup(table, ids).astype(jax.numpy.float32)
                                                            * cotangent).sum()))
        jax.block_until_ready(lookup_grad(table, corpus[0]))
        costs[form] = {name: median_ms(lambda ids: lookup_grad(table, ids), batches)
                       for name, batches in (("corpus_tokens_ms", corpus), ("uniform_tokens_ms", uniform))}
        print(f"embedding lookup gradient, {form:16s} " + "  ".join(f"{key} {value:.2f}"
                                                              for key, value in costs[form].items()), flush=True)
    return costs


def main(out_dir: str, steps_timed: str = "30", train_steps: str = "150", size: str = "compare",
         impl: str | None = None) -> None:
    costs = variant_costs(size, int(steps_timed), impl)
    parts = part_costs(size, int(train_steps), impl)
    embedding = embedding_costs(size)
    write_json(Path(out_dir) / "step_cost.json", {"size": size, "impl": impl, "device": jax.devices()[0].device_kind,
                                                  "jax": jax.__version__, "steps_timed": int(steps_timed),
                                                  "variants": costs, "block_parts": parts,
                                                  "embedding_gradient": embedding})


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
