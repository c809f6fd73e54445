import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.model import DecoderLM, SparseAttention, apply_rope, attention_impl_summary, rope_angles
from sparse_attention import attention
from sparse_attention.patterns import as_schedule, parse

SMALL_MODEL = ModelConfig(
    vocab_size=260, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=48,
    tie_embeddings=False, remat=False, rope_base=10000.0, compute_dtype="float32", param_dtype="float32",
)


def attention_config(pattern="dense", schedule=(), impl="auto"):
    return AttentionConfig(pattern=pattern, schedule=schedule, impl=impl, interpret=False)


def manual_rope(x, base):
    """RoPE as complex rotation: pair (x_i, x_{i + d/2}) times exp(1j * position * base^(-2i/d))."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(np.complex128) + 1j * x[..., half:]
    position = np.arange(x.shape[1])[None, :, None, None]
    z = z * np.exp(1j * position * base ** (-2.0 * np.arange(half) / x.shape[-1]))
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_is_a_rotation_by_position():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 3, 8)))
    cos, sin = rope_angles(9, 8, 500.0)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), cos, sin), manual_rope(x, 500.0), rtol=1e-5, atol=1e-5)
    # Scores of rotated q, k depend only on the distance: shifting both positions keeps q . k.
    q, k = np.asarray(jax.random.normal(jax.random.key(1), (2, 8)))
    tiled = np.zeros((1, 9, 2, 8))
    tiled[0, :, 0], tiled[0, :, 1] = q, k
    rotated = manual_rope(tiled, 500.0)[0]
    scores = [rotated[i + 3, 0] @ rotated[i, 1] for i in range(6)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-9)


@pytest.mark.parametrize("pattern", ["repaired(8, 3, bridge)", parse("window(5) | sinks(2)")])
def test_sparse_attention_layer_matches_manual_computation(pattern):
    d_model, heads, kv_heads, seq = 32, 4, 2, 40
    layer = SparseAttention(d_model, heads, kv_heads, pattern, rope_base=100.0, compute_dtype=jnp.float32,
                            rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, seq, d_model))
    head_dim = d_model // heads
    q = np.asarray(x @ layer.q_proj.kernel[...]).reshape(2, seq, heads, head_dim)
    k = np.asarray(x @ layer.k_proj.kernel[...]).reshape(2, seq, kv_heads, head_dim)
    v = np.asarray(x @ layer.v_proj.kernel[...]).reshape(2, seq, kv_heads, head_dim)
    q, k = (jnp.asarray(manual_rope(t, 100.0), jnp.float32) for t in (q, k))
    out = attention(q, k, jnp.asarray(v), pattern, impl="reference")
    expected = out.reshape(2, seq, heads * head_dim) @ layer.out_proj.kernel[...]
    np.testing.assert_allclose(layer(x), expected, rtol=2e-4, atol=2e-5)
    # As a library layer it is differentiable and keeps its pattern, whatever the input length.
    grads = nnx.grad(lambda m: m(x[:, :17]).sum())(layer)
    assert np.abs(grads.k_proj.kernel[...]).sum() > 0


def test_sparse_attention_rejects_schedules_and_bad_heads():
    with pytest.raises(ValueError, match="per-layer schedule"):
        SparseAttention(32, 4, 2, "shifted(8)", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        SparseAttention(32, 4, 3, "dense", rngs=nnx.Rngs(0))


def reachable(schedule, num_layers: int, seq_len: int) -> np.ndarray:
    """bool [seq_len, seq_len]: whether key position j can influence query position i through the layers."""
    positions = np.arange(seq_len)
    reach = np.eye(seq_len, dtype=bool)
    for index in range(num_layers):
        step = schedule.layer(index).mask(positions[:, None], positions[None, :]) | np.eye(seq_len, dtype=bool)
        reach = (step.astype(np.int64) @ reach.astype(np.int64)) > 0
    return reach


def influence(model: DecoderLM, tokens) -> np.ndarray:
    """bool [seq, seq]: whether d logits[0, i] / d embedding[0, j] is nonzero (random vocab weights)."""
    x = model.embed_tokens(tokens)
    logits, pullback = jax.vjp(model.logits_from_embeddings, x)
    seq, vocab = logits.shape[1], logits.shape[2]
    weights = jax.random.normal(jax.random.key(7), (vocab,))
    cotangents = jnp.eye(seq)[:, None, :, None] * weights  # [seq_i, batch, seq, vocab]
    (grads,) = jax.vmap(pullback)(cotangents)  # [seq_i, batch, seq_j, d_model]
    return np.asarray(jnp.abs(grads[:, 0]).max(axis=-1) > 0)


LAYER_SCHEDULES = [
    ("dense", ()),
    ("block(8)", ()),
    ("window(4)", ()),
    ("repaired(8, 2, bridge)", ()),
    ("repaired(8, 3, prefix)", ()),
    ("shifted(8)", ()),
    ("dense", ("block(8)", "repaired(8, 2, bridge)", "window(3)")),
]


@pytest.mark.parametrize("pattern, schedule", LAYER_SCHEDULES)
def test_decoder_is_causal_and_each_layer_uses_its_pattern(pattern, schedule):
    model_config = dataclasses.replace(SMALL_MODEL, num_layers=3)
    config = attention_config(pattern, schedule)
    model = DecoderLM(model_config, config, rngs=nnx.Rngs(0))
    seq_len = 28
    tokens = jax.random.randint(jax.random.key(1), (1, seq_len), 0, 256)
    seen = influence(model, tokens)
    expected = reachable(as_schedule(schedule or pattern), model_config.num_layers, seq_len)
    assert not seen[np.triu_indices(seq_len, 1)].any()  # no query sees a later token
    np.testing.assert_array_equal(seen, expected)
    if pattern == "block(8)":  # fixed blocks never reach back across a boundary
        assert not seen[8, :8].any()


@pytest.mark.parametrize("spec", ["shifted(8)", "repaired(8, 2, prefix)"])
def test_masks_replace_the_layers_patterns(spec):
    """DecoderLM(tokens, masks) with a pattern's masks is the model built with that pattern, whatever the
    model was built with: the boundary tasks train many patterns through one compiled model this way."""
    model_config = dataclasses.replace(SMALL_MODEL, num_layers=3)
    built = DecoderLM(model_config, attention_config(spec, impl="reference"), rngs=nnx.Rngs(2))
    dense = DecoderLM(model_config, attention_config("dense", impl="reference"), rngs=nnx.Rngs(2))
    seq_len = 24
    positions = np.arange(seq_len)
    masks = jnp.stack([as_schedule(spec).layer(i).mask(positions[:, None], positions[None, :]) for i in range(3)])
    tokens = jax.random.randint(jax.random.key(3), (2, seq_len), 0, 256)
    np.testing.assert_allclose(dense(tokens, masks), built(tokens), rtol=1e-5, atol=1e-5)
    assert not np.allclose(dense(tokens), built(tokens), atol=1e-3)


def test_repeats_apply_the_same_blocks_again():
    """repeats=3 on a one-block model is that block applied three times (a looped model of depth 3), each
    application with its own mask."""
    model_config = dataclasses.replace(SMALL_MODEL, num_layers=1)
    model = DecoderLM(model_config, attention_config(impl="reference"), rngs=nnx.Rngs(4))
    seq_len = 16
    positions = np.arange(seq_len)
    masks = jnp.stack([as_schedule(spec).layer(0).mask(positions[:, None], positions[None, :])
                       for spec in ("block(4)", "window(3)", "dense")])
    tokens = jax.random.randint(jax.random.key(5), (2, seq_len), 0, 256)
    x = model.embed_tokens(tokens)
    for mask in masks:
        x = model.blocks[0](x, mask)
    expected = model.lm_head(model.final_norm(x))
    np.testing.assert_allclose(model(tokens, masks, repeats=3), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(tokens, masks[:1]), expected, atol=1e-3)


def test_gqa_and_tied_embedding_shapes():
    for tie in (False, True):
        model_config = dataclasses.replace(SMALL_MODEL, num_heads=8, num_kv_heads=2, tie_embeddings=tie)
        model = DecoderLM(model_config, attention_config("block(8)"), rngs=nnx.Rngs(0))
        layer = model.blocks[0].attention
        assert layer.q_proj.kernel.shape == (32, 8 * 4)
        assert layer.k_proj.kernel.shape == layer.v_proj.kernel.shape == (32, 2 * 4)
        assert layer.out_proj.kernel.shape == (32, 32)
        assert (model.lm_head is None) == tie
        params = nnx.state(model, nnx.Param)
        count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        per_block = 32 * (32 + 8 + 8 + 32) + 3 * 32 * 48 + 2 * 32
        assert count == 260 * 32 * (1 if tie else 2) + 2 * per_block + 32
        logits = model(jnp.zeros((3, 11), jnp.int32))
        assert logits.shape == (3, 11, 260) and logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model_config = dataclasses.replace(SMALL_MODEL, compute_dtype="bfloat16")
    model = DecoderLM(model_config, attention_config("window(4)"), rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    exact = DecoderLM(SMALL_MODEL, attention_config("window(4)"), rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(logits, exact, atol=0.05)


def test_remat_gives_the_same_loss_and_grads():
    tokens = jax.random.randint(jax.random.key(2), (2, 33), 0, 256)

    def loss_and_grads(remat):
        model_config = dataclasses.replace(SMALL_MODEL, remat=remat)
        model = DecoderLM(model_config, attention_config("repaired(8, 2, bridge)"), rngs=nnx.Rngs(5))

        def loss_fn(m):
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
        return loss, nnx.to_pure_dict(grads)

    loss, grads = loss_and_grads(False)
    loss_remat, grads_remat = loss_and_grads(True)
    assert abs(float(loss) - math.log(260)) < 0.1
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_remat, grads)
    assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_attention_impl_summary():
    config = attention_config("shifted(8)")
    model = DecoderLM(SMALL_MODEL, config, rngs=nnx.Rngs(0))
    summary = attention_impl_summary(model, 64)
    assert summary == (
        "attention impl=auto at seq_len=64: block(8) on layers 0 -> xla (auto on cpu); "
        "block(8, 4) on layers 1 -> xla (auto on cpu)"
    )
    requested = attention_impl_summary((SMALL_MODEL, attention_config("dense", impl="reference")), 64)
    assert requested.endswith("dense on all layers -> reference (requested)")


def test_embedding_gradient_sums_in_float32():
    # Many repeats of few tokens: a bfloat16 scatter-add of the rows' gradients was off by ~15 % here.
    model_config = dataclasses.replace(SMALL_MODEL, compute_dtype="bfloat16")
    model = DecoderLM(model_config, attention_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 4, (8, 4096)), jnp.int32)
    cotangent = rng.normal(size=(8, 4096, model_config.d_model))
    # The forward is nnx.Embed's: rows rounded to the compute dtype.
    np.testing.assert_array_equal(model.embed_tokens(tokens), model.embed(tokens).astype(jnp.float32)
                                  * math.sqrt(model_config.d_model))
    grads = nnx.grad(lambda m: (m.embed_tokens(tokens) * jnp.asarray(cotangent, jnp.float32)).sum())(model)
    # Each row's gradient is rounded to bfloat16, as the rows were; their sum is not.
    row_gradients = np.asarray(jnp.asarray(cotangent * math.sqrt(model_config.d_model), jnp.bfloat16), np.float64)
    exact = np.zeros(model.embed.embedding.shape)
    np.add.at(exact, np.asarray(tokens), row_gradients)
    np.testing.assert_allclose(grads.embed.embedding[...], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
