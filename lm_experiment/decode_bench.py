"""Decoding speed and cache memory by pattern, batch and context: `python -m lm_experiment.decode_bench`.

For every pattern, decoding step (`--impls`: XLA, or the fused Triton kernels of `fused_decode`), batch and
context C: a DecoderLM of the preset's shape (random weights: the time does not depend on them), its caches as
a C-token prefill leaves them (random keys and values in the slots `CacheLayout.kept(C)` names), and `--steps`
tokens decoded greedily in one jitted scan (`generation.decoder`), timed by `timing.median_ms`.

  ms_per_step   time of one decoding step of the whole batch
  tokens_per_s  batch / ms_per_step
  cache_bytes   keys, values and slot positions of every layer's cache
  floor_ms      the least a step can take: reading the parameters (as decoding holds them) and the caches of
                a `context`-token prefill once, at the copy rate measured at the start of the run
                (`bench.measure_ceilings`); x_floor = ms_per_step / floor_ms
  oom           the caches alone would exceed `--memory-fraction` of the device's memory: not run
  trace         with --trace: one more call traced by JAX's profiler (`device_trace`), per step: kernels,
                kernel_ms (their summed durations), busy_ms (their union) and gap_ms (the span's idle rest)

`ratios`: for each pattern, impl, batch and context that ran beside dense, dense's least time per step (over
the impls) over the pattern's, measured and at both floors. The second bounds what any implementation of this
model could reach on this device.

With --attention-peer (dense only), one layer's attention alone at each context: this package's XLA
`decode_attention` against JAX's Pallas decode kernel (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`,
GPU only) on the same cache, so the note can say whether attention is the step's bottleneck.

Prints a table and rewrites the JSON report (atomically) after every case. --smoke: a tiny model and
contexts on CPU, for the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from configs import base
from lm_experiment import bench, device_trace, fused_decode, generation, timing
from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.model import DecoderLM
from sparse_attention import atomic_io
from sparse_attention.decoding import CacheLayout, KVCache, decode_attention
from sparse_attention.patterns import Dense

DEFAULT_CONTEXTS = (8192, 32768, 131072, 1048576)
DEFAULT_PATTERNS = ("dense", "window(1024)", "block(512)", "repaired(512, 64, bridge)", "repaired(512, 64, prefix)")
SMOKE_MODEL = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                   tie_embeddings=True, remat=False, rope_base=10000.0, compute_dtype="float32",
                   param_dtype="float32")


def model_config(preset: str, smoke: bool) -> ModelConfig:
    return ModelConfig(**(SMOKE_MODEL if smoke else base.get_config(preset).model.to_dict()))


def caches_after(model: DecoderLM, batch: int, context: int, steps: int, key) -> list[KVCache]:
    """Each layer's cache for sequences of context + steps positions, as a prefill of `context` tokens leaves
    it: random keys and values in the slots it fills, their positions set."""
    filled = []
    for cache, layer_key in zip(model.empty_caches(batch, context + steps), jax.random.split(key, len(model.blocks))):
        kept = cache.layout.kept(context)
        slots = cache.layout.slot(kept)
        k_key, v_key = jax.random.split(layer_key)
        shape = (batch, len(kept)) + cache.k.shape[2:]
        filled.append(dataclasses.replace(
            cache, k=cache.k.at[:, slots].set(jax.random.normal(k_key, shape, cache.k.dtype)),
            v=cache.v.at[:, slots].set(jax.random.normal(v_key, shape, cache.v.dtype)),
            positions=cache.positions.at[slots].set(jnp.asarray(kept, jnp.int32))))
    return filled


def cache_bytes(model: DecoderLM, batch: int, max_len: int) -> int:
    """Bytes of every layer's cache, from the shapes alone (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: model.empty_caches(batch, max_len))
    return int(sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes)))


def parameter_bytes(model: DecoderLM) -> int:
    """Bytes of the parameters a decoding step reads, as `generation.split_for_inference` holds them."""
    _, state = generation.split_for_inference(model)
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)))


def device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def run_case(config: ModelConfig, pattern: str, impl: str, batch: int, context: int, args,
             copy_bytes_per_s: float) -> dict:
    row = dict(pattern=pattern, impl=impl, batch=batch, context=context, steps=args.steps)
    model = DecoderLM(config, AttentionConfig(pattern=pattern, schedule=(), impl="auto", interpret=False),
                      rngs=nnx.Rngs(0))
    row["cache_bytes"] = cache_bytes(model, batch, context + args.steps)
    row["floor_bytes"] = parameter_bytes(model) + cache_bytes(model, batch, context)
    row["floor_ms"] = 1e3 * row["floor_bytes"] / copy_bytes_per_s
    row["cache_slots"] = [CacheLayout.for_pattern(block.attention.pattern, context + args.steps).slots
                          for block in model.blocks]
    limit = device_memory()
    if limit is not None and row["cache_bytes"] > args.memory_fraction * limit:
        return dict(row, status="oom",
                    detail=f"caches need {row['cache_bytes'] / 2**30:.1f} GiB of {limit / 2**30:.0f}")
    caches = caches_after(model, batch, context, args.steps, jax.random.key(1))
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
    decode = generation.decoder(model, args.steps, impl=impl, interpret=args.interpret)
    start, key = jnp.int32(context), jax.random.key(0)

    def call():
        return decode(caches, logits, start, key)

    ms = timing.median_ms(call, jax.block_until_ready, args.runs, args.warmup)
    ms_per_step = ms / args.steps
    row.update(status="ok", ms_per_step=ms_per_step, tokens_per_s=1e3 * batch / ms_per_step,
               x_floor=ms_per_step / row["floor_ms"])
    if args.trace:
        row["trace"] = per_step(device_trace.traced_call(call, jax.block_until_ready), args.steps)
    return row


def per_step(summary: dict, steps: int) -> dict:
    """A traced call's summary with its totals divided by the decoding steps the call ran."""
    if summary["status"] != "ok":
        return summary
    return dict(summary, kernels_per_step=summary["kernels"] / steps,
                kernel_ms_per_step=summary["kernel_ms"] / steps, busy_ms_per_step=summary["busy_ms"] / steps,
                gap_ms_per_step=(summary["span_ms"] - summary["busy_ms"]) / steps)


def dense_ratios(rows: list[dict]) -> list[dict]:
    """For each row that ran beside dense at its batch and context: dense's least time per step (over the
    impls that ran) over the row's, measured (`measured`) and at both floors (`at_floors`)."""
    dense = {}
    for r in rows:
        if r["pattern"] == "dense" and r["status"] == "ok":
            best = dense.get((r["batch"], r["context"]))
            if best is None or r["ms_per_step"] < best["ms_per_step"]:
                dense[r["batch"], r["context"]] = r
    return [dict(pattern=r["pattern"], impl=r["impl"], batch=r["batch"], context=r["context"],
                 dense_impl=dense[r["batch"], r["context"]]["impl"],
                 measured=dense[r["batch"], r["context"]]["ms_per_step"] / r["ms_per_step"],
                 at_floors=dense[r["batch"], r["context"]]["floor_ms"] / r["floor_ms"])
            for r in rows if r["pattern"] != "dense" and r["status"] == "ok" and (r["batch"], r["context"]) in dense]


def attention_peer(config: ModelConfig, batch: int, context: int, args) -> dict:
    """One layer's dense decoding attention at `context`: ours (XLA) against the Pallas GPU decode kernel."""
    row = dict(batch=batch, context=context)
    dtype = config.compute_jnp_dtype
    q_key, k_key, v_key = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(q_key, (batch, 1, config.num_heads, config.head_dim), dtype)
    shape = (batch, context, config.num_kv_heads, config.head_dim)
    if 2 * math.prod(shape) * dtype.itemsize > args.memory_fraction * (device_memory() or float("inf")):
        return dict(row, status="oom")
    k, v = jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype)
    cache = KVCache(k, v, jnp.arange(context, dtype=jnp.int32), CacheLayout.for_pattern(Dense(), context))
    position = jnp.int32(context - 1)
    ours = jax.jit(lambda q, cache, position: decode_attention(q, cache, position, Dense()))
    row["xla_ms"] = timing.median_ms(lambda: ours(q, cache, position), jax.block_until_ready, args.runs, args.warmup)
    if jax.default_backend() != "gpu":
        return dict(row, status="ok", pallas_detail="the Pallas decode kernel is GPU only")
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    pallas = jax.jit(lambda q, k, v: pallas_decode.gqa(q, k, v, kv_seq_len=jnp.full((batch,), context)))
    got, expected = pallas(q[:, 0], k, v), ours(q, cache, position)[:, 0]
    row["max_abs_difference"] = float(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32)).max())
    row["pallas_ms"] = timing.median_ms(lambda: pallas(q[:, 0], k, v), jax.block_until_ready, args.runs, args.warmup)
    return dict(row, status="ok", xla_over_pallas=row["xla_ms"] / row["pallas_ms"])


def format_row(row: dict) -> str:
    head = f"{row['pattern']:28} {row['impl']:>6} {row['batch']:>5} {row['context']:>9}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}: {row.get('detail', '')}"
    return (f"{head} {row['ms_per_step']:>10.3f} {row['tokens_per_s']:>12.0f} {row['cache_bytes'] / 2**20:>12.1f} "
            f"{max(row['cache_slots']):>9} {row['floor_ms']:>9.3f} {row['x_floor']:>8.1f}")


def format_trace(trace: dict) -> str:
    if trace["status"] != "ok":
        return f"    trace: {trace['status']}"
    top = ", ".join(f"{kernel['name'][:40]} x{kernel['count']} {kernel['total_ms']:.3f} ms"
                    for kernel in trace["top"][:3])
    return (f"    trace per step: {trace['kernels_per_step']:.0f} kernels, {trace['kernel_ms_per_step']:.3f} ms in "
            f"kernels, {trace['busy_ms_per_step']:.3f} ms busy, {trace['gap_ms_per_step']:.3f} ms of gaps; top: {top}")


def format_peer_row(row: dict) -> str:
    head = f"batch {row['batch']:>3} context {row['context']:>8}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    if "pallas_ms" not in row:
        return f"{head}  xla {row['xla_ms']:.3f} ms  ({row['pallas_detail']})"
    return (f"{head}  xla {row['xla_ms']:.3f} ms  pallas {row['pallas_ms']:.3f} ms  xla / pallas "
            f"{row['xla_over_pallas']:.2f}  (max |difference| {row['max_abs_difference']:.1e})")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=base.PRESETS, help="model shape (configs/base.py)")
    parser.add_argument("--patterns", default=";".join(DEFAULT_PATTERNS), help="';'-separated pattern specs")
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--impls", default="xla",
                        help=f"comma-separated decoding steps to time, each in {fused_decode.STEPS}")
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded per timed call")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-fraction", type=float, default=0.8)
    parser.add_argument("--attention-peer", action="store_true", help="dense attention alone vs the Pallas kernel")
    parser.add_argument("--trace", action="store_true",
                        help="trace one more call of each case: kernel time against gaps per step (GPU)")
    parser.add_argument("--out", default="reports/decode_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model and contexts, for tests on CPU")
    parser.add_argument("--interpret", action="store_true", help="run the Triton kernels in Pallas interpret mode")
    args = parser.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--contexts and --batches must be comma-separated integers, got {args.contexts!r} and "
                     f"{args.batches!r}")
    if min(contexts + batches) < 1 or args.steps < 1:
        parser.error("--contexts, --batches and --steps must be positive")
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if not impls or any(impl not in fused_decode.STEPS for impl in impls):
        parser.error(f"--impls must be a comma-separated list of {', '.join(fused_decode.STEPS)}; got "
                     f"{args.impls!r}")
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    for pattern in patterns:
        try:
            AttentionConfig(pattern=pattern, schedule=(), impl="auto", interpret=False)
        except ValueError as error:
            parser.error(f"--patterns: {error}".splitlines()[0])
    return args, patterns, impls, contexts, batches


def main(argv=None) -> dict:
    args, patterns, impls, contexts, batches = parse_args(argv)
    config = model_config(args.preset, args.smoke)
    device = jax.devices()[0]
    ceilings = bench.measure_ceilings(config.compute_dtype, dict(matmul=256, copy_bytes=2**20) if args.smoke
                                      else dict(matmul=8192, copy_bytes=2**30))
    report = dict(meta=dict(device=getattr(device, "device_kind", str(device)), backend=jax.default_backend(),
                            jax=jax.__version__, preset="smoke" if args.smoke else args.preset,
                            model=dataclasses.asdict(config), steps=args.steps, runs=args.runs,
                            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            copy_bytes_per_s=ceilings["copy_bytes_per_s"]),
                  results=[], ratios=[], attention_peer=[])
    print(f"# {report['meta']['device']} jax {jax.__version__}  {report['meta']['preset']}: {config.num_layers} "
          f"layers, d_model {config.d_model}, {config.num_heads} heads / {config.num_kv_heads} kv, {args.steps} "
          f"steps per call; copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    print(f"{'pattern':28} {'impl':>6} {'batch':>5} {'context':>9} {'ms/step':>10} {'tokens/s':>12} {'cache MiB':>12} "
          f"{'slots':>9} {'floor ms':>9} {'x floor':>8}", flush=True)
    for pattern in patterns:
        for batch in batches:
            for context in contexts:
                for impl in impls:
                    report["results"].append(run_case(config, pattern, impl, batch, context, args,
                                                      ceilings["copy_bytes_per_s"]))
                    print(format_row(report["results"][-1]), flush=True)
                    if "trace" in report["results"][-1]:
                        print(format_trace(report["results"][-1]["trace"]), flush=True)
                    report["ratios"] = dense_ratios(report["results"])
                    atomic_io.write_json(args.out, report)
    if report["ratios"]:
        print("\n# dense's time per step over each pattern's: measured, and with both at their floors")
        for ratio in report["ratios"]:
            print(f"{ratio['pattern']:28} {ratio['impl']:>6} {ratio['batch']:>5} {ratio['context']:>9}  measured "
                  f"{ratio['measured']:6.2f}x (dense by {ratio['dense_impl']})  at the floors "
                  f"{ratio['at_floors']:6.2f}x", flush=True)
    if args.attention_peer:
        print("\n# one layer's dense decoding attention: XLA decode_attention vs Pallas decode_attention.gqa")
        for batch in batches:
            for context in contexts:
                row = attention_peer(config, batch, context, args)
                report["attention_peer"].append(row)
                print(format_peer_row(row), flush=True)
                atomic_io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
