"""A byte-level decoder LM whose layers attend through `sparse_attention.attention` (Flax NNX).

  SparseAttention   library attention layer: q/k/v projections, RoPE, sparse attention, output projection
  DecoderLM         embeddings -> num_layers x [pre-norm attention, pre-norm SwiGLU MLP] -> RMSNorm -> logits;
                    `prefill` and `decode` run the same layers over a prompt and then one token at a time,
                    through per-layer KV caches (`sparse_attention.decoding`; lm_experiment.generation)

Numerics: parameters in param_dtype (float32), matmuls in compute_dtype (bfloat16 on accelerators), the
residual stream, norms' statistics and the logits in float32.

Initialisation: input projections are LeCun-normal (variance 1 / fan_in). Projections that write into
the residual stream (attention output, MLP down) are scaled by 1 / sqrt(2 * num_layers), so the stream
starts near its embedding and every block starts near identity. Embeddings have standard deviation
1 / sqrt(d_model) and are multiplied by sqrt(d_model) on input, so the stream starts at unit scale. Tied
output logits are h . E^T / sqrt(d_model) (without that factor each token's logit for itself would start
near sqrt(d_model) and the first loss far above ln(vocab)); an untied head starts with standard deviation
1 / d_model. Either way the first loss is about ln(vocab_size).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm_experiment.config import AttentionConfig, ExperimentConfig, ModelConfig
from sparse_attention import decoding, reference, sequence_sharding
from sparse_attention.attention import attention, resolve_impl
from sparse_attention.decoding import KVCache
from sparse_attention.selection import select_blocks, selection_mask
from sparse_attention.patterns import Pattern, as_pattern


def rope_angles(seq_len: int, head_dim: int, base: float):
    """(cos, sin), float32 [seq_len, head_dim // 2]: position p turns pair i by p * base^(-2i / head_dim)."""
    return rope_angles_at(jnp.arange(seq_len), head_dim, base)


def rope_angles_at(positions, head_dim: int, base: float):
    """rope_angles at the given positions, int [n] -> (cos, sin) float32 [n, head_dim // 2]."""
    inverse_frequency = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.asarray(positions, jnp.float32)[:, None] * inverse_frequency[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotary position embedding of x [batch, seq, heads, head_dim], pairing dim i with i + head_dim / 2."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _residual_init(output_scale: float):
    """LeCun-normal scaled by `output_scale`, for projections that write into the residual stream."""
    return nnx.initializers.variance_scaling(output_scale**2, "fan_in", "truncated_normal")


class SparseAttention(nnx.Module):
    """Multi-head (or grouped-query) self-attention restricted to one causal sparse pattern.

    x [batch, seq, d_model] -> [batch, seq, d_model]. head_dim = d_model // num_heads; num_kv_heads
    divides num_heads. `output_scale` scales the output projection's initialisation (DecoderLM passes
    1 / sqrt(2 * num_layers)). With `sequence_axis`, the pattern's attention runs under shard_map over the
    context mesh (`jax.set_mesh`), the sequence split over that axis (`sequence_sharding.sharded_attention`)
    and the batch over the mesh's other axes.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        pattern: Pattern | str,
        *,
        impl: str = "auto",
        interpret: bool = False,
        rope_base: float = 10000.0,
        compute_dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        output_scale: float = 1.0,
        sequence_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(
                f"num_heads must divide d_model into an even head_dim (RoPE); got d_model={d_model}, "
                f"num_heads={num_heads}"
            )
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads; got {num_kv_heads} and {num_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.pattern = as_pattern(pattern)
        self.impl = impl
        self.interpret = interpret
        self.rope_base = float(rope_base)
        self.compute_dtype = compute_dtype
        self.sequence_axis = sequence_axis

        def linear(out_features, **kwargs):
            return nnx.Linear(
                d_model, out_features, use_bias=False, dtype=compute_dtype, param_dtype=param_dtype,
                rngs=rngs, **kwargs,
            )

        self.q_proj = linear(num_heads * self.head_dim)
        self.k_proj = linear(num_kv_heads * self.head_dim)
        self.v_proj = linear(num_kv_heads * self.head_dim)
        self.out_proj = nnx.Linear(
            num_heads * self.head_dim, d_model, use_bias=False, dtype=compute_dtype, param_dtype=param_dtype,
            kernel_init=_residual_init(output_scale), rngs=rngs,
        )

    def _project(self, x, positions):
        """x [batch, seq, d_model] at positions int [seq] -> q [batch, seq, heads, head_dim] and k, v
        [batch, seq, kv_heads, head_dim], RoPE applied to q and k."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        cos, sin = rope_angles_at(positions, self.head_dim, self.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _output(self, out):
        """[batch, seq, heads, head_dim] -> [batch, seq, d_model]."""
        batch, seq_len = out.shape[:2]
        return self.out_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))

    def __call__(self, x, mask=None, choose=None):
        """`mask` bool [seq, seq], if given, replaces the pattern: dense masked softmax
        (`reference.masked_attention`), so that one compiled model can serve many patterns. With it, `choose`
        (a bool, traced or not) also attends, where true, the blocks this layer's `topk` pattern chooses on x."""
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        if mask is None:
            out = self._attend(q, k, v)
        else:
            topk = self.pattern.block_selection()
            if choose is not None and topk is not None:
                chosen = selection_mask(select_blocks(q, k, topk.size, topk.count), topk.size, x.shape[1])
                mask = mask | (chosen & choose)[:, :, None]  # [batch, kv_heads, 1, seq, seq]
            out = reference.masked_attention(q, k, v, mask, scale=1.0 / math.sqrt(self.head_dim))
        return self._output(out)

    def _attend(self, q, k, v):
        if self.sequence_axis is None:
            return attention(q, k, v, self.pattern, impl=self.impl, interpret=self.interpret)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or self.sequence_axis not in mesh.axis_names:
            raise ValueError(f"sequence_axis {self.sequence_axis!r} needs a context mesh with that axis "
                             f"(jax.set_mesh); got axes {mesh.axis_names}")
        spec = P(tuple(name for name in mesh.axis_names if name != self.sequence_axis), self.sequence_axis)
        local = functools.partial(sequence_sharding.sharded_attention, pattern=self.pattern,
                                  axis_name=self.sequence_axis, impl=self.impl, interpret=self.interpret)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)

    def chosen_blocks(self, x):
        """For a `topk` pattern, the blocks it chooses for x [batch, seq, d_model]: int32 [batch, kv_heads,
        query blocks, K] (`selection.select_blocks`); None for a static pattern."""
        topk = self.pattern.block_selection()
        if topk is None:
            return None
        q, k, _ = self._project(x, jnp.arange(x.shape[1]))
        return select_blocks(q, k, topk.size, topk.count)

    def prefill(self, x, cache: KVCache):
        """The pass over a prompt x [batch, prompt, d_model] through the pattern's kernels, and the empty
        `cache` filled with its keys and values."""
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        out = attention(q, k, v, self.pattern, impl=self.impl, interpret=self.interpret)
        return self._output(out), cache.fill(k, v)

    def decode(self, x, cache: KVCache, position):
        """One token x [batch, 1, d_model] at `position` (traced int) attending through the cache."""
        q, k, v = self._project(x, jnp.reshape(position, (1,)))
        cache = cache.write(k, v, position)
        return self._output(decoding.decode_attention(q, cache, position, self.pattern)), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): [batch, seq, d_model] -> [batch, seq, d_model]."""

    def __init__(self, d_model: int, hidden: int, *, compute_dtype, param_dtype, output_scale: float,
                 rngs: nnx.Rngs):
        def linear(n_in, n_out, **kwargs):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=compute_dtype, param_dtype=param_dtype,
                              rngs=rngs, **kwargs)

        self.gate = linear(d_model, hidden)
        self.up = linear(d_model, hidden)
        self.down = linear(hidden, d_model, kernel_init=_residual_init(output_scale))

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """x + attention(norm(x)), then + mlp(norm(x)); the residual stream x stays float32."""

    def __init__(self, model: ModelConfig, attention_config: AttentionConfig, layer_index: int, *,
                 sequence_axis: str | None = None, rngs: nnx.Rngs):
        compute, params = model.compute_jnp_dtype, model.param_jnp_dtype
        output_scale = 1.0 / math.sqrt(2 * model.num_layers)

        def norm():
            return nnx.RMSNorm(model.d_model, dtype=compute, param_dtype=params, rngs=rngs)

        self.attention_norm = norm()
        self.attention = SparseAttention(
            model.d_model, model.num_heads, model.num_kv_heads, attention_config.layer_pattern(layer_index),
            impl=attention_config.impl, interpret=attention_config.interpret, rope_base=model.rope_base,
            compute_dtype=compute, param_dtype=params, output_scale=output_scale, sequence_axis=sequence_axis,
            rngs=rngs,
        )
        self.mlp_norm = norm()
        self.mlp = SwiGLU(model.d_model, model.mlp_hidden, compute_dtype=compute, param_dtype=params,
                          output_scale=output_scale, rngs=rngs)

    def __call__(self, x, mask=None, choose=None):
        return self._mlp_residual(x + self.attention(self.attention_norm(x), mask, choose).astype(jnp.float32))

    def prefill(self, x, cache: KVCache):
        out, cache = self.attention.prefill(self.attention_norm(x), cache)
        return self._mlp_residual(x + out.astype(jnp.float32)), cache

    def decode(self, x, cache: KVCache, position):
        out, cache = self.attention.decode(self.attention_norm(x), cache, position)
        return self._mlp_residual(x + out.astype(jnp.float32)), cache

    def _mlp_residual(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


def _apply_block(block: DecoderBlock, x, mask, choose):
    return block(x, mask, choose)


_apply_block_remat = nnx.remat(_apply_block)


class DecoderLM(nnx.Module):
    """tokens int32 [batch, seq] -> logits float32 [batch, seq, vocab_size]; layer i uses
    `attention.layer_pattern(i)`, or masks[i] when `masks` bool [num_layers, seq, seq] is given.
    `sequence_axis`: the context mesh's axis that every layer's attention splits the sequence over (the
    Trainer's mesh.seq), or None."""

    def __init__(self, model: ModelConfig, attention: AttentionConfig, *, rngs: nnx.Rngs,
                 sequence_axis: str | None = None):
        compute, params = model.compute_jnp_dtype, model.param_jnp_dtype
        self.model_config = model
        self.attention_config = attention
        embedding_std = 1.0 / math.sqrt(model.d_model)
        self.embed = nnx.Embed(
            model.vocab_size, model.d_model, dtype=compute, param_dtype=params,
            embedding_init=nnx.initializers.normal(embedding_std), rngs=rngs,
        )
        self.blocks = nnx.List([DecoderBlock(model, attention, i, sequence_axis=sequence_axis, rngs=rngs)
                                for i in range(model.num_layers)])
        self.final_norm = nnx.RMSNorm(model.d_model, dtype=compute, param_dtype=params, rngs=rngs)
        if model.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                model.d_model, model.vocab_size, use_bias=False, dtype=compute, param_dtype=params,
                kernel_init=nnx.initializers.normal(1.0 / model.d_model), preferred_element_type=jnp.float32,
                rngs=rngs,
            )

    def embed_tokens(self, tokens):
        """tokens int32 [batch, seq] -> float32 [batch, seq, d_model], the residual stream's input."""
        # Rows are gathered from the float32 table and rounded to compute_dtype afterwards (the same values
        # as nnx.Embed's cast-then-gather), so the gradient's scatter-add runs in float32. In bfloat16 it
        # summed a batch's hundred thousand rows into a few hundred with bfloat16 rounding (errors of ~15 %
        # of the largest entry) and, on the H200, took 140-400 ms of a 170 ms step (results/lm_compare/
        # step_time/).
        rows = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(self.model_config.compute_jnp_dtype)
        return rows.astype(jnp.float32) * math.sqrt(self.model_config.d_model)

    def logits_from_embeddings(self, x, masks=None, repeats: int = 1, choose=None):
        """Residual stream input x [batch, seq, d_model] -> logits float32 [batch, seq, vocab_size].

        repeats > 1 runs the stack of blocks that many times with the same weights (a looped model of depth
        repeats * num_layers); masks, when given, then holds one mask per block application, and `choose`
        (a bool) adds the blocks each layer's `topk` pattern chooses (`SparseAttention.__call__`).
        """
        apply_block = _apply_block_remat if self.model_config.remat else _apply_block
        applications = [block for _ in range(repeats) for block in self.blocks]
        for index, block in enumerate(applications):
            x = apply_block(block, x, None if masks is None else masks[index], choose)
        return self._head(x)

    def block_choices(self, tokens) -> dict[int, jax.Array]:
        """tokens int32 [batch, seq] -> {layer: int32 [batch, kv_heads, query blocks, K]}: the blocks each
        `topk` layer chooses on this input (empty for static patterns)."""
        x, choices = self.embed_tokens(tokens), {}
        for index, block in enumerate(self.blocks):
            chosen = block.attention.chosen_blocks(block.attention_norm(x))
            if chosen is not None:
                choices[index] = chosen
            x = block(x)
        return choices

    def empty_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty decoding cache per layer, each as large as that layer's pattern needs for sequences of
        up to max_len positions (`decoding.CacheLayout.for_pattern`)."""
        model = self.model_config
        return [KVCache.empty(decoding.CacheLayout.for_pattern(block.attention.pattern, max_len), batch,
                              model.num_kv_heads, model.head_dim, model.compute_jnp_dtype) for block in self.blocks]

    def prefill(self, tokens, caches: list[KVCache]):
        """tokens int32 [batch, prompt] -> (logits float32 [batch, prompt, vocab], the caches filled)."""
        x = self.embed_tokens(tokens)
        filled = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.prefill(x, cache)
            filled.append(cache)
        return self._head(x), filled

    def decode(self, tokens, caches: list[KVCache], position):
        """tokens int32 [batch, 1] at `position` -> (logits float32 [batch, 1, vocab], the caches updated)."""
        x = self.embed_tokens(tokens)
        updated = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode(x, cache, position)
            updated.append(cache)
        return self._head(x), updated

    def _head(self, x):
        """Residual stream [batch, seq, d_model] -> logits float32 [batch, seq, vocab_size]."""
        h = self.final_norm(x)
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        compute = self.model_config.compute_jnp_dtype
        logits = jnp.einsum(
            "bsd,vd->bsv", h.astype(compute), self.embed.embedding[...].astype(compute),
            preferred_element_type=jnp.float32,
        )
        return logits / math.sqrt(self.model_config.d_model)

    def __call__(self, tokens, masks=None, repeats: int = 1, choose=None):
        return self.logits_from_embeddings(self.embed_tokens(tokens), masks, repeats, choose)


def attention_impl_summary(model_or_configs, seq_len: int) -> str:
    """One line saying which attention implementation each layer's pattern runs with at `seq_len`.

    `model_or_configs`: a DecoderLM, an ExperimentConfig, or a (ModelConfig, AttentionConfig) pair.
    Resolved on abstract [1, seq_len, heads, head_dim] shapes, so nothing is computed. Raises ValueError
    if an explicitly requested impl cannot run here.
    """
    if isinstance(model_or_configs, DecoderLM):
        model, attention_config = model_or_configs.model_config, model_or_configs.attention_config
    elif isinstance(model_or_configs, ExperimentConfig):
        model, attention_config = model_or_configs.model, model_or_configs.attention
    else:
        model, attention_config = model_or_configs
    q = jax.ShapeDtypeStruct((1, seq_len, model.num_heads, model.head_dim), model.compute_jnp_dtype)
    kv = jax.ShapeDtypeStruct((1, seq_len, model.num_kv_heads, model.head_dim), model.compute_jnp_dtype)
    layers_of: dict[Pattern, list[int]] = {}
    for index in range(model.num_layers):
        layers_of.setdefault(attention_config.layer_pattern(index), []).append(index)
    parts = []
    for pattern, layers in layers_of.items():
        chosen, why = resolve_impl(attention_config.impl, q, kv, kv, pattern, interpret=attention_config.interpret)
        where = "all layers" if len(layers) == model.num_layers else f"layers {','.join(map(str, layers))}"
        parts.append(f"{pattern.spec} on {where} -> {chosen} ({why})")
    return f"attention impl={attention_config.impl} at seq_len={seq_len}: " + "; ".join(parts)
