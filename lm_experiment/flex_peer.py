"""PyTorch FlexAttention as a benchmark peer, in a process of its own.

    python -m lm_experiment.flex_peer SPEC_JSON      # prints one JSON list of rows on stdout

`bench.py` starts it before JAX touches the GPU, so the two frameworks never share a memory pool. SPEC_JSON
holds seq_lens, patterns (specs), modes, batch, heads, kv_heads, head_dim, dtype, runs, warmup, seed.

Each case's block mask is our layout at 128 x 128 tiles (`block_layout`: each query tile's full and partial
key tiles) given to `BlockMask.from_kv_blocks`, with the pattern's exact mask as mask_mod for the partial
tiles (`Pattern.mask` evaluated on torch tensors, see `torch_arrays.py`). A topk case's chosen blocks
(`bench_choice.fixed_choice`, the same indices our kernels are given) are added as full tiles, per query
head. So FlexAttention attends the pairs our kernels attend and skips the tiles they skip.
(`create_block_mask` compiled would evaluate the mask on every pair itself; on PyTorch 2.14's CPU backend it
got random_blocks' hashed block choice wrong, and eager it materializes [seq, seq].) The mask is built once
per case, as our layouts are, and not timed. Before timing, each pattern's attended key sets are checked at
CHECK_LEN tokens or more (`check_error`); a peer that attends other pairs would make the comparison
meaningless, so its rows then say so.

Timing is `timing.median_ms`, as for the JAX implementations, with `torch.cuda.synchronize` as the wait.
fwd_bwd is the forward plus `torch.autograd.grad` of q, k and v given d_out, as the JAX side's vjp.
memory_bytes is the peak of torch's allocator during one call, inputs included.

Rows carry bench's keys (seq_len, pattern, impl "flex", mode, ms, memory_bytes, runs, status); bench adds
the rest. Without torch or a CUDA device every row says why ("unsupported: ...").
"""

from __future__ import annotations

import json
import sys

import numpy as np

from lm_experiment.bench_choice import CHOICE_SEED, choice_mask, fixed_choice
from lm_experiment.timing import median_ms
from sparse_attention.layout import block_layout
from sparse_attention.patterns import as_pattern

FLEX_TILE = 128
CHECK_LEN = 1000  # not a multiple of the tile, so the last tile's padding is checked too
CHECK_TOLERANCE = 1e-4  # a key more or less moves a log-count by >= 1 / (check length) >= 2.4e-4


def _row(seq_len: int, pattern: str, mode: str, status: str = "ok", **timing) -> dict:
    return dict(seq_len=seq_len, pattern=pattern, impl="flex", mode=mode, ms=None, memory_bytes=None, runs=None,
                status=status) | timing


def rows_saying(spec: dict, status: str) -> list[dict]:
    """One untimed row per case of `spec`, each with `status` ("unsupported: ..." or "error: ...")."""
    return [_row(seq_len, pattern, mode, status)
            for seq_len in spec["seq_lens"] for pattern in spec["patterns"] for mode in spec["modes"]]


def _peak_bytes(torch, call) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def tile_lists(pattern, seq_len: int, chosen: np.ndarray | None = None, heads: int = 1):
    """FlexAttention's kv block lists of our layout at FLEX_TILE tiles, with a topk case's chosen blocks (int32
    [batch, kv_heads, query blocks, K], `bench_choice.fixed_choice`) as full tiles of every query head of
    their KV group: (num_partial, partial, num_full, full), int32 [batch, heads, query tiles(, key tiles)];
    batch and heads are 1 without a choice. A row is as wide as the keys: FlexAttention transposes the
    lists through a [rows, width] table."""
    layout = block_layout(pattern, seq_len, FLEX_TILE, FLEX_TILE)
    full = np.zeros((layout.num_q_tiles, layout.num_k_tiles), bool)
    partial = np.zeros_like(full)
    for row in range(layout.num_q_tiles):
        full_tiles, partial_tiles = layout.forward.row(row)
        full[row, full_tiles], partial[row, partial_tiles] = True, True
    full, partial = full[None, None], partial[None, None]
    if chosen is not None:
        size = pattern.block_selection().size
        if size % FLEX_TILE:
            raise ValueError(f"the topk block size must be a multiple of FlexAttention's {FLEX_TILE}-token tiles "
                             f"for its chosen blocks to be whole tiles; got {size}")
        by_query_head = np.repeat(chosen, heads // chosen.shape[1], axis=1)  # [batch, heads, blocks, K]
        blocks = by_query_head.shape[2]
        chose = (by_query_head[..., None] == np.arange(blocks)).any(axis=-2)  # [batch, heads, q block, k block]
        tile_block = np.arange(layout.num_q_tiles) * FLEX_TILE // size
        chose = chose[:, :, tile_block][:, :, :, tile_block]
        full, partial = full | chose, partial & ~chose
    # Stable sort of "not active" lists each row's active tiles first, in ascending order.
    return tuple(x for tiles in (partial, full)
                 for x in (tiles.sum(-1).astype(np.int32), np.argsort(~tiles, axis=-1, kind="stable").astype(np.int32)))


def block_mask_from_layout(torch, BlockMask, pattern, seq_len: int, device: str = "cuda", chosen=None, heads=1):
    """FlexAttention's BlockMask holding `tile_lists`, with the pattern's static mask as mask_mod for the
    partial tiles (a chosen block is whole, so its tiles are full)."""
    lists = [torch.as_tensor(x, device=device) for x in tile_lists(pattern, seq_len, chosen, heads)]
    return BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=FLEX_TILE, mask_mod=lambda b, h, q, k: pattern.mask(q, k),
                                    seq_lengths=(seq_len, seq_len))


def check_length(pattern) -> int:
    """Tokens of the mask check: CHECK_LEN, or enough for a topk part to choose K blocks and more."""
    topk = pattern.block_selection()
    return CHECK_LEN if topk is None else max(CHECK_LEN, (topk.count + 2) * topk.size - 24)


def check_error(torch, BlockMask, attend, pattern, device: str = "cuda") -> float:
    """How far FlexAttention's attended key sets are from the pattern's at `check_length` tokens (n), with
    a topk part's blocks chosen by `fixed_choice`, in float32.

    With q = 0 every active key gets the same weight, so the log-sum-exp of row i is log(number of keys row
    i attends) and the output is the mean of v over them; v holds each key's position and its square
    (scaled to [0, 1]). Returns the largest error in the log-counts and the two means: one key too many or
    too few moves a log-count by at least 1 / n (n <= 4,072 here), where float32 errs by about 1e-6.
    """
    length = check_length(pattern)
    positions = np.arange(length)
    mask = np.broadcast_to(pattern.mask(positions[:, None], positions[None, :]), (length, length))
    chosen = fixed_choice(pattern, length, batch=1, kv_heads=1, seed=CHOICE_SEED)
    if chosen is not None:
        mask = mask | choice_mask(chosen[0, 0], pattern.block_selection().size, length)
    scaled = positions / length
    moments = np.stack([scaled, scaled**2], axis=-1)  # [keys, 2]
    expected = np.concatenate([np.log(mask.sum(1))[:, None], mask @ moments / mask.sum(1)[:, None]], axis=-1)
    q = torch.zeros(1, 1, length, 16, device=device)
    k = torch.randn(1, 1, length, 16, device=device, generator=torch.Generator(device=device).manual_seed(1))
    v = torch.zeros(1, 1, length, 16, device=device)
    v[0, 0, :, :2] = torch.as_tensor(moments, dtype=torch.float32, device=device)
    block_mask = block_mask_from_layout(torch, BlockMask, pattern, length, device, chosen)
    out, lse = attend(q, k, v, block_mask=block_mask, return_lse=True)
    got = torch.cat([lse[0, 0, :, None], out[0, 0, :, :2]], dim=-1).double().cpu().numpy()
    return float(np.abs(got - expected).max())


def run(spec: dict) -> list[dict]:
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as error:
        return rows_saying(spec, f"unsupported: PyTorch FlexAttention is not importable ({error})")
    if not torch.cuda.is_available():
        return rows_saying(spec, "unsupported: FlexAttention is timed on a CUDA device only")
    # Every (pattern, length, mode) compiles its own kernel; the default limit would fall back to eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    attend = torch.compile(flex_attention, fullgraph=True)
    dtype = getattr(torch, spec["dtype"])
    generator = torch.Generator(device="cuda").manual_seed(spec["seed"])
    checks = {}
    for pattern_spec in spec["patterns"]:
        try:
            checks[pattern_spec] = check_error(torch, BlockMask, attend, as_pattern(pattern_spec))
        except Exception as error:  # recorded in every row of the pattern
            checks[pattern_spec] = f"{type(error).__name__}: {str(error)[:300]}"
    rows = []
    for seq_len in spec["seq_lens"]:
        def normal(heads):  # [batch, heads, seq, head_dim], FlexAttention's layout
            return torch.randn(spec["batch"], heads, seq_len, spec["head_dim"], device="cuda", dtype=dtype,
                               generator=generator)

        q, d_out = normal(spec["heads"]), normal(spec["heads"])
        k, v = normal(spec["kv_heads"]), normal(spec["kv_heads"])
        gqa = spec["kv_heads"] != spec["heads"]
        for pattern_spec in spec["patterns"]:
            pattern, check = as_pattern(pattern_spec), checks[pattern_spec]
            if isinstance(check, str) or check > CHECK_TOLERANCE:
                length = check_length(pattern)
                problem = (f"the check at {length} tokens failed: {check}" if isinstance(check, str) else
                           f"FlexAttention attends other keys than the pattern (error {check:.3g} at "
                           f"{length} tokens)")
                rows += [_row(seq_len, pattern_spec, mode, f"error: {problem}") for mode in spec["modes"]]
                continue
            chosen = fixed_choice(pattern, seq_len, spec["batch"], spec["kv_heads"], seed=CHOICE_SEED)
            block_mask = block_mask_from_layout(torch, BlockMask, pattern, seq_len, chosen=chosen,
                                                heads=spec["heads"])
            for mode in spec["modes"]:
                if mode == "fwd":
                    def call():
                        return attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)
                else:
                    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

                    def call():
                        out = attend(*leaves, block_mask=block_mask, enable_gqa=gqa)
                        return torch.autograd.grad(out, leaves, d_out)
                try:
                    ms = median_ms(call, lambda _: torch.cuda.synchronize(), spec["runs"], spec["warmup"])
                    rows.append(_row(seq_len, pattern_spec, mode, ms=ms, runs=spec["runs"],
                                     memory_bytes=_peak_bytes(torch, call), check_max_abs_error=check))
                except Exception as error:  # as bench.run_case: record and go on
                    oom = isinstance(error, torch.cuda.OutOfMemoryError)
                    rows.append(_row(seq_len, pattern_spec, mode,
                                     "oom" if oom else f"error: {type(error).__name__}: {str(error)[:300]}"))
                print(f"flex {seq_len} {pattern_spec} {mode}: {rows[-1]['status']} {rows[-1]['ms']}", file=sys.stderr,
                      flush=True)
            del block_mask
        del q, k, v, d_out
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(run(json.loads(sys.argv[1]))))
