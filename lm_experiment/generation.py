"""Text generation from a trained DecoderLM: a prompt prefilled through the attention kernels, then tokens
decoded one at a time through bounded per-layer KV caches (`sparse_attention.decoding`).

    tokens = generate(model, prompt_tokens, max_new_tokens=200, sampling=Sampling(temperature=0.8, top_p=0.95),
                      seed=0, trained_seq_len=config.train.seq_len)

A layer whose pattern has a bounded reach (block, window, repaired, sinks | window, dilated) keeps a cache of
that reach whatever the length, so memory and time per token stay flat. A layer that needs the whole past
(dense, strided, random_blocks) keeps every position, and is limited to the trained context: RoPE makes
attention depend on q - k, and such a layer would meet offsets it never saw in training, while local layers
never look further back than their reach.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm_experiment import fused_decode
from lm_experiment.model import DecoderLM
from sparse_attention.decoding import KVCache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); otherwise softmax(logits / temperature) cut to the smallest set of
    most likely tokens whose probability reaches top_p (nucleus sampling; top_p 1: no cut)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample(logits, sampling: Sampling, key):
    """Next tokens, int32 [batch], from logits float32 [batch, vocab]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probabilities = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the probability of the more likely ones is below top_p: the first always stays.
        before = jnp.cumsum(probabilities, axis=-1) - probabilities
        cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_lengths(model: DecoderLM, prompt_len: int, max_new_tokens: int, trained_seq_len: int) -> None:
    """ValueError naming the field when the prompt is empty, nothing is asked for, or a layer that needs the
    whole past would go beyond the trained context."""
    if prompt_len < 1:
        raise ValueError("prompt: must hold at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = prompt_len + max_new_tokens
    unbounded = sorted({block.attention.pattern.spec for block in model.blocks
                        if block.attention.pattern.key_extent().recent is None})
    if unbounded and total > trained_seq_len:
        raise ValueError(
            f"prompt: {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the trained context "
            f"of {trained_seq_len}, and {', '.join(unbounded)} needs the whole past; shorten the prompt or "
            f"ask for fewer tokens")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, prompt, max_len: int):
    model = nnx.merge(graphdef, state)
    logits, caches = model.prefill(prompt, model.empty_caches(prompt.shape[0], max_len))
    return logits[:, -1], caches


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampling", "impl", "interpret"))
def _decode(graphdef, state, caches, first_logits, start, key, steps: int, sampling: Sampling, impl: str,
            interpret: bool):
    model = nnx.merge(graphdef, state)
    if fused_decode.choose_impl(impl, model, caches[0].k.shape[0], interpret=interpret) == "triton":
        decode_one = functools.partial(fused_decode.decode_step, model, fused_decode.LayerWeights.of(model),
                                       interpret=interpret)
    else:
        decode_one = model.decode

    def step(carry, key):
        caches, logits, position = carry
        token = sample(logits, sampling, key)
        out, caches = decode_one(token[:, None], caches, position)
        return (caches, out[:, 0], position + 1), token

    keys = jax.random.split(key, steps)
    _, tokens = jax.lax.scan(step, (caches, first_logits, start), keys)
    return tokens.T


def split_for_inference(model: DecoderLM):
    """(graphdef, state) with the floating parameters rounded to the compute dtype once. Every layer rounds
    its parameters to compute_dtype before using them (Linear kernels, norm scales, embedding rows), so the
    outputs are the same, and a decoding step reads half the weight bytes and runs no conversions."""
    graphdef, state = nnx.split(model)
    compute = model.model_config.compute_jnp_dtype

    def rounded(x):
        narrower = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits > jnp.finfo(compute).bits
        return x.astype(compute) if narrower else x

    return graphdef, jax.tree.map(rounded, state)


def prefill(model: DecoderLM, prompt, max_len: int) -> tuple[jax.Array, list[KVCache]]:
    """(logits float32 [batch, vocab] after the prompt int32 [batch, length], the caches for sequences of up
    to max_len positions holding it); one jitted call through the pattern's kernels."""
    graphdef, state = split_for_inference(model)
    return _prefill(graphdef, state, prompt, max_len)


def decoder(model: DecoderLM, steps: int, sampling: Sampling = Sampling(), *, impl: str = "auto",
            interpret: bool = False):
    """The jitted decoding loop of `model` as a function (caches, logits, start, key) -> int32 [batch, steps]:
    the first token sampled from logits [batch, vocab] and placed at position `start` (int32), each then
    decoded through the caches to give the next one's logits, in one lax.scan. The model is split once, so
    repeated calls (a benchmark's) cost no host work beyond the dispatch. `impl`: the decoding step, "xla"
    (`DecoderLM.decode`), "triton" (`fused_decode.decode_step`) or "auto" (`fused_decode.choose_impl`)."""
    graphdef, state = split_for_inference(model)
    fused_decode.check_impl(impl, model, interpret=interpret)
    return functools.partial(_decode, graphdef, state, steps=steps, sampling=sampling, impl=impl,
                             interpret=interpret)


def generate(model: DecoderLM, prompt, max_new_tokens: int, *, sampling: Sampling = Sampling(), seed: int = 0,
             trained_seq_len: int, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """prompt int32 [batch, prompt_len] (every row the same length) -> int32 [batch, max_new_tokens], the
    tokens that follow it."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be int tokens [batch, length], got shape {prompt.shape}")
    check_lengths(model, prompt.shape[1], max_new_tokens, trained_seq_len)
    fused_decode.check_impl(impl, model, interpret=interpret)
    graphdef, state = split_for_inference(model)  # once for both calls
    logits, caches = _prefill(graphdef, state, prompt, prompt.shape[1] + max_new_tokens)
    return _decode(graphdef, state, caches, logits, jnp.int32(prompt.shape[1]), jax.random.key(seed),
                   max_new_tokens, sampling, impl, interpret)
