"""One decoding step of DecoderLM in Pallas (Triton) kernels, for batch-1 decoding on GPUs.

XLA runs a batch-1 step of the `small` preset as about 23.5 kernels per layer of 2-5 us each, so a local
pattern's step is bound by kernel count and latency, not by bytes (docs/benchmarks.md, "Decoding"). A layer's
work is five phases, each a kernel of its own here:

  norm_project(x, norm, (w_qkv,), rope, epilogue="rope")    RMSNorm, q|k|v = h @ w_qkv.T, RoPE on q and k
  ring_attention(qkv, position, cache, ...)                  the new k, v written to their slot; a program per
                                                             span of ATTENTION_SPAN slots and kv head attends
                                                             for the kv head's query heads: partial outputs
                                                             and their log-sum-exps (bounded caches only)
  attend_project(partial, lse, w_out, x)                     the spans combined, x + attended @ w_out.T
  norm_project(x, norm, (w_gate, w_up), epilogue="swiglu")   RMSNorm, silu(h @ w_gate.T) * (h @ w_up.T)
  residual_project(hidden, w_down, x)                        x + hidden @ w_down.T

A layer with a bounded cache runs all five as one kernel, `fused_layer`: a program per multiprocessor (all
resident at once), each taking its share of every phase's items, with a grid-wide barrier (an atomic counter)
between phases; where every program has at most one item of a phase, it loads that phase's weights before the
barrier, so their latency overlaps the wait. The five separate kernels remain for layers whose cache keeps every
position, around XLA's attention.

The projections are matrix-vector products summed in registers rather than `pl.dot`, whose smallest tile is 16
rows: a program (or item) per batch row and a few rows of a weight, whose loads are all issued at once. The
batch rows are separate programs or items, so each reads the weights again (from L2 after the first): the step
is meant for batch 1; at batch 16 it was slower than XLA's (docs/benchmarks.md), and `choose_impl` runs XLA's
there.

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
LAYER_WARPS = 4
MOST_ITEM_ROWS = 16  # a fused_layer item's weight rows: 48 KB of w_gate and w_up at the small preset
PREFETCH_WEIGHTS = True  # fused_layer loads a phase's weights before the barrier ahead of it


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


def _weight_tiles(w_ref, first, rows, chunk):
    """w[first:first + rows] as stored, in [rows, chunk] tiles along the contracted dimension; loaded together,
    so all of them are in flight at once."""
    return [w_ref[pl.ds(first, rows), pl.ds(start, chunk)] for start in range(0, w_ref.shape[1], chunk)]


def _matvec(tiles, pieces):
    """The weight rows held as `tiles` @ the vector held as float32 [chunk] `pieces` -> float32 [rows]. The
    products are summed elementwise first, so the threads reduce across each other once."""
    return jnp.sum(_sum(tile.astype(jnp.float32) * piece[None, :] for tile, piece in zip(tiles, pieces, strict=True)),
                   axis=1)


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


@dataclasses.dataclass(frozen=True)
class _NormProjection:
    """norm_project's work for one program: `rows` output columns (for "rope", `rows` of both halves of a head),
    as the weight rows it reads (`tiles`) and what it computes from them (`item`), split so that fused_layer can
    load a phase's weights before the barrier that precedes it."""

    eps: float
    epilogue: str
    head_dim: int
    rope_heads: int
    rows: int
    chunk: int

    def _rope_columns(self, program):  # -> (first column, head, the head's part)
        per_head = self.head_dim // 2 // self.rows
        head, part = program // per_head, program % per_head
        return head * self.head_dim + part * self.rows, head, part

    def tiles(self, program, w_refs):
        """rope: (w_qkv's rows of the first half, of the second half); swiglu: (w_gate's rows, w_up's rows)."""
        if self.epilogue == "rope":
            (w_ref,) = w_refs
            first, _, _ = self._rope_columns(program)
            return tuple(_weight_tiles(w_ref, start, self.rows, self.chunk)
                         for start in (first, first + self.head_dim // 2))
        return tuple(_weight_tiles(w_ref, program * self.rows, self.rows, self.chunk) for w_ref in w_refs)

    def item(self, b, program, tiles, x_ref, scale_ref, rope_refs, out_ref):
        """Batch row b's output columns of `program`."""
        dtype = out_ref.dtype
        starts = range(0, x_ref.shape[1], self.chunk)
        inputs = [_rounded(x_ref[b, pl.ds(start, self.chunk)], dtype) for start in starts]
        inverse = jax.lax.rsqrt(jnp.sum(_sum(part * part for part in inputs)) / x_ref.shape[1] + self.eps)
        normed = [_rounded(part * (inverse * scale_ref[pl.ds(start, self.chunk)].astype(jnp.float32)), dtype)
                  for part, start in zip(inputs, starts)]
        first_tiles, second_tiles = tiles
        lo, hi = (_rounded(_matvec(part, normed), dtype) for part in (first_tiles, second_tiles))
        if self.epilogue == "rope":
            first, head, part = self._rope_columns(program)
            cos_ref, sin_ref = rope_refs
            cos, sin = (ref[0, pl.ds(part * self.rows, self.rows)] for ref in (cos_ref, sin_ref))
            rotate = head < self.rope_heads
            out_ref[b, pl.ds(first, self.rows)] = jnp.where(rotate, lo * cos - hi * sin, lo).astype(dtype)
            out_ref[b, pl.ds(first + self.head_dim // 2, self.rows)] = jnp.where(
                rotate, hi * cos + lo * sin, hi).astype(dtype)
            return
        silu = _rounded(lo * jax.nn.sigmoid(lo), dtype)  # lo: the gate's columns, hi: the up projection's
        out_ref[b, pl.ds(program * self.rows, self.rows)] = (silu * hi).astype(dtype)


def _norm_project_kernel(*refs, projection: _NormProjection):
    x_ref, scale_ref, *w_refs, out_ref = refs
    rope_refs = ()
    if projection.epilogue == "rope":
        w_refs, rope_refs = w_refs[:1], w_refs[1:]
    program = pl.program_id(1)
    projection.item(pl.program_id(0), program, projection.tiles(program, w_refs), x_ref, scale_ref, rope_refs,
                    out_ref)


def norm_project(x, scale, weights, rope=None, *, eps: float, epilogue: str, head_dim: int, rope_heads: int,
                 interpret: bool = False):
    """norm_project_reference in one kernel: a program per batch row and PROJECTION_ROWS output columns (for
    "rope", PROJECTION_ROWS columns of both halves of a head)."""
    batch, d = x.shape
    columns = weights[0].shape[0]
    rows = _largest_power_of_two_dividing(head_dim // 2 if epilogue == "rope" else columns, PROJECTION_ROWS)
    projection = _NormProjection(eps=eps, epilogue=epilogue, head_dim=head_dim, rope_heads=rope_heads, rows=rows,
                                 chunk=_largest_power_of_two_dividing(d, REDUCTION_CHUNK))
    kernel = functools.partial(_norm_project_kernel, projection=projection)
    programs = columns // rows // (2 if epilogue == "rope" else 1)
    operands = (x, scale, *weights, *(rope or ()))
    return _call(kernel, grid=(batch, programs), out_shape=jax.ShapeDtypeStruct((batch, columns), scale.dtype),
                 interpret=interpret, name=f"decode_norm_project_{epilogue}")(*operands)


# --- A projection added to the residual stream -------------------------------------------------------------------


def residual_project_reference(a, w, x):
    """x float32 [batch, d] + (a [batch, n] @ w.T, w [d, n]) rounded to a's dtype, as the XLA path adds it."""
    return x + jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(a.dtype).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _ResidualProjection:
    """residual_project's work for one program, `rows` output columns: its weight rows and what it computes."""

    rows: int
    chunk: int

    def tiles(self, program, w_ref):
        return _weight_tiles(w_ref, program * self.rows, self.rows, self.chunk)

    def item(self, b, program, tiles, a_ref, x_ref, out_ref):
        first = program * self.rows
        pieces = [a_ref[b, pl.ds(start, self.chunk)].astype(jnp.float32)
                  for start in range(0, a_ref.shape[1], self.chunk)]
        projected = _rounded(_matvec(tiles, pieces), a_ref.dtype)
        out_ref[b, pl.ds(first, self.rows)] = x_ref[b, pl.ds(first, self.rows)] + projected


def _residual_project_kernel(a_ref, w_ref, x_ref, out_ref, *, projection: _ResidualProjection):
    program = pl.program_id(1)
    projection.item(pl.program_id(0), program, projection.tiles(program, w_ref), a_ref, x_ref, out_ref)


def residual_project(a, w, x, *, interpret: bool = False):
    """residual_project_reference in one kernel, a program per batch row and PROJECTION_ROWS output columns."""
    batch, d = x.shape
    rows = _largest_power_of_two_dividing(d, PROJECTION_ROWS)
    projection = _ResidualProjection(rows=rows, chunk=_largest_power_of_two_dividing(a.shape[1], REDUCTION_CHUNK))
    kernel = functools.partial(_residual_project_kernel, projection=projection)
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


def _ring_attention_kernel(*refs, **static):
    _ring_attention_item(pl.program_id(0), pl.program_id(1), pl.program_id(2), *refs, **static)


def _ring_attention_item(b, kv_head, part, qkv_ref, position_ref, k_ref, v_ref, positions_ref, partial_ref, lse_ref,
                         k_out_ref, v_out_ref, positions_out_ref, *, pattern, layout, heads, head_dim, group, span,
                         scale):
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


@dataclasses.dataclass(frozen=True)
class _AttendProjection:
    """attend_project's work for one program, `rows` output columns: its rows of w_out [d, heads, head_dim], by
    chunks of head_chunk heads, and what it computes from them."""

    rows: int
    head_chunk: int

    def tiles(self, program, w_ref):
        return [w_ref[pl.ds(program * self.rows, self.rows), pl.ds(head, self.head_chunk), :]
                for head in range(0, w_ref.shape[1], self.head_chunk)]

    def item(self, b, program, tiles, partial_ref, lse_ref, x_ref, out_ref):
        first = program * self.rows
        spans = lse_ref.shape[1]
        dtype = tiles[0].dtype
        products = []  # [rows, head_chunk, head_dim] each, summed elementwise before the threads reduce once
        for tile, head in zip(tiles, range(0, lse_ref.shape[2], self.head_chunk), strict=True):
            # every program combines the spans of all heads itself
            lse = [lse_ref[b, s, pl.ds(head, self.head_chunk)] for s in range(spans)]  # [head_chunk] each
            top = functools.reduce(jnp.maximum, lse)
            weights = [jnp.exp(part - top) for part in lse]
            attended = _sum(weight[:, None] * partial_ref[b, s, pl.ds(head, self.head_chunk), :]
                            for s, weight in enumerate(weights)) / _sum(weights)[:, None]  # [head_chunk, head_dim]
            products.append(tile.astype(jnp.float32) * _rounded(attended, dtype)[None])
        projected = jnp.sum(jnp.sum(_sum(products), axis=2), axis=1)
        out_ref[b, pl.ds(first, self.rows)] = x_ref[b, pl.ds(first, self.rows)] + _rounded(projected, dtype)


def _attend_project_kernel(partial_ref, lse_ref, w_ref, x_ref, out_ref, *, projection: _AttendProjection):
    program = pl.program_id(1)
    projection.item(pl.program_id(0), program, projection.tiles(program, w_ref), partial_ref, lse_ref, x_ref, out_ref)


def attend_project(partial, lse, w, x, *, interpret: bool = False):
    """attend_project_reference in one kernel, a program per batch row and PROJECTION_ROWS output columns."""
    batch, _, heads, head_dim = partial.shape
    d = x.shape[1]
    rows = _largest_power_of_two_dividing(d, PROJECTION_ROWS)
    head_chunk = _largest_power_of_two_dividing(heads, max(1, ATTENDED_CHUNK // head_dim))
    kernel = functools.partial(_attend_project_kernel,
                               projection=_AttendProjection(rows=rows, head_chunk=head_chunk))
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


# --- A whole layer in one kernel -----------------------------------------------------------------------------------


def fused_layer_reference(x, layer: LayerWeights, rope, position, cache: KVCache, pattern: Pattern, *,
                          eps: tuple[float, float], heads: int, head_dim: int):
    """One block of DecoderLM.decode: x float32 [batch, d] at `position` -> (x after the block, the cache with the
    position written). The five kernels' references in turn; eps: the attention norm's and the MLP norm's."""
    kv_heads = cache.k.shape[2]
    qkv = norm_project_reference(x, layer.attention_norm, (layer.qkv,), rope, eps=eps[0], epilogue="rope",
                                 head_dim=head_dim, rope_heads=heads + kv_heads)
    partial, lse, cache = ring_attention_reference(qkv, position, cache, pattern, heads=heads, head_dim=head_dim)
    x = attend_project_reference(partial, lse, layer.out, x)
    hidden = norm_project_reference(x, layer.mlp_norm, (layer.gate, layer.up), eps=eps[1], epilogue="swiglu",
                                    head_dim=head_dim, rope_heads=0)
    return residual_project_reference(hidden, layer.down, x), cache


BARRIERS_PER_LAYER = 4  # between fused_layer's five phases
BARRIER_LANES = 32 * LAYER_WARPS  # a counter per thread of a program


def _grid_barrier(counter_ref, index, programs, interpret):
    """Returns once all `programs` programs have reached barrier `index` of counter_ref (int32 [barriers,
    BARRIER_LANES], zero before). Each thread counts on its own lane, so each gets its own atomics' results (a
    one-element atomic's result reaches only the thread that ran it) and releases its own stores; the loop runs
    until every lane has counted every program, and its atomics keep it from being removed as dead code. The
    programs must all be resident at once: fused_layer launches no more than the GPU has multiprocessors."""
    lanes = pl.ds(index, 1), pl.ds(0, counter_ref.shape[1])
    if not interpret:  # no interpret rule; the stores of the program's threads issued before the arrival
        plgpu.debug_barrier()
    arrived = jnp.min(plgpu.atomic_add(counter_ref, lanes, jnp.ones((1, counter_ref.shape[1]), jnp.int32))) + 1
    jax.lax.while_loop(
        lambda arrived: arrived < programs,  # the reduction stays in the body, out of the loop's condition
        lambda _: jnp.min(plgpu.atomic_add(counter_ref, lanes, jnp.zeros((1, counter_ref.shape[1]), jnp.int32))),
        arrived)
    if not interpret:
        plgpu.debug_barrier()


def _for_each_item(count, programs, body):
    """body(item) for this program's share of items 0..count-1: pid, pid + programs, ..."""
    pid = pl.program_id(0)

    def run(i, carry):
        body(pid + i * programs)
        return carry

    jax.lax.fori_loop(0, (count - pid + programs - 1) // programs, run, 0)


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
    """fused_layer's static work split: each phase's items per batch row and how an item is computed."""

    qkv_items: int
    qkv: _NormProjection
    spans: int
    attention: dict  # _ring_attention_item's constants
    out_items: int
    out: _AttendProjection
    mlp_items: int
    mlp: _NormProjection
    down_items: int
    down: _ResidualProjection

    def one_item_each(self, batch: int, programs: int) -> bool:
        """Whether every projection phase has at most one item per program, so that a program can load its next
        phase's weights before the barrier in between."""
        return batch == 1 and max(self.qkv_items, self.out_items, self.mlp_items, self.down_items) <= programs


def _rows_per_item(divides: int, items_of, batch: int, programs: int) -> int:
    """The fewest rows (a power of two dividing `divides`, at least PROJECTION_ROWS where that divides, at most
    MOST_ITEM_ROWS, which a program holds in registers) that leave no more items than programs, so that a
    program's loads are issued at once rather than in turn."""
    rows = _largest_power_of_two_dividing(divides, PROJECTION_ROWS)
    while batch * items_of(rows) > programs and divides % (2 * rows) == 0 and rows < MOST_ITEM_ROWS:
        rows *= 2
    return rows


def _layer_plan(x_shape, layer: LayerWeights, cache: KVCache, pattern: Pattern, *, eps, heads, head_dim, programs):
    batch, d = x_shape
    kv_heads, slots = cache.k.shape[2], cache.k.shape[1]
    columns, hidden = layer.qkv.shape[0], layer.gate.shape[0]
    qkv_rows = _rows_per_item(head_dim // 2, lambda rows: columns // rows // 2, batch, programs)
    out_rows = _rows_per_item(d, lambda rows: d // rows, batch, programs)
    mlp_rows = _rows_per_item(hidden, lambda rows: hidden // rows, batch, programs)
    span = _largest_power_of_two_dividing(slots, ATTENTION_SPAN)
    return _LayerPlan(
        qkv_items=columns // qkv_rows // 2,
        qkv=_NormProjection(eps=eps[0], epilogue="rope", head_dim=head_dim, rope_heads=heads + kv_heads,
                            rows=qkv_rows, chunk=_largest_power_of_two_dividing(d, REDUCTION_CHUNK)),
        spans=slots // span,
        attention=dict(pattern=pattern, layout=cache.layout, heads=heads, head_dim=head_dim,
                       group=heads // kv_heads, span=span, scale=1.0 / math.sqrt(head_dim)),
        out_items=d // out_rows,
        out=_AttendProjection(rows=out_rows,
                              head_chunk=_largest_power_of_two_dividing(heads, max(1, ATTENDED_CHUNK // head_dim))),
        mlp_items=hidden // mlp_rows,
        mlp=_NormProjection(eps=eps[1], epilogue="swiglu", head_dim=head_dim, rope_heads=0, rows=mlp_rows,
                            chunk=_largest_power_of_two_dividing(d, REDUCTION_CHUNK)),
        down_items=d // out_rows,
        down=_ResidualProjection(rows=out_rows, chunk=_largest_power_of_two_dividing(hidden, REDUCTION_CHUNK)))


def _fused_layer_kernel(x_ref, position_ref, cos_ref, sin_ref, attention_norm_ref, qkv_w_ref, out_w_ref, mlp_norm_ref,
                        gate_ref, up_ref, down_ref, k_ref, v_ref, positions_ref, _counter_in_ref,
                        x_out_ref, k_out_ref, v_out_ref, positions_out_ref, counter_ref, qkv_ref, partial_ref, lse_ref,
                        mid_ref, hidden_ref, *, plan: _LayerPlan, programs, first_barrier, interpret):
    batch, kv_heads = x_ref.shape[0], k_ref.shape[2]
    pid = pl.program_id(0)

    def barrier(i):
        _grid_barrier(counter_ref, first_barrier + i, programs, interpret)

    def phase(items_per_row, body):  # body(batch row, item of the row), for this program's share of the items
        _for_each_item(batch * items_per_row, programs, lambda item: body(item // items_per_row, item % items_per_row))

    # Each projection phase as (items per row, its weight rows for an item, what an item computes from them).
    projections = [
        (plan.qkv_items, lambda j: plan.qkv.tiles(j, (qkv_w_ref,)), lambda b, j, tiles: plan.qkv.item(
            b, j, tiles, x_ref, attention_norm_ref, (cos_ref, sin_ref), qkv_ref)),
        (plan.out_items, lambda j: plan.out.tiles(j, out_w_ref), lambda b, j, tiles: plan.out.item(
            b, j, tiles, partial_ref, lse_ref, x_ref, mid_ref)),
        (plan.mlp_items, lambda j: plan.mlp.tiles(j, (gate_ref, up_ref)), lambda b, j, tiles: plan.mlp.item(
            b, j, tiles, mid_ref, mlp_norm_ref, (), hidden_ref)),
        (plan.down_items, lambda j: plan.down.tiles(j, down_ref), lambda b, j, tiles: plan.down.item(
            b, j, tiles, hidden_ref, mid_ref, x_out_ref))]

    def attention():
        phase(kv_heads * plan.spans, lambda b, j: _ring_attention_item(
            b, j // plan.spans, j % plan.spans, qkv_ref, position_ref, k_ref, v_ref, positions_ref, partial_ref,
            lse_ref, k_out_ref, v_out_ref, positions_out_ref, **plan.attention))

    if PREFETCH_WEIGHTS and plan.one_item_each(batch, programs):
        # A program's next weights are loaded before the barrier, so their latency overlaps the wait. Programs
        # past a phase's items load the last item's rows (cached) and store nothing.
        def load(index):
            items, tiles, _ = projections[index]
            return tiles(jnp.minimum(pid, items - 1))

        def compute(index, tiles):
            items, _, body = projections[index]
            pl.when(pid < items)(lambda: body(0, pid, tiles))

        compute(0, load(0))
        barrier(0)
        attention()
        tiles = load(1)
        barrier(1)
        compute(1, tiles)
        tiles = load(2)
        barrier(2)
        compute(2, tiles)
        tiles = load(3)
        barrier(3)
        compute(3, tiles)
        return

    def projection_phase(index):
        items, tiles, body = projections[index]
        phase(items, lambda b, j: body(b, j, tiles(j)))

    projection_phase(0)
    barrier(0)
    attention()
    barrier(1)
    projection_phase(1)
    barrier(2)
    projection_phase(2)
    barrier(3)
    projection_phase(3)


def fused_layer(x, layer: LayerWeights, rope, position, cache: KVCache, pattern: Pattern, counter, *,
                first_barrier: int, eps: tuple[float, float], heads: int, head_dim: int, programs: int,
                interpret: bool = False):
    """fused_layer_reference for a bounded cache in one kernel of `programs` programs, which run the five phases
    in turn with a grid-wide barrier between them, each program taking its share of every phase's items; so a
    layer is one launch, not five. counter: int32 [n, BARRIER_LANES] of zeros at BARRIERS_PER_LAYER rows from
    first_barrier, which the barriers count on (one array for a whole step: one memset); returned with them used.

    `programs` must not exceed what the device runs at once (its multiprocessors: one program fits on each), or
    the barriers wait forever; in interpret mode programs run one after another, so there it must be 1."""
    if interpret and programs != 1:
        raise ValueError(f"fused_layer programs must be 1 in interpret mode (programs run in turn); got {programs}")
    batch, d = x.shape
    _, slots, kv_heads, _ = cache.k.shape
    plan = _layer_plan(x.shape, layer, cache, pattern, eps=eps, heads=heads, head_dim=head_dim, programs=programs)
    kernel = functools.partial(_fused_layer_kernel, plan=plan, programs=programs, first_barrier=first_barrier,
                               interpret=interpret)
    dtype = layer.qkv.dtype
    out_shape = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                 jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype), jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype),
                 jax.ShapeDtypeStruct(cache.positions.shape, jnp.int32), jax.ShapeDtypeStruct(counter.shape, jnp.int32),
                 # scratch, each written in one phase and read in the next
                 jax.ShapeDtypeStruct((batch, layer.qkv.shape[0]), dtype),
                 jax.ShapeDtypeStruct((batch, plan.spans, heads, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, plan.spans, heads), jnp.float32),
                 jax.ShapeDtypeStruct(x.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, layer.gate.shape[0]), dtype))
    cos, sin = rope
    x, k, v, positions, counter, *_ = _call(
        kernel, grid=(programs,), out_shape=out_shape, interpret=interpret, name="decode_fused_layer",
        num_warps=LAYER_WARPS, input_output_aliases={11: 1, 12: 2, 13: 3, 14: 4})(
            x, position, cos, sin, layer.attention_norm, layer.qkv, layer.out.reshape(d, heads, head_dim),
            layer.mlp_norm, layer.gate, layer.up, layer.down, cache.k, cache.v, cache.positions, counter)
    return x, dataclasses.replace(cache, k=k, v=v, positions=positions), counter


def resident_programs(interpret: bool) -> int:
    """fused_layer's programs: one per multiprocessor of the GPU (all resident at once), 1 in interpret mode."""
    return 1 if interpret else jax.devices()[0].core_count


def decode_step(model: DecoderLM, weights: list[LayerWeights], tokens, caches: list[KVCache], position, *,
                interpret: bool = False, programs: int | None = None):
    """DecoderLM.decode through the fused kernels: tokens int32 [batch, 1] at `position` (traced int) ->
    (logits float32 [batch, 1, vocab], the caches updated). `weights`: LayerWeights.of(model). A layer with a
    bounded cache is one fused_layer kernel of `programs` programs (resident_programs where None); one whose
    cache keeps every position, four kernels around XLA's attention."""
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    config = model.model_config
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    programs = resident_programs(interpret) if programs is None else programs
    x = model.embed_tokens(tokens)[:, 0]  # float32 [batch, d_model]
    position = jnp.reshape(jnp.asarray(position, jnp.int32), (1,))
    rope = rope_angles_at(position, head_dim, config.rope_base)  # float32 [1, head_dim // 2] each
    counter = jnp.zeros((BARRIERS_PER_LAYER * len(caches), BARRIER_LANES), jnp.int32)
    updated = []
    for index, (block, layer, cache) in enumerate(zip(model.blocks, weights, caches, strict=True)):
        pattern = block.attention.pattern
        if cache.layout.bounded:
            x, cache, counter = fused_layer(
                x, layer, rope, position, cache, pattern, counter, first_barrier=BARRIERS_PER_LAYER * index,
                eps=(block.attention_norm.epsilon, block.mlp_norm.epsilon), heads=heads, head_dim=head_dim,
                programs=programs, interpret=interpret)
            updated.append(cache)
            continue
        qkv = norm_project(x, layer.attention_norm, (layer.qkv,), rope, eps=block.attention_norm.epsilon,
                           epilogue="rope", head_dim=head_dim, rope_heads=heads + kv_heads, interpret=interpret)
        # XLA reads a cache as long as the sequence near the copy rate
        partial, lse, cache = ring_attention_reference(qkv, position, cache, pattern, heads=heads, head_dim=head_dim)
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
    run), and for "auto" the fused step where it was measured faster, on a GPU at batch 1 (0.43-0.78x the XLA
    step's time at 128k on the H200; at batch 16 it took 1.03-1.75x; docs/benchmarks.md), else XLA's. Logged."""
    check_impl(impl, model, interpret=interpret)
    if impl != "auto":
        return impl
    refusal = _triton_refusal(model, interpret=False) or (None if batch == 1 else f"batch {batch} > 1")
    chosen = "xla" if refusal else "triton"
    log.info("decode impl=auto ran %s (%s)", chosen, refusal or "a GPU at batch 1")
    return chosen
