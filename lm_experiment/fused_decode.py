"""One decoding step of DecoderLM in five Pallas (Triton) kernels per layer, for small batches on GPUs.

XLA runs a batch-1 step of the `small` preset as about 23.5 kernels per layer of 2-5 us each, so a local
pattern's step is bound by kernel count, not by bytes (docs/benchmarks.md, "Decoding"). Here each layer is:

  norm_project(x, norm, w_qkv, cos, sin, epilogue="rope")   RMSNorm, q|k|v = h @ w_qkv.T, RoPE on q and k
  ring_attention(qkv, cache, position, ...)                  the new k, v written to their slot, attention
                                                             over the cache's slots (bounded caches only)
  residual_project(attended, w_out, x)                       x + attended @ w_out.T
  norm_project(x, norm, w_gate, w_up, epilogue="swiglu")     RMSNorm, silu(h @ w_gate.T) * (h @ w_up.T)
  residual_project(hidden, w_down, x)                        x + hidden @ w_down.T

Layers whose cache keeps every position (dense, strided, random_blocks) write and attend through XLA
(`decoding.KVCache.write`, `decoding.decode_attention`), which reads a long cache near the copy rate; the one
program per query head of `ring_attention` would not. The embedding, the final norm and the logits stay in XLA.

Every kernel has a jnp reference of the same signature (`*_reference`), and each rounds where the XLA path
rounds (the projections' outputs, the norm's input and output in the compute dtype), so the step's logits
match `DecoderLM.decode` within the compute dtype's precision. The residual stream is carried as
[rows, d_model] float32 with the batch padded to a multiple of 16 rows (Triton's smallest matrix-multiply
tile); the padded rows are never read back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lm_experiment.model import DecoderLM, apply_rope, rope_angles_at
from sparse_attention import decoding
from sparse_attention.decoding import KVCache
from sparse_attention.kernels.common import ROW_MAX_INIT, padded_length
from sparse_attention.kernels.triton import MIN_BLOCK, TRITON_DEPRECATION
from sparse_attention.patterns import Pattern

IMPLS = ("xla", "triton")

REDUCTION_CHUNK = 256  # columns of the contracted dimension per matrix multiply
PROJECTION_TILE = 16  # output columns per program of the projections: 40-128 programs at the small preset
SLOT_CHUNK = 128  # cache slots per step of ring_attention
NUM_WARPS = 4
NUM_STAGES = 2


def _dot_transposed(a, b):
    """a @ b.T accumulated in float32 (float32 inputs in full precision, not TF32)."""
    return plgpu.dot(a, b, trans_b=True, precision=jax.lax.Precision.HIGHEST)


def _largest_power_of_two_dividing(n: int, at_most: int) -> int:
    size = 1
    while size * 2 <= at_most and n % (size * 2) == 0:
        size *= 2
    return size


def _call(kernel, *, grid, out_shape, interpret, name, input_output_aliases=None):
    return pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape, input_output_aliases=input_output_aliases or {},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret, name=name)


# --- RMSNorm, then a projection --------------------------------------------------------------------------------


def _rms_norm_reference(x, scale, eps):
    """nnx.RMSNorm's arithmetic: the input rounded to the scale's dtype, statistics in float32."""
    rounded = x.astype(scale.dtype).astype(jnp.float32)
    inverse = jax.lax.rsqrt(jnp.mean(rounded * rounded, axis=-1, keepdims=True) + eps)
    return (rounded * (inverse * scale.astype(jnp.float32))).astype(scale.dtype)


def norm_project_reference(x, scale, weights, rope=None, *, eps: float, epilogue: str, head_dim: int,
                           rope_heads: int):
    """x float32 [rows, d], scale [d] -> [rows, columns] in scale's dtype.

    Weights are stored [out, in] (`LayerWeights`). epilogue "rope": weights = (w_qkv [heads_total * head_dim, d],),
    rope = (cos, sin) float32 [1, head_dim // 2]; the first rope_heads heads of the output are rotated.
    "swiglu": weights = (w_gate, w_up) [hidden, d]."""
    h = _rms_norm_reference(x, scale, eps)
    dtype = scale.dtype
    if epilogue == "rope":
        (w,) = weights
        projected = jnp.dot(h, w.T, preferred_element_type=jnp.float32).astype(dtype)
        rows = x.shape[0]
        heads = projected.reshape(rows, 1, -1, head_dim)
        cos, sin = rope
        rotated = apply_rope(heads[:, :, :rope_heads], cos, sin)
        return jnp.concatenate([rotated, heads[:, :, rope_heads:]], axis=2).reshape(rows, -1)
    gate, up = (jnp.dot(h, w.T, preferred_element_type=jnp.float32).astype(dtype) for w in weights)
    return (jax.nn.silu(gate) * up).astype(dtype)


def _sum(terms):
    return functools.reduce(operator.add, terms)


def _norm_project_kernel(*refs, eps, epilogue, head_dim, rope_heads, tile, chunk):
    if epilogue == "rope":
        x_ref, scale_ref, w_ref, cos_ref, sin_ref, out_ref = refs
    else:
        x_ref, scale_ref, gate_ref, up_ref, out_ref = refs
    dtype = out_ref.dtype
    # The contracted dimension is unrolled in chunks: every load is issued up front, none waits on a loop.
    starts = range(0, x_ref.shape[1], chunk)
    inputs = [x_ref[:, pl.ds(start, chunk)].astype(dtype).astype(jnp.float32) for start in starts]
    inverse = jax.lax.rsqrt(_sum(jnp.sum(part * part, axis=1, keepdims=True) for part in inputs) / x_ref.shape[1]
                            + eps)
    normed = [(part * (inverse * scale_ref[pl.ds(start, chunk)].astype(jnp.float32)[None, :])).astype(dtype)
              for part, start in zip(inputs, starts)]

    def project(w_ref, column):  # -> the projection's columns [column, column + tile), rounded to dtype
        total = _sum(_dot_transposed(h, w_ref[pl.ds(column, tile), pl.ds(start, chunk)])
                     for h, start in zip(normed, starts))
        return total.astype(dtype).astype(jnp.float32)

    if epilogue == "rope":
        # A program's columns: `tile` of one head's first half and the matching `tile` of its second half.
        half = head_dim // 2
        parts = half // tile
        head, part = pl.program_id(0) // parts, pl.program_id(0) % parts
        column = head * head_dim + part * tile
        lo, hi = project(w_ref, column), project(w_ref, column + half)
        cos, sin = cos_ref[:, pl.ds(part * tile, tile)], sin_ref[:, pl.ds(part * tile, tile)]
        rotate = head < rope_heads
        out_ref[:, pl.ds(column, tile)] = jnp.where(rotate, lo * cos - hi * sin, lo).astype(dtype)
        out_ref[:, pl.ds(column + half, tile)] = jnp.where(rotate, hi * cos + lo * sin, hi).astype(dtype)
        return
    column = pl.program_id(0) * tile
    gate = project(gate_ref, column)
    silu = (gate * jax.nn.sigmoid(gate)).astype(dtype).astype(jnp.float32)
    out_ref[:, pl.ds(column, tile)] = (silu * project(up_ref, column)).astype(dtype)


def norm_project(x, scale, weights, rope=None, *, eps: float, epilogue: str, head_dim: int, rope_heads: int,
                 interpret: bool = False):
    """norm_project_reference in one kernel: a program per PROJECTION_TILE output columns (for "rope", per
    PROJECTION_TILE columns of both halves of a head)."""
    d = x.shape[1]
    columns = weights[0].shape[0]
    tile = _largest_power_of_two_dividing(head_dim // 2 if epilogue == "rope" else columns, PROJECTION_TILE)
    chunk = _largest_power_of_two_dividing(d, REDUCTION_CHUNK)
    kernel = functools.partial(_norm_project_kernel, eps=eps, epilogue=epilogue, head_dim=head_dim,
                               rope_heads=rope_heads, tile=tile, chunk=chunk)
    programs = columns // tile // (2 if epilogue == "rope" else 1)
    operands = (x, scale, *weights, *(rope or ()))
    return _call(kernel, grid=(programs,), out_shape=jax.ShapeDtypeStruct((x.shape[0], columns), scale.dtype),
                 interpret=interpret, name=f"decode_norm_project_{epilogue}")(*operands)


# --- A projection added to the residual stream -------------------------------------------------------------------


def residual_project_reference(a, w, x):
    """x float32 [rows, d] + (a [rows, n] @ w.T, w [d, n]) rounded to a's dtype, as the XLA path adds it."""
    return x + jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype).astype(jnp.float32)


def _residual_project_kernel(a_ref, w_ref, x_ref, out_ref, *, tile, chunk):
    column = pl.ds(pl.program_id(0) * tile, tile)
    total = _sum(_dot_transposed(a_ref[:, pl.ds(start, chunk)], w_ref[column, pl.ds(start, chunk)])
                 for start in range(0, a_ref.shape[1], chunk))  # unrolled, as in norm_project
    out_ref[:, column] = x_ref[:, column] + total.astype(a_ref.dtype).astype(jnp.float32)


def residual_project(a, w, x, *, interpret: bool = False):
    """residual_project_reference in one kernel, a program per PROJECTION_TILE output columns."""
    tile = _largest_power_of_two_dividing(x.shape[1], PROJECTION_TILE)
    chunk = _largest_power_of_two_dividing(a.shape[1], REDUCTION_CHUNK)
    kernel = functools.partial(_residual_project_kernel, tile=tile, chunk=chunk)
    return _call(kernel, grid=(x.shape[1] // tile,), out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                 interpret=interpret, name="decode_residual_project")(a, w, x)


# --- Attention over a bounded cache -------------------------------------------------------------------------------


def ring_attention_reference(qkv, position, cache: KVCache, pattern: Pattern, *, heads: int, head_dim: int):
    """The query at `position` (int32 [1]) attending through the cache after its own k, v are written.

    qkv [rows, (heads + 2 kv_heads) * head_dim] (rows >= the cache's batch; q and k rotated) -> (attended
    [rows, heads * head_dim], the cache with the new position written). Rows past the batch are zeros."""
    batch, _, kv_heads, _ = cache.k.shape
    rows = qkv.shape[0]
    split = qkv[:batch].reshape(batch, 1, heads + 2 * kv_heads, head_dim)
    q, k, v = split[:, :, :heads], split[:, :, heads:heads + kv_heads], split[:, :, heads + kv_heads:]
    cache = cache.write(k, v, position[0])
    out = decoding.decode_attention(q, cache, position[0], pattern).reshape(batch, heads * head_dim)
    return jnp.zeros((rows, heads * head_dim), qkv.dtype).at[:batch].set(out), cache


def _ring_attention_kernel(qkv_ref, position_ref, k_ref, v_ref, positions_ref, out_ref, k_out_ref, v_out_ref,
                           positions_out_ref, *, pattern, layout, heads, head_dim, group, chunk, scale):
    b, head = pl.program_id(0), pl.program_id(1)
    kv_head = head // group
    slots = k_ref.shape[1]
    position = position_ref[0]
    slot = layout.slot(position)
    q = qkv_ref[pl.ds(b, 1), pl.ds(head * head_dim, head_dim)].astype(jnp.float32) * scale  # [1, head_dim]
    k_new = qkv_ref[pl.ds(b, 1), pl.ds((heads + kv_head) * head_dim, head_dim)]
    v_new = qkv_ref[pl.ds(b, 1), pl.ds((heads + k_ref.shape[2] + kv_head) * head_dim, head_dim)]

    def step(start, carry):
        row_max, row_sum, accumulator = carry
        ids = start + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
        written = ids == slot
        keys = jnp.where(written[:, None], k_new, k_ref[b, pl.ds(start, chunk), kv_head, :]).astype(jnp.float32)
        values = jnp.where(written[:, None], v_new, v_ref[b, pl.ds(start, chunk), kv_head, :]).astype(jnp.float32)
        key_positions = jnp.where(written, position, positions_ref[pl.ds(start, chunk)])
        visible = (key_positions >= 0) & pattern.mask(position, key_positions)
        scores = jnp.where(visible, jnp.sum(keys * q, axis=1), -jnp.inf)  # [chunk]
        new_max = jnp.maximum(row_max, jnp.max(scores))
        correction = jnp.exp(row_max - new_max)
        weights = jnp.exp(scores - new_max)
        row_sum = row_sum * correction + jnp.sum(weights)
        accumulator = accumulator * correction + jnp.sum(weights[:, None] * values, axis=0, keepdims=True)
        return new_max, row_sum, accumulator

    carry = (jnp.float32(ROW_MAX_INIT), jnp.float32(0), jnp.zeros((1, head_dim), jnp.float32))
    for start in range(0, slots, chunk):  # unrolled: the loads of every chunk can be issued up front
        carry = step(start, carry)
    _, row_sum, accumulator = carry
    out_ref[pl.ds(b, 1), pl.ds(head * head_dim, head_dim)] = (accumulator / row_sum).astype(out_ref.dtype)

    # Each (row, kv head) region of the cache is written by one program, after it has read it.
    @pl.when(head % group == 0)
    def _():
        k_out_ref[b, pl.ds(slot, 1), kv_head, :] = k_new.astype(k_out_ref.dtype)
        v_out_ref[b, pl.ds(slot, 1), kv_head, :] = v_new.astype(v_out_ref.dtype)

    @pl.when((b == 0) & (head == 0))
    def _():
        positions_out_ref[pl.ds(slot, 1)] = jnp.full((1,), position, jnp.int32)


def ring_attention(qkv, position, cache: KVCache, pattern: Pattern, *, heads: int, head_dim: int,
                   interpret: bool = False):
    """ring_attention_reference in one kernel: a program per (batch row, query head), which reads its kv head's
    slots SLOT_CHUNK at a time (online softmax); the cache is updated in place."""
    batch, slots, kv_heads, _ = cache.k.shape
    kernel = functools.partial(
        _ring_attention_kernel, pattern=pattern, layout=cache.layout, heads=heads, head_dim=head_dim,
        group=heads // kv_heads, chunk=_largest_power_of_two_dividing(slots, SLOT_CHUNK),
        scale=1.0 / math.sqrt(head_dim))
    out_shape = (jax.ShapeDtypeStruct((qkv.shape[0], heads * head_dim), qkv.dtype),
                 jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype), jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype),
                 jax.ShapeDtypeStruct(cache.positions.shape, jnp.int32))
    out, k, v, positions = _call(kernel, grid=(batch, heads), out_shape=out_shape, interpret=interpret,
                                 name="decode_ring_attention", input_output_aliases={2: 1, 3: 2, 4: 3})(
        qkv, position, cache.k, cache.v, cache.positions)
    return out, dataclasses.replace(cache, k=k, v=v, positions=positions)


# --- The step ----------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One block's parameters in the compute dtype, the projections stored [out, in] so that a program's output
    columns are contiguous rows (on the H200 the [in, out] layout, 32-byte pieces of 16 columns a row apart,
    made each projection kernel 11-13 us): norm scales [d]; qkv [(heads + 2 kv_heads) * head_dim, d]
    (q_proj | k_proj | v_proj); out [d, heads * head_dim]; gate, up [hidden, d]; down [d, hidden]."""

    attention_norm: jax.Array
    qkv: jax.Array
    out: jax.Array
    mlp_norm: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array

    @classmethod
    def of(cls, model: DecoderLM) -> list["LayerWeights"]:
        dtype = model.model_config.compute_jnp_dtype

        def weight(param):
            return param[...].astype(dtype)

        def transposed(linear):
            return weight(linear.kernel).T

        return [cls(attention_norm=weight(block.attention_norm.scale),
                    qkv=jnp.concatenate([transposed(block.attention.q_proj), transposed(block.attention.k_proj),
                                         transposed(block.attention.v_proj)]),
                    out=transposed(block.attention.out_proj), mlp_norm=weight(block.mlp_norm.scale),
                    gate=transposed(block.mlp.gate), up=transposed(block.mlp.up), down=transposed(block.mlp.down))
                for block in model.blocks]


def decode_step(model: DecoderLM, weights: list[LayerWeights], tokens, caches: list[KVCache], position, *,
                interpret: bool = False):
    """DecoderLM.decode through the fused kernels: tokens int32 [batch, 1] at `position` (traced int) ->
    (logits float32 [batch, 1, vocab], the caches updated). `weights`: LayerWeights.of(model)."""
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    config = model.model_config
    batch = tokens.shape[0]
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    # The batch padded to Triton's smallest matrix-multiply tile: [rows, d_model]
    x = model.embed_tokens(jnp.pad(tokens[:, 0], (0, padded_length(batch, MIN_BLOCK) - batch)))
    position = jnp.reshape(jnp.asarray(position, jnp.int32), (1,))
    rope = rope_angles_at(position, head_dim, config.rope_base)  # float32 [1, head_dim // 2] each
    updated = []
    for block, layer, cache in zip(model.blocks, weights, caches, strict=True):
        qkv = norm_project(x, layer.attention_norm, (layer.qkv,), rope, eps=block.attention_norm.epsilon,
                           epilogue="rope", head_dim=head_dim, rope_heads=heads + kv_heads, interpret=interpret)
        pattern = block.attention.pattern
        if cache.layout.bounded:
            attended, cache = ring_attention(qkv, position, cache, pattern, heads=heads, head_dim=head_dim,
                                             interpret=interpret)
        else:  # XLA reads a cache as long as the sequence near the copy rate
            attended, cache = ring_attention_reference(qkv, position, cache, pattern, heads=heads, head_dim=head_dim)
        updated.append(cache)
        x = residual_project(attended, layer.out, x, interpret=interpret)
        hidden = norm_project(x, layer.mlp_norm, (layer.gate, layer.up), eps=block.mlp_norm.epsilon,
                              epilogue="swiglu", head_dim=head_dim, rope_heads=0, interpret=interpret)
        x = residual_project(hidden, layer.down, x, interpret=interpret)
    return model._head(x[:batch, None]), updated


def check_impl(impl: str, model: DecoderLM, *, interpret: bool = False) -> None:
    """ValueError naming the field where `impl` is not in IMPLS, or is "triton" and cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"decode impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "xla" or interpret:
        return
    if jax.default_backend() != "gpu":
        raise ValueError(f"decode impl: triton needs a GPU (the backend is {jax.default_backend()}) or interpret=True")
    if model.model_config.head_dim // 2 < MIN_BLOCK:
        raise ValueError(f"decode impl: triton needs head_dim >= {2 * MIN_BLOCK} (its RoPE tiles), got "
                         f"{model.model_config.head_dim}")
