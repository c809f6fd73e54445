"""One decoding step of DecoderLM in five Pallas (Triton) kernels per layer, for small-batch decoding on GPUs.

XLA runs a batch-1 step of the `small` preset as about 23.5 kernels per layer of 2-5 us each, so a local
pattern's step is bound by kernel count and latency, not by bytes (docs/benchmarks.md, "Decoding"). Here each
layer is:

  norm_project(x, norm, (w_qkv,), rope, epilogue="rope")    RMSNorm, q|k|v = h @ w_qkv.T, RoPE on q and k
  ring_attention(qkv, position, cache, ...)                  the new k, v written to their slot; a program per
                                                             span of ATTENTION_SPAN slots and kv head attends
                                                             for the kv head's query heads: partial outputs
                                                             and their log-sum-exps (bounded caches only)
  attend_project(partial, lse, w_out, x)                     the spans combined, x + attended @ w_out.T
  norm_project(x, norm, (w_gate, w_up), epilogue="swiglu")   RMSNorm, silu(h @ w_gate.T) * (h @ w_up.T)
  residual_project(hidden, w_down, x)                        x + hidden @ w_down.T

The projections are matrix-vector products summed in registers rather than `pl.dot`, whose smallest tile is 16
rows: a program per batch row and PROJECTION_ROWS rows of a weight, whose loads are all issued at once, so a
projection is 160-512 programs of 6-16 KB at the `small` preset instead of 40-128 programs walking their
weights in a chain of loads. The batch is a grid axis, so each batch row reads the weights again (from L2 after
the first): the step is meant for small batches. On the H200 it took 0.40-0.77x the XLA step's time at batch 1 and
0.55-0.98x at batches 2 and 4, and was slower at 8 and 16 (docs/benchmarks.md), so `choose_impl` runs it up to
FUSED_MAX_BATCH rows. Programs that each took 2-16 batch rows, loading their weights once for them, were slower
than one row a program at every batch from 2 to 16.

Layers whose cache keeps every position (dense, strided, random_blocks) write and attend through XLA
(`decoding.KVCache.write`, `decoding.decode_attention`), which reads a long cache near the copy rate; their
output is one span. The embedding, the final norm and the logits stay in XLA.

Every kernel has a jnp reference of the same signature (`*_reference`), and each rounds where the XLA path
rounds (the projections' outputs, the norm's input and output, the attention's output in the compute dtype),
so the step's logits match `DecoderLM.decode` within the compute dtype's precision. The residual stream is
carried as [batch, d_model] float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
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
from sparse_attention.kernels.common import ROW_MAX_INIT
from sparse_attention.kernels.triton import TRITON_DEPRECATION
from sparse_attention.patterns import Pattern

log = logging.getLogger(__name__)

STEPS = ("xla", "triton")  # the decoding steps; "auto" chooses one (choose_impl)
IMPLS = ("auto", *STEPS)

# On the H200 (results/decode_bench/fused_step/variants_1e70b68.log) 2 or 8 rows, 1 or 2 warps a projection
# program and spans of 32 or 128 slots were each as fast as these or slower (1 warp: 1.4x the step time).
REDUCTION_CHUNK = 256  # elements of the contracted dimension per load
PROJECTION_ROWS = 4  # weight rows (output columns) per program: 160-512 programs a projection at the small preset
ATTENTION_SPAN = 64  # cache slots per ring_attention program
ATTENDED_CHUNK = 256  # elements of the attention's output combined and projected at a time by attend_project
PROJECTION_WARPS = 4
ATTENTION_WARPS = 4
FUSED_MAX_BATCH = 4  # "auto" runs the fused step up to this batch: at 8 and 16 XLA's step was faster on the H200


def _largest_power_of_two_dividing(n: int, at_most: int) -> int:
    size = 1
    while size * 2 <= at_most and n % (size * 2) == 0:
        size *= 2
    return size


def _sum(terms):
    return functools.reduce(operator.add, terms)


def _rounded(values, dtype):
    """float32 values rounded to dtype, kept in float32 (where the XLA path stores dtype)."""
    return values.astype(dtype).astype(jnp.float32)


def _call(kernel, *, grid, out_shape, interpret, name, num_warps=PROJECTION_WARPS, input_output_aliases=None):
    return pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape, input_output_aliases=input_output_aliases or {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps), interpret=interpret, name=name)


def _weight_rows(w_ref, first, rows, chunk):
    """w[first:first + rows] as float32 [rows, chunk] pieces, every load issued up front (unrolled). Kernels load
    their weights before they compute on their inputs, so the loads overlap that work."""
    return [w_ref[pl.ds(first, rows), pl.ds(start, chunk)].astype(jnp.float32)
            for start in range(0, w_ref.shape[1], chunk)]


def _matvec(w_pieces, pieces):
    """The weight rows held as `w_pieces` @ the vector held as float32 [chunk] `pieces` -> float32 [rows]. The
    products are summed elementwise first, so the threads reduce across each other once."""
    return jnp.sum(_sum(w * piece[None, :] for w, piece in zip(w_pieces, pieces, strict=True)), axis=1)


# --- RMSNorm, then a projection --------------------------------------------------------------------------------


def _rms_norm_reference(x, scale, eps):
    """nnx.RMSNorm's arithmetic: the input rounded to the scale's dtype, statistics in float32."""
    rounded = x.astype(scale.dtype).astype(jnp.float32)
    inverse = jax.lax.rsqrt(jnp.mean(rounded * rounded, axis=-1, keepdims=True) + eps)
    return (rounded * (inverse * scale.astype(jnp.float32))).astype(scale.dtype)


def norm_project_reference(x, scale, weights, rope=None, *, eps: float, epilogue: str, head_dim: int,
                           rope_heads: int):
    """x float32 [batch, d], scale [d] -> [batch, columns] in scale's dtype.

    Weights are stored [out, in] (`LayerWeights`). epilogue "rope": weights = (w_qkv [heads_total * head_dim, d],),
    rope = (cos, sin) float32 [1, head_dim // 2]; the first rope_heads heads of the output are rotated.
    "swiglu": weights = (w_gate, w_up) [hidden, d]."""
    h = _rms_norm_reference(x, scale, eps)
    dtype = scale.dtype
    if epilogue == "rope":
        (w,) = weights
        projected = jnp.dot(h, w.T, preferred_element_type=jnp.float32).astype(dtype)
        batch = x.shape[0]
        heads = projected.reshape(batch, 1, -1, head_dim)
        cos, sin = rope
        rotated = apply_rope(heads[:, :, :rope_heads], cos, sin)
        return jnp.concatenate([rotated, heads[:, :, rope_heads:]], axis=2).reshape(batch, -1)
    gate, up = (jnp.dot(h, w.T, preferred_element_type=jnp.float32).astype(dtype) for w in weights)
    return (jax.nn.silu(gate) * up).astype(dtype)


def _norm_project_kernel(*refs, eps, epilogue, head_dim, rope_heads, rows, chunk):
    if epilogue == "rope":
        x_ref, scale_ref, w_ref, cos_ref, sin_ref, out_ref = refs
    else:
        x_ref, scale_ref, gate_ref, up_ref, out_ref = refs
    b, program = pl.program_id(0), pl.program_id(1)
    dtype = out_ref.dtype
    starts = range(0, x_ref.shape[1], chunk)

    def normed():  # row b's RMSNorm as float32 [chunk] pieces in dtype; called once the weights' loads are issued
        inputs = [_rounded(x_ref[b, pl.ds(start, chunk)], dtype) for start in starts]
        inverse = jax.lax.rsqrt(jnp.sum(_sum(part * part for part in inputs)) / x_ref.shape[1] + eps)
        return [_rounded(part * (inverse * scale_ref[pl.ds(start, chunk)].astype(jnp.float32)), dtype)
                for part, start in zip(inputs, starts)]

    def project(w_pieces, h):  # -> the projection's columns held by w_pieces, rounded to dtype
        return _rounded(_matvec(w_pieces, h), dtype)

    if epilogue == "rope":
        # A program's columns: `rows` of one head's first half and the matching `rows` of its second half.
        half = head_dim // 2
        per_head = half // rows
        head, part = program // per_head, program % per_head
        first = head * head_dim + part * rows
        w_lo, w_hi = _weight_rows(w_ref, first, rows, chunk), _weight_rows(w_ref, first + half, rows, chunk)
        cos, sin = cos_ref[0, pl.ds(part * rows, rows)], sin_ref[0, pl.ds(part * rows, rows)]
        rotate = head < rope_heads
        h = normed()
        lo, hi = project(w_lo, h), project(w_hi, h)
        out_ref[b, pl.ds(first, rows)] = jnp.where(rotate, lo * cos - hi * sin, lo).astype(dtype)
        out_ref[b, pl.ds(first + half, rows)] = jnp.where(rotate, hi * cos + lo * sin, hi).astype(dtype)
        return
    first = program * rows
    w_gate, w_up = _weight_rows(gate_ref, first, rows, chunk), _weight_rows(up_ref, first, rows, chunk)
    h = normed()
    gate = project(w_gate, h)
    silu = _rounded(gate * jax.nn.sigmoid(gate), dtype)
    out_ref[b, pl.ds(first, rows)] = (silu * project(w_up, h)).astype(dtype)


def norm_project(x, scale, weights, rope=None, *, eps: float, epilogue: str, head_dim: int, rope_heads: int,
                 interpret: bool = False):
    """norm_project_reference in one kernel: a program per batch row and PROJECTION_ROWS output columns (for
    "rope", PROJECTION_ROWS columns of both halves of a head)."""
    batch, d = x.shape
    columns = weights[0].shape[0]
    rows = _largest_power_of_two_dividing(head_dim // 2 if epilogue == "rope" else columns, PROJECTION_ROWS)
    chunk = _largest_power_of_two_dividing(d, REDUCTION_CHUNK)
    kernel = functools.partial(_norm_project_kernel, eps=eps, epilogue=epilogue, head_dim=head_dim,
                               rope_heads=rope_heads, rows=rows, chunk=chunk)
    programs = columns // rows // (2 if epilogue == "rope" else 1)
    operands = (x, scale, *weights, *(rope or ()))
    return _call(kernel, grid=(batch, programs), out_shape=jax.ShapeDtypeStruct((batch, columns), scale.dtype),
                 interpret=interpret, name=f"decode_norm_project_{epilogue}")(*operands)


# --- A projection added to the residual stream -------------------------------------------------------------------


def residual_project_reference(a, w, x):
    """x float32 [batch, d] + (a [batch, n] @ w.T, w [d, n]) rounded to a's dtype, as the XLA path adds it."""
    return x + jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype).astype(jnp.float32)


def _residual_project_kernel(a_ref, w_ref, x_ref, out_ref, *, rows, chunk):
    b, first = pl.program_id(0), pl.program_id(1) * rows
    w_pieces = _weight_rows(w_ref, first, rows, chunk)
    pieces = [a_ref[b, pl.ds(start, chunk)].astype(jnp.float32) for start in range(0, a_ref.shape[1], chunk)]
    projected = _rounded(_matvec(w_pieces, pieces), a_ref.dtype)
    out_ref[b, pl.ds(first, rows)] = x_ref[b, pl.ds(first, rows)] + projected


def residual_project(a, w, x, *, interpret: bool = False):
    """residual_project_reference in one kernel, a program per batch row and PROJECTION_ROWS output columns."""
    batch, d = x.shape
    rows = _largest_power_of_two_dividing(d, PROJECTION_ROWS)
    kernel = functools.partial(_residual_project_kernel, rows=rows,
                               chunk=_largest_power_of_two_dividing(a.shape[1], REDUCTION_CHUNK))
    return _call(kernel, grid=(batch, d // rows), out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                 interpret=interpret, name="decode_residual_project")(a, w, x)


# --- Attention over a bounded cache, in spans -----------------------------------------------------------------------


def ring_attention_reference(qkv, position, cache: KVCache, pattern: Pattern, *, heads: int, head_dim: int):
    """The query at `position` (int32 [1]) attending through the cache after its own k, v are written.

    qkv [batch, (heads + 2 kv_heads) * head_dim] (q and k rotated) -> (partial float32 [batch, spans, heads,
    head_dim], lse float32 [batch, spans, heads], the cache with the new position written): each span's
    attention and the log-sum-exp of its scores, which `combine_spans` merges. Here a single span, the whole
    cache, whose log-sum-exp is not needed to combine it (zeros)."""
    batch, _, kv_heads, _ = cache.k.shape
    split = qkv.reshape(batch, 1, heads + 2 * kv_heads, head_dim)
    q, k, v = split[:, :, :heads], split[:, :, heads:heads + kv_heads], split[:, :, heads + kv_heads:]
    cache = cache.write(k, v, position[0])
    out = decoding.decode_attention(q, cache, position[0], pattern)  # [batch, 1, heads, head_dim]
    return out.astype(jnp.float32), jnp.zeros((batch, 1, heads), jnp.float32), cache


def combine_spans(partial, lse, dtype):
    """Each span's attention weighted by its share of the softmax: -> [batch, heads * head_dim] in dtype."""
    weights = jnp.exp(lse - jnp.max(lse, axis=1, keepdims=True))  # [batch, spans, heads]
    out = jnp.sum(weights[..., None] * partial, axis=1) / jnp.sum(weights, axis=1)[..., None]
    return out.reshape(out.shape[0], -1).astype(dtype)


def _ring_attention_kernel(qkv_ref, position_ref, k_ref, v_ref, positions_ref, partial_ref, lse_ref, k_out_ref,
                           v_out_ref, positions_out_ref, *, pattern, layout, heads, head_dim, group, span, scale):
    b, kv_head, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    position = position_ref[0]
    slot = layout.slot(position)
    start = part * span
    k_new = qkv_ref[b, pl.ds((heads + kv_head) * head_dim, head_dim)]  # [head_dim]
    v_new = qkv_ref[b, pl.ds((heads + k_ref.shape[2] + kv_head) * head_dim, head_dim)]
    written = start + jax.lax.broadcasted_iota(jnp.int32, (span,), 0) == slot
    keys = jnp.where(written[:, None], k_new[None, :], k_ref[b, pl.ds(start, span), kv_head, :]).astype(jnp.float32)
    values = jnp.where(written[:, None], v_new[None, :], v_ref[b, pl.ds(start, span), kv_head, :]).astype(jnp.float32)
    key_positions = jnp.where(written, position, positions_ref[pl.ds(start, span)])
    visible = (key_positions >= 0) & pattern.mask(position, key_positions)
    for member in range(group):  # the kv head's query heads share its keys and values
        head = kv_head * group + member
        q = qkv_ref[b, pl.ds(head * head_dim, head_dim)].astype(jnp.float32) * scale
        scores = jnp.where(visible, jnp.sum(keys * q[None, :], axis=1), -jnp.inf)  # [span]
        row_max = jnp.maximum(jnp.max(scores), ROW_MAX_INIT)
        weights = jnp.exp(scores - row_max)
        total = jnp.sum(weights)
        seen = total > 0  # a span with no visible key weighs nothing in the combination
        partial_ref[b, part, head, :] = jnp.sum(weights[:, None] * values, axis=0) / jnp.where(seen, total, 1.0)
        lse_ref[b, part, pl.ds(head, 1)] = jnp.full((1,), jnp.where(seen, row_max + jnp.log(total), -jnp.inf))

    # Each (row, kv head, span) region of the cache is read and written by one program, the read first.
    in_span = (slot >= start) & (slot < start + span)

    @pl.when(in_span)
    def _():
        k_out_ref[b, slot, kv_head, :] = k_new.astype(k_out_ref.dtype)
        v_out_ref[b, slot, kv_head, :] = v_new.astype(v_out_ref.dtype)

    @pl.when(in_span & (b == 0) & (kv_head == 0))
    def _():
        positions_out_ref[pl.ds(slot, 1)] = jnp.full((1,), position, jnp.int32)


def ring_attention(qkv, position, cache: KVCache, pattern: Pattern, *, heads: int, head_dim: int,
                   interpret: bool = False):
    """ring_attention_reference in one kernel: a program per (batch row, kv head, span of ATTENTION_SPAN slots,
    fewer where that does not divide the slots); the cache is updated in place."""
    batch, slots, kv_heads, _ = cache.k.shape
    span = _largest_power_of_two_dividing(slots, ATTENTION_SPAN)
    spans = slots // span
    kernel = functools.partial(
        _ring_attention_kernel, pattern=pattern, layout=cache.layout, heads=heads, head_dim=head_dim,
        group=heads // kv_heads, span=span, scale=1.0 / math.sqrt(head_dim))
    out_shape = (jax.ShapeDtypeStruct((batch, spans, heads, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, spans, heads), jnp.float32),
                 jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype), jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype),
                 jax.ShapeDtypeStruct(cache.positions.shape, jnp.int32))
    partial, lse, k, v, positions = _call(
        kernel, grid=(batch, kv_heads, spans), out_shape=out_shape, interpret=interpret, name="decode_ring_attention",
        num_warps=ATTENTION_WARPS, input_output_aliases={2: 2, 3: 3, 4: 4})(
            qkv, position, cache.k, cache.v, cache.positions)
    return partial, lse, dataclasses.replace(cache, k=k, v=v, positions=positions)


# --- The spans combined, projected and added to the residual stream -------------------------------------------------


def attend_project_reference(partial, lse, w, x):
    """x float32 [batch, d] + combine_spans(partial, lse) @ w.T (w [d, heads * head_dim]), rounded as the XLA
    path rounds the attention's output and its projection."""
    return residual_project_reference(combine_spans(partial, lse, w.dtype), w, x)


def _attend_project_kernel(partial_ref, lse_ref, w_ref, x_ref, out_ref, *, rows, head_chunk):
    b, first = pl.program_id(0), pl.program_id(1) * rows
    spans, heads = lse_ref.shape[1], lse_ref.shape[2]
    dtype = w_ref.dtype
    head_starts = range(0, heads, head_chunk)
    w_pieces = [w_ref[pl.ds(first, rows), pl.ds(head, head_chunk), :].astype(jnp.float32)
                for head in head_starts]  # [rows, head_chunk, head_dim] each
    products = []  # [rows, head_chunk, head_dim] each, summed elementwise before the threads reduce once
    for head, w in zip(head_starts, w_pieces):  # every program combines the spans of all heads itself
        lse = [lse_ref[b, s, pl.ds(head, head_chunk)] for s in range(spans)]  # [head_chunk] each
        top = functools.reduce(jnp.maximum, lse)
        weights = [jnp.exp(part - top) for part in lse]
        attended = _sum(weight[:, None] * partial_ref[b, s, pl.ds(head, head_chunk), :]
                        for s, weight in enumerate(weights)) / _sum(weights)[:, None]  # [head_chunk, head_dim]
        products.append(w * _rounded(attended, dtype)[None])
    projected = jnp.sum(jnp.sum(_sum(products), axis=2), axis=1)
    out_ref[b, pl.ds(first, rows)] = x_ref[b, pl.ds(first, rows)] + _rounded(projected, dtype)


def attend_project(partial, lse, w, x, *, interpret: bool = False):
    """attend_project_reference in one kernel, a program per batch row and PROJECTION_ROWS output columns."""
    batch, _, heads, head_dim = partial.shape
    d = x.shape[1]
    rows = _largest_power_of_two_dividing(d, PROJECTION_ROWS)
    head_chunk = _largest_power_of_two_dividing(heads, max(1, ATTENDED_CHUNK // head_dim))
    kernel = functools.partial(_attend_project_kernel, rows=rows, head_chunk=head_chunk)
    return _call(kernel, grid=(batch, d // rows), out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                 interpret=interpret, name="decode_attend_project")(partial, lse, w.reshape(d, heads, head_dim), x)


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
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    x = model.embed_tokens(tokens)[:, 0]  # float32 [batch, d_model]
    position = jnp.reshape(jnp.asarray(position, jnp.int32), (1,))
    rope = rope_angles_at(position, head_dim, config.rope_base)  # float32 [1, head_dim // 2] each
    updated = []
    for block, layer, cache in zip(model.blocks, weights, caches, strict=True):
        qkv = norm_project(x, layer.attention_norm, (layer.qkv,), rope, eps=block.attention_norm.epsilon,
                           epilogue="rope", head_dim=head_dim, rope_heads=heads + kv_heads, interpret=interpret)
        pattern = block.attention.pattern
        if cache.layout.bounded:
            partial, lse, cache = ring_attention(qkv, position, cache, pattern, heads=heads, head_dim=head_dim,
                                                 interpret=interpret)
        else:  # XLA reads a cache as long as the sequence near the copy rate
            partial, lse, cache = ring_attention_reference(qkv, position, cache, pattern, heads=heads,
                                                           head_dim=head_dim)
        updated.append(cache)
        x = attend_project(partial, lse, layer.out, x, interpret=interpret)
        hidden = norm_project(x, layer.mlp_norm, (layer.gate, layer.up), eps=block.mlp_norm.epsilon,
                              epilogue="swiglu", head_dim=head_dim, rope_heads=0, interpret=interpret)
        x = residual_project(hidden, layer.down, x, interpret=interpret)
    return model._head(x[:, None]), updated


def _triton_refusal(model: DecoderLM, interpret: bool) -> str | None:
    """Why the fused step cannot run here, or None."""
    if interpret:
        return None
    if jax.default_backend() != "gpu":
        return f"triton needs a GPU (the backend is {jax.default_backend()}) or interpret=True"
    head_dim = model.model_config.head_dim
    if head_dim < 2 or head_dim & (head_dim - 1):
        return f"triton needs a power-of-two head_dim (Triton's tile shapes), got {head_dim}"
    return None


def check_impl(impl: str, model: DecoderLM, *, interpret: bool = False) -> None:
    """ValueError naming the field where `impl` is not in IMPLS, or is "triton" and cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"decode impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    refusal = _triton_refusal(model, interpret) if impl == "triton" else None
    if refusal:
        raise ValueError(f"decode impl: {refusal}")


def choose_impl(impl: str, model: DecoderLM, batch: int, *, interpret: bool = False) -> str:
    """The step that runs, "xla" or "triton": `impl` itself where explicit (check_impl refuses one that cannot
    run), and for "auto" the fused step where it was measured faster, on a GPU up to FUSED_MAX_BATCH rows (at
    128k on the H200: 0.40-0.77x the XLA step's time at batch 1, 0.55-0.98x at 2 and 4, 1.02-1.74x at 8 and 16;
    docs/benchmarks.md), else XLA's. Logged."""
    check_impl(impl, model, interpret=interpret)
    if impl != "auto":
        return impl
    too_large = f"batch {batch} > {FUSED_MAX_BATCH}"
    refusal = _triton_refusal(model, interpret=False) or (None if batch <= FUSED_MAX_BATCH else too_large)
    chosen = "xla" if refusal else "triton"
    log.info("decode impl=auto ran %s (%s)", chosen, refusal or f"a GPU at batch {batch} <= {FUSED_MAX_BATCH}")
    return chosen
