"""Benchmark of the sparse attention kernels against their peers: `python -m lm_experiment.bench`.

For every sequence length, pattern, implementation and mode (forward, forward+backward) it prints a table
row and rewrites a JSON report (atomically, after every case, so an interrupted run keeps what it has).

  ms           time per call, `timing.median_ms`: rounds of back-to-back calls with one wait each, the
               median over rounds, at most `runs` timed calls after `warmup` calls (the same rule for the
               FlexAttention peer)
  tflops       counted on the active (unmasked) area: forward 4*B*H*D*active_pairs, forward+backward 3.5x
               that (the convention of ../shared/research/anchors.md), so every implementation of one case
               is credited the same work and TFLOP/s ratios are time ratios
  active       active pairs / causal pairs
  memory_bytes compiled memory analysis: arguments + outputs + temporaries of the jitted call
  floor_ms     the larger of the case's counted FLOPs over the measured matmul rate and its bytes moved over
               the measured copy rate (`measure_ceilings`, in the same run); x_floor = ms / floor_ms.
               Bytes moved: q, k, v read and out written (forward); forward+backward adds q, k, v, out and
               d_out read again and dq, dk, dv written.

Inputs are not rotated between timed calls: every kernel here re-reads each key/value tile from L2 many
times within one call (once per query tile that attends it), so the little cross-call reuse a fixed input
allows does not change the picture, and rotating would add allocation noise at 128k.

Peers: cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) for dense causal and window(W)
(`local_window_size=(W-1, 0)`); PyTorch FlexAttention (`flex`, every pattern, given our layout as its block
mask and the pattern's mask as its mask_mod; it runs in a subprocess before JAX starts, see `flex_peer.py`,
and is skipped with the reason where torch or a CUDA device is missing); JAX's Pallas Triton attention
(`ops.gpu.attention.mha`, dense causal); JAX's Pallas Mosaic GPU attention (`ops.gpu.attention_mgpu`:
dense causal, forward only as it has no causal backward, sm90+, float16 as it fails inside on bfloat16);
this package's `xla` and `reference` paths where they fit in memory ("oom" otherwise).

Ratios: our fastest implementation's time over each peer's median. Against a peer that runs in this process
(cuDNN), each case is also timed again, as soon as both have run, with both functions in `--paired-rounds`
interleaved rounds (`timing.interleaved_ms`), and the ratio is quoted as the median of the round-by-round
ratios with a 95 % interval (`timing.ratio_interval`, `vs_cudnn_paired`): drift during the run falls on both
alike. The interval covers this process's rounds only; other machines and runs of the same command have
differed by more. The report's ratios and pairs are rewritten with every case, so a run stopped early keeps
those of the cases it finished.

A `topk(B, K)` case attends a fixed choice of blocks (`bench_choice.fixed_choice`), the same indices for
every implementation of this package (`attention.IMPLEMENTATIONS`) and for FlexAttention's block mask;
its work counts the chosen pairs too. Impl `selection` times the choice itself, `select_blocks` on the same
q and k, forward only (the choice is not differentiated), with a floor of reading q and k once. With
block(B) in the same run, `selection_costs` quotes the attention's time per attended pair against block(B)'s
and the selection's time against the attention's forward.
`--smoke` runs tiny shapes on CPU with the Pallas kernels in interpret mode (for tests). On a GPU or TPU
host each Pallas kernel runs only on its own backend (`mosaic_tpu` is TPU only, `triton` GPU only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp

from lm_experiment import bench_choice, flex_peer, timing
from sparse_attention import atomic_io, reference, xla
from sparse_attention.attention import IMPLEMENTATIONS
from sparse_attention.kernels import mosaic_gpu, mosaic_tpu, triton
from sparse_attention.patterns import Block, Dense, Pattern, Window, as_pattern
from sparse_attention.selection import select_blocks

DEFAULT_SEQ_LENS = (4096, 16384, 32768, 65536, 131072)
DEFAULT_PATTERNS = ("dense", "block(512)", "window(1024)", "repaired(512, 64, bridge)", "repaired(512, 64, prefix)",
                    "block(512, 256)", "random_blocks(512, 3, 0)", "sinks(64) | window(1024)")
IMPLS = ("mosaic_gpu", "triton", "mosaic_tpu", "cudnn", "flex", "mosaic_mha", "pallas_mha", "xla", "reference",
         "selection")
# This package's implementations, against which the peers' ratios are quoted.
OWN_IMPLS = ("mosaic_gpu", "triton", "mosaic_tpu")
RATIO_PEERS = ("flex", "cudnn")
# Peers that run in this process: each case's ratio to them is measured again with both in interleaved rounds.
PAIRED_PEERS = ("cudnn",)
# The backend each Pallas kernel compiles for; on CPU they run in interpret mode.
KERNEL_BACKENDS = {"mosaic_gpu": "gpu", "triton": "gpu", "mosaic_tpu": "tpu"}
# JAX's Mosaic GPU attention: its own benchmark's tiles (block_q 64, block_kv 128, two stages).
MOSAIC_MHA_TILES = dict(block_q=64, block_kv=128, max_concurrent_steps=2)
MODES = ("fwd", "fwd_bwd")
FWD_BWD_FLOP_FACTOR = 3.5
SMOKE = dict(seq_lens=(64, 100), batch=1, heads=2, kv_heads=1, head_dim=32, dtype="float32", runs=2, warmup=1)
# Sizes of the ceiling measurements: a [n, n] @ [n, n] matmul and an elementwise pass over a buffer.
CEILING_SIZES = dict(matmul=8192, copy_bytes=2**30)
SMOKE_CEILING_SIZES = dict(matmul=256, copy_bytes=2**22)
FLEX_TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str


class Unsupported(Exception):
    """The implementation does not cover this case (recorded as such, not as an error)."""


def attention_function(impl: str, pattern: Pattern, shape: Shape, mode: str, interpret: bool, block_sizes,
                       selected=None):
    """f(q, k, v) -> out for one implementation, or raise Unsupported. `selected`: a topk case's choice."""
    scale = 1.0 / math.sqrt(shape.head_dim)
    topk = pattern.block_selection()
    if impl == "selection":
        if topk is None or mode != "fwd":
            raise Unsupported("times a topk pattern's block choice, forward only")
        return lambda q, k, v: select_blocks(q, k, topk.size, topk.count)
    if topk is not None and impl not in IMPLEMENTATIONS:
        raise Unsupported("takes no chosen blocks (this package's implementations do)")
    if impl in KERNEL_BACKENDS and not interpret and jax.default_backend() != KERNEL_BACKENDS[impl]:
        raise Unsupported(f"{KERNEL_BACKENDS[impl].upper()} only")
    if impl == "triton":
        return lambda q, k, v: triton.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                                block_sizes=block_sizes, selected=selected)
    if impl == "mosaic_gpu":
        reason = mosaic_gpu.unsupported_reason(*(jax.ShapeDtypeStruct(s, shape.dtype) for s in _shapes(shape)),
                                               pattern, interpret=interpret)
        if reason is not None:
            raise Unsupported(reason)
        return lambda q, k, v: mosaic_gpu.attention(q, k, v, pattern, scale=scale, interpret=interpret,
                                                    selected=selected)
    if impl == "mosaic_tpu":
        return lambda q, k, v: mosaic_tpu.attention(q, k, v, pattern, scale=scale, interpret=interpret)
    if impl == "xla":
        return lambda q, k, v: xla.attention(q, k, v, pattern, scale=scale, selected=selected)
    if impl == "reference":
        return lambda q, k, v: reference.attention(q, k, v, pattern, scale=scale, selected=selected)
    if jax.default_backend() != "gpu":
        raise Unsupported("GPU only")
    if impl == "cudnn":
        if isinstance(pattern, Dense):
            window = None
        elif isinstance(pattern, Window):
            window = (pattern.size - 1, 0)
        else:
            raise Unsupported("cuDNN covers dense and window only")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
        )
    if impl == "pallas_mha":
        if not isinstance(pattern, Dense):
            raise Unsupported("JAX's Pallas mha covers dense causal only")
        if shape.seq_len % 128:
            raise Unsupported("JAX's Pallas mha needs seq_len divisible by its 128 blocks")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as pallas_mha
        group = shape.heads // shape.kv_heads

        def run(q, k, v):
            k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
            return pallas_mha.mha(q, k, v, segment_ids=None, sm_scale=scale, causal=True)

        return run
    if impl == "mosaic_mha":
        return _mosaic_mha(pattern, shape, mode)
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")


def _mosaic_mha(pattern: Pattern, shape: Shape, mode: str):
    if mode != "fwd":
        raise Unsupported("JAX's Mosaic GPU attention has no causal backward")
    if not isinstance(pattern, Dense):
        raise Unsupported("JAX's Mosaic GPU attention covers dense causal only")
    if shape.dtype != "float16":
        # It accepts bfloat16 but fails inside (a float16 staging buffer): measured on jax 0.11.2.
        raise Unsupported("JAX's Mosaic GPU attention runs float16 only")
    if shape.seq_len % 128:
        raise Unsupported("JAX's Mosaic GPU attention needs seq_len divisible by its 128-key tiles")
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(causal=True, **MOSAIC_MHA_TILES)
    # It has no scale argument (its logits are the raw q·k); scaling q first would add an elementwise pass
    # to its time, and the scale does not change its work, so it is timed unscaled.
    return lambda q, k, v: attention_mgpu.attention(q, k, v, config)


def _shapes(shape: Shape):
    """(q, k, v) shapes: [batch, seq, heads, head_dim], k and v with kv_heads."""
    kv_shape = (shape.batch, shape.seq_len, shape.kv_heads, shape.head_dim)
    return (shape.batch, shape.seq_len, shape.heads, shape.head_dim), kv_shape, kv_shape


def timed_function(forward, mode: str):
    """The jitted call the benchmark times: forward(q, k, v), or for fwd_bwd (q, k, v, d_out) -> its vjp."""
    if mode == "fwd":
        return jax.jit(forward)

    def forward_backward(q, k, v, d_out):
        _, vjp = jax.vjp(forward, q, k, v)
        return vjp(d_out)

    return jax.jit(forward_backward)


def compiled_memory_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def device_memory_limit() -> int | None:
    """Bytes XLA may use on the first device (JAX's memory fraction of it), or None where unknown."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def measure(compiled, args, runs: int, warmup: int) -> float:
    """Milliseconds per call of compiled(*args) (`timing.median_ms`)."""
    return timing.median_ms(lambda: compiled(*args), jax.block_until_ready, runs, warmup)


def measure_ceilings(dtype: str, sizes: dict) -> dict:
    """The rates the floor divides by, measured now on this device: FLOP/s of a [n, n] @ [n, n] matmul and
    bytes/s of an elementwise pass over a buffer (bytes read plus written)."""
    n = sizes["matmul"]
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul_ms = measure(jax.jit(lambda x, y: x @ y).lower(a, a).compile(), (a, a), runs=50, warmup=3)
    del a
    buffer = jnp.ones(sizes["copy_bytes"] // jnp.dtype(dtype).itemsize, dtype)
    copy_ms = measure(jax.jit(lambda x: x * 2).lower(buffer).compile(), (buffer,), runs=50, warmup=3)
    return dict(matmul_flops_per_s=2 * n**3 / (matmul_ms * 1e-3), copy_bytes_per_s=2 * buffer.nbytes / (copy_ms * 1e-3),
                matmul_size=n, copy_bytes=buffer.nbytes)


def case_work(pattern: Pattern, mode: str, shape: Shape, active_pairs: float | None = None) -> tuple[float, float, int]:
    """(active pairs per head, counted FLOPs, bytes moved) of one case: what every implementation is credited.
    `active_pairs` defaults to the pattern's static count; a topk case passes `bench_choice.attended_pairs`."""
    if active_pairs is None:
        active_pairs = pattern.count_active(shape.seq_len)
    flops = 4 * shape.batch * shape.heads * shape.head_dim * active_pairs
    flops *= FWD_BWD_FLOP_FACTOR if mode == "fwd_bwd" else 1
    # In units of one head's [batch, seq, head_dim] tensor: forward q + out (heads) and k + v (kv heads);
    # the backward reads q, out, d_out, k, v and writes dq, dk, dv.
    heads_moved = 2 * shape.heads + 2 * shape.kv_heads
    if mode == "fwd_bwd":
        heads_moved += 4 * shape.heads + 4 * shape.kv_heads
    head_bytes = shape.batch * shape.seq_len * shape.head_dim * jnp.dtype(shape.dtype).itemsize
    return active_pairs, flops, heads_moved * head_bytes


def selection_work(pattern: Pattern, shape: Shape) -> tuple[float, int]:
    """(counted FLOPs, bytes moved) of a topk pattern's block choice: the block scores' dot products, and q
    and k read once (the means and scores are small beside them)."""
    blocks = -(-shape.seq_len // pattern.block_selection().size)
    flops = 2 * shape.batch * shape.kv_heads * shape.head_dim * blocks * blocks
    head_bytes = shape.batch * shape.seq_len * shape.head_dim * jnp.dtype(shape.dtype).itemsize
    return flops, (shape.heads + shape.kv_heads) * head_bytes


def floor_ms(flops: float, bytes_moved: int, ceilings: dict) -> float:
    """The case's lower bound in ms: whichever of its FLOPs and its bytes takes longer at the measured rates."""
    return 1e3 * max(flops / ceilings["matmul_flops_per_s"], bytes_moved / ceilings["copy_bytes_per_s"])


def complete_row(row: dict, pattern: Pattern, shape: Shape, ceilings: dict, active_pairs: float | None = None) -> dict:
    """Adds the counted work to a timed row: active_pairs (per head), active_fraction, tflops, floor_ms and
    x_floor (a selection row's work is the choice's, `selection_work`)."""
    active_pairs, flops, bytes_moved = case_work(pattern, row["mode"], shape, active_pairs)
    if row["impl"] == "selection" and pattern.block_selection() is not None:
        flops, bytes_moved = selection_work(pattern, shape)
    floor = floor_ms(flops, bytes_moved, ceilings)
    ok = row["status"] == "ok"
    causal_pairs = shape.seq_len * (shape.seq_len + 1) / 2
    return row | dict(active_pairs=active_pairs, active_fraction=active_pairs / causal_pairs,
                      tflops=flops / (row["ms"] * 1e-3) / 1e12 if ok else None, floor_ms=floor,
                      x_floor=row["ms"] / floor if ok else None)


def run_case(impl: str, pattern: Pattern, mode: str, shape: Shape, inputs, *, runs: int, warmup: int,
             interpret: bool, block_sizes, selected=None) -> dict:
    """One timed row: status "ok" with ms, memory_bytes and runs, or "oom" / "unsupported: ..." / "error: ..."."""
    row = dict(seq_len=shape.seq_len, pattern=pattern.spec, impl=impl, mode=mode,
               ms=None, memory_bytes=None, runs=None, status="ok")
    try:
        compiled, args = compiled_case(impl, pattern, mode, shape, inputs, interpret, block_sizes, selected)
        row["memory_bytes"] = compiled_memory_bytes(compiled)
        limit = device_memory_limit()
        if limit is not None and row["memory_bytes"] is not None and row["memory_bytes"] > limit:
            row["status"] = "oom"
            return row
        row.update(ms=measure(compiled, args, runs, warmup), runs=runs)
    except Unsupported as reason:
        row["status"] = f"unsupported: {reason}"
    except Exception as error:  # a peer failing must not end the whole benchmark
        row["status"] = "oom" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:300]}"
    return row


def compiled_case(impl: str, pattern: Pattern, mode: str, shape: Shape, inputs, interpret: bool, block_sizes,
                  selected=None):
    """(the compiled timed function of one case, its arguments)."""
    forward = attention_function(impl, pattern, shape, mode, interpret, block_sizes, selected)
    args = inputs if mode == "fwd_bwd" else inputs[:3]
    return timed_function(forward, mode).lower(*args).compile(), args


def _fastest_own(rows: list[dict]) -> dict[tuple, tuple[str, dict]]:
    """(seq_len, pattern, mode) -> (the fastest of OWN_IMPLS that ran, {impl: ms} of every row that ran), for
    the cases where one of ours ran."""
    cases: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] == "ok":
            cases.setdefault((row["seq_len"], row["pattern"], row["mode"]), {})[row["impl"]] = row["ms"]
    fastest = {}
    for case, times in cases.items():
        own = {impl: ms for impl, ms in times.items() if impl in OWN_IMPLS}
        if own:
            fastest[case] = (min(own, key=own.get), times)
    return fastest


def paired_ratios(rows: list[dict], call_for, rounds: int) -> list[dict]:
    """For each case of `rows` where our fastest implementation (OWN_IMPLS) and a PAIRED_PEERS peer both ran:
    call_for(impl, pattern spec, mode) -> a function of no arguments for each, timed in `rounds` interleaved
    rounds; the median of our time over the peer's, round by round, and its 95 % interval (`ratio`, `low`,
    `high`)."""
    paired = []
    for (seq_len, pattern, mode), (best, times) in _fastest_own(rows).items():
        for peer in (peer for peer in PAIRED_PEERS if peer in times):
            samples = timing.interleaved_ms({best: call_for(best, pattern, mode), peer: call_for(peer, pattern, mode)},
                                            jax.block_until_ready, rounds, warmup=2)
            ratio, low, high = timing.ratio_interval(samples[best], samples[peer])
            paired.append(dict(seq_len=seq_len, pattern=pattern, mode=mode, best=best, peer=peer,
                               rounds=len(samples[best]), ratio=ratio, low=low, high=high))
    return paired


def flex_rows(seq_lens, patterns, modes, args, kv_heads) -> list[dict]:
    """FlexAttention's timed rows, from `flex_peer` in a subprocess (call before JAX takes the GPU)."""
    spec = dict(seq_lens=list(seq_lens), patterns=[p.spec for p in patterns], modes=list(modes),
                batch=args.batch, heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                runs=args.runs, warmup=args.warmup, seed=0)
    if importlib.util.find_spec("torch") is None:
        return flex_peer.rows_saying(spec, "unsupported: torch is not installed (it is not a requirement)")
    try:
        done = subprocess.run([sys.executable, "-m", "lm_experiment.flex_peer", json.dumps(spec)], check=False,
                              stdout=subprocess.PIPE, text=True, timeout=FLEX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return flex_peer.rows_saying(spec, f"error: the FlexAttention process ran past {FLEX_TIMEOUT_S} s")
    if done.returncode != 0:
        return flex_peer.rows_saying(spec, f"error: the FlexAttention process exited with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_ratios(rows: list[dict], paired: list[dict] = ()) -> list[dict]:
    """For each case: the fastest of OWN_IMPLS and its time over each RATIO_PEERS peer's (below 1: ours is
    faster), and from `paired_ratios` the interleaved ratio and its interval ([ratio, low, high]) where
    measured."""
    ratios = []
    for (seq_len, pattern, mode), (best, times) in _fastest_own(rows).items():
        ratio = dict(seq_len=seq_len, pattern=pattern, mode=mode, best=best, best_ms=times[best])
        ratio |= {f"vs_{peer}": times[best] / times[peer] for peer in RATIO_PEERS if peer in times}
        for pair in paired:
            if (pair["seq_len"], pair["pattern"], pair["mode"], pair["best"]) == (seq_len, pattern, mode, best):
                ratio[f"vs_{pair['peer']}_paired"] = [pair["ratio"], pair["low"], pair["high"]]
        ratios.append(ratio)
    return ratios


def selection_costs(rows: list[dict]) -> list[dict]:
    """For each topk(B, K) case that ran with block(B) beside it: our fastest implementation's time per
    attended pair over block(B)'s (`pair_time_vs_block`), and, forward, the selection's time over that
    attention's (`selection_share`)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] == "ok" and row["impl"] in OWN_IMPLS + ("selection",):
            key = (row["seq_len"], row["pattern"], row["mode"], row["impl"] == "selection")
            if key not in best or row["ms"] < best[key]["ms"]:
                best[key] = row
    costs = []
    for (seq_len, spec, mode, is_selection), row in best.items():
        topk = as_pattern(spec).block_selection()
        if is_selection or topk is None:
            continue
        block = best.get((seq_len, Block(topk.size).spec, mode, False))
        if block is None:
            continue
        cost = dict(seq_len=seq_len, pattern=spec, mode=mode, impl=row["impl"], ms=row["ms"],
                    block_impl=block["impl"], block_ms=block["ms"],
                    pair_time_vs_block=(row["ms"] / row["active_pairs"]) / (block["ms"] / block["active_pairs"]))
        selection = best.get((seq_len, spec, "fwd", True))
        if mode == "fwd" and selection is not None:
            cost |= dict(selection_ms=selection["ms"], selection_share=selection["ms"] / row["ms"])
        costs.append(cost)
    return costs


def make_inputs(shape: Shape, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(shape.dtype)
    q_shape, kv_shape, _ = _shapes(shape)
    return (jax.random.normal(keys[0], q_shape, dtype), jax.random.normal(keys[1], kv_shape, dtype),
            jax.random.normal(keys[2], kv_shape, dtype), jax.random.normal(keys[3], q_shape, dtype))


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        cell = row["status"] if row["status"] == "oom" else row["status"].split(":")[0]
        return f"{row['seq_len']:>7} {row['pattern']:<28} {row['mode']:<8} {row['impl']:<11} {cell}"
    memory = "" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**30:8.2f} GiB"
    return (f"{row['seq_len']:>7} {row['pattern']:<28} {row['mode']:<8} {row['impl']:<11} "
            f"{row['ms']:10.3f} ms {row['tflops']:8.1f} TFLOP/s {row['x_floor']:6.2f}x floor  "
            f"active {row['active_fraction']:.4f} {memory}")


def format_cost(cost: dict) -> str:
    selection = (f"  selection {cost['selection_ms']:.3f} ms = {cost['selection_share']:.3f} of the attention"
                 if "selection_ms" in cost else "")
    return (f"{cost['seq_len']:>7} {cost['pattern']:<28} {cost['mode']:<8} {cost['impl']:<11} {cost['ms']:10.3f} ms"
            f"  per pair {cost['pair_time_vs_block']:.3f}x block's ({cost['block_impl']}){selection}")


def format_ratio(ratio: dict) -> str:
    peers = "  ".join(f"/ {peer} {ratio[f'vs_{peer}']:.2f}" for peer in RATIO_PEERS if f"vs_{peer}" in ratio)
    for peer in PAIRED_PEERS:
        if f"vs_{peer}_paired" in ratio:
            median, low, high = ratio[f"vs_{peer}_paired"]
            peers += f"  (interleaved {median:.3f} [{low:.3f}, {high:.3f}])"
    return (f"{ratio['seq_len']:>7} {ratio['pattern']:<28} {ratio['mode']:<8} {ratio['best']:<11} "
            f"{ratio['best_ms']:10.3f} ms  {peers or 'no peer'}")


def _parse_list(text: str, separator: str = ",") -> list[str]:
    return [item.strip() for item in text.split(separator) if item.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", default=None,
                        help=f"comma-separated lengths (default {','.join(map(str, DEFAULT_SEQ_LENS))})")
    parser.add_argument("--patterns", default=";".join(DEFAULT_PATTERNS), help="';'-separated pattern specs")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd_bwd or both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--paired-rounds", type=int, default=30,
                        help="interleaved rounds of each case against an in-process peer (0: none)")
    parser.add_argument("--block-sizes", default=None,
                        help="JSON object of triton.BlockSizes fields overriding the defaults")
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU (Pallas in interpret mode) to check the report's shape")
    args = parser.parse_args(argv)
    if args.seq is None:
        args.seq = ",".join(map(str, SMOKE["seq_lens"] if args.smoke else DEFAULT_SEQ_LENS))
    if args.smoke:
        for key in ("batch", "heads", "kv_heads", "head_dim", "dtype", "runs", "warmup"):
            setattr(args, key, SMOKE[key])
    impls = _parse_list(args.impls)
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown {impl!r}; valid: {', '.join(IMPLS)}")
    modes = _parse_list(args.modes)
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown {mode!r}; valid: {', '.join(MODES)}")
    try:
        seq_lens = [int(s) for s in _parse_list(args.seq)]
        patterns = [as_pattern(p) for p in _parse_list(args.patterns, ";")]
    except ValueError as error:
        parser.error(str(error))
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error(f"--kv-heads={kv_heads} must divide --heads={args.heads}")
    block_sizes = None
    if args.block_sizes:
        try:
            block_sizes = triton.BlockSizes(**json.loads(args.block_sizes))
        except (TypeError, ValueError) as error:
            parser.error(f"--block-sizes: {error}")
    return args, seq_lens, patterns, impls, modes, kv_heads, block_sizes


def main(argv=None) -> dict:
    args, seq_lens, patterns, impls, modes, kv_heads, block_sizes = parse_args(argv)
    # FlexAttention first, in its own process, before this one's JAX claims the GPU's memory.
    peer_rows = flex_rows(seq_lens, patterns, modes, args, kv_heads) if "flex" in impls else []
    interpret = jax.default_backend() == "cpu"
    device = jax.devices()[0]
    ceilings = measure_ceilings(args.dtype, SMOKE_CEILING_SIZES if args.smoke else CEILING_SIZES)
    report = dict(
        meta=dict(device=getattr(device, "device_kind", str(device)), backend=jax.default_backend(),
                  jax=jax.__version__, batch=args.batch, heads=args.heads, kv_heads=kv_heads,
                  head_dim=args.head_dim, dtype=args.dtype, runs=args.runs, warmup=args.warmup,
                  paired_rounds=args.paired_rounds,
                  interpret=interpret, block_sizes=None if block_sizes is None else dataclasses.asdict(block_sizes),
                  ceilings=ceilings, torch=_torch_version() if "flex" in impls else None,
                  started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        results=[],
        paired=[],
    )
    print(f"# {report['meta']['device']} jax {jax.__version__}  B={args.batch} H={args.heads} "
          f"KV={kv_heads} D={args.head_dim} {args.dtype}  matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    # The last implementation of each case that a pairing needs: once it has run, the case is paired at once,
    # so that a run stopped by a time limit keeps the cases paired so far.
    pairing = [impl for impl in impls if impl in OWN_IMPLS or impl in PAIRED_PEERS]
    pair_after = pairing[-1] if args.paired_rounds > 0 and pairing else None
    for seq_len in seq_lens:
        shape = Shape(args.batch, seq_len, args.heads, kv_heads, args.head_dim, args.dtype)
        inputs = make_inputs(shape)
        choices = {pattern.spec: bench_choice.fixed_choice(pattern, seq_len, args.batch, kv_heads)
                   for pattern in patterns}
        # Counted once per case: a topk case's count walks its whole choice in Python.
        pairs = {pattern.spec: bench_choice.attended_pairs(pattern, seq_len, choices[pattern.spec])
                 for pattern in patterns}
        by_spec = {pattern.spec: pattern for pattern in patterns}

        def call_for(impl, spec, mode):
            chosen = choices[spec]
            compiled, case_args = compiled_case(impl, by_spec[spec], mode, shape, inputs, interpret, block_sizes,
                                                None if chosen is None else jnp.asarray(chosen))
            return functools.partial(compiled, *case_args)

        # Implementations in the outer loop: the kernels are timed before the memory-hungry dense paths
        # (xla, reference) of the same length run, so their allocations cannot disturb the short kernels.
        for impl in impls:
            for pattern in patterns:
                for mode in modes:
                    if impl == "flex":
                        row = next(r for r in peer_rows if (r["seq_len"], r["pattern"], r["mode"])
                                   == (seq_len, pattern.spec, mode))
                    else:
                        chosen = choices[pattern.spec]
                        row = run_case(impl, pattern, mode, shape, inputs, runs=args.runs, warmup=args.warmup,
                                       interpret=interpret, block_sizes=block_sizes,
                                       selected=None if chosen is None else jnp.asarray(chosen))
                    report["results"].append(complete_row(row, pattern, shape, ceilings, pairs[pattern.spec]))
                    print(format_row(report["results"][-1]), flush=True)
                    if impl == pair_after:
                        case = (seq_len, pattern.spec, mode)
                        case_rows = [r for r in report["results"] if (r["seq_len"], r["pattern"], r["mode"]) == case]
                        report["paired"] += paired_ratios(case_rows, call_for, args.paired_rounds)
                    report["ratios"] = peer_ratios(report["results"], report["paired"])
                    atomic_io.write_json(args.out, report)
        del inputs
    report["selection_costs"] = selection_costs(report["results"])
    atomic_io.write_json(args.out, report)
    print("\n# summary", flush=True)
    order = {impl: index for index, impl in enumerate(impls)}
    for row in sorted(report["results"], key=lambda r: (r["seq_len"], r["pattern"], r["mode"], order[r["impl"]])):
        print(format_row(row))
    print("\n# our fastest implementation's time over each peer's (below 1: ours is faster)")
    for ratio in report["ratios"]:
        print(format_ratio(ratio))
    if report["selection_costs"]:
        print("\n# topk: attention time per attended pair against block(B)'s, and the selection's cost")
        for cost in report["selection_costs"]:
            print(format_cost(cost))
    return report


def _torch_version() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    from importlib.metadata import version

    return version("torch")


if __name__ == "__main__":
    main(sys.argv[1:])
