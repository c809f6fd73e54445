"""The fused decoding step: each kernel against its jnp reference (Pallas interpret mode), the whole step against
DecoderLM.decode at every position across block edges and ring wraps, the Triton lowering at the `small`
preset's shapes for an H200, and the choice of step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from lm_experiment import fused_decode, generation
from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.model import DecoderLM, rope_angles_at
from sparse_attention.decoding import CacheLayout, KVCache
from sparse_attention.patterns import parse

ON_GPU = jax.default_backend() == "gpu"
MODEL = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                    tie_embeddings=True, remat=False, rope_base=10000.0, compute_dtype="float32",
                    param_dtype="float32")
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def model_for(pattern: str, schedule=(), config: ModelConfig = MODEL) -> DecoderLM:
    attention = AttentionConfig(pattern=pattern, schedule=schedule, impl="reference", interpret=False)
    return DecoderLM(config, attention, rngs=nnx.Rngs(np.random.randint(1 << 30)))


def random(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def assert_close(got, expected, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("epilogue", ["rope", "swiglu"])
def test_norm_project_matches_its_reference(epilogue, dtype):
    batch, d, head_dim = 3, 512, 32  # two reduction chunks
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
    x = random(keys[0], (batch, d), jnp.float32, 3.0)
    scale = random(keys[1], (d,), dtype) + 1
    if epilogue == "rope":
        weights = (random(keys[2], (6 * head_dim, d), dtype, d**-0.5),)  # 3 q heads, 1 kv head: k and v
        rope = rope_angles_at(jnp.array([1234]), head_dim, 10000.0)
        static = dict(eps=1e-6, epilogue="rope", head_dim=head_dim, rope_heads=4)
    else:
        weights = (random(keys[2], (96, d), dtype, d**-0.5), random(keys[3], (96, d), dtype, d**-0.5))
        rope = None
        static = dict(eps=1e-6, epilogue="swiglu", head_dim=head_dim, rope_heads=0)
    got = fused_decode.norm_project(x, scale, weights, rope, interpret=True, **static)
    expected = fused_decode.norm_project_reference(x, scale, weights, rope, **static)
    assert got.dtype == expected.dtype == dtype
    assert_close(got, expected, dtype)
    if epilogue == "rope":  # the v head is not rotated: it equals the plain projection
        plain = fused_decode.norm_project_reference(x, scale, weights, rope, **dict(static, rope_heads=0))
        assert_close(got[:, 4 * head_dim:], plain[:, 4 * head_dim:], dtype)
        assert not np.allclose(got[:, :head_dim], plain[:, :head_dim], atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n_in, d", [(768, 96), (96, 64)])
def test_residual_project_matches_its_reference(n_in, d, dtype):
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    a = random(keys[0], (2, n_in), dtype)
    w = random(keys[1], (d, n_in), dtype, n_in**-0.5)
    x = random(keys[2], (2, d), jnp.float32)
    got = fused_decode.residual_project(a, w, x, interpret=True)
    assert got.dtype == jnp.float32
    assert_close(got, fused_decode.residual_project_reference(a, w, x), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spans, heads, head_dim", [(1, 4, 32), (5, 12, 64)])
def test_attend_project_matches_its_reference(spans, heads, head_dim, dtype):
    """Spans combined by their log-sum-exps, one of them empty (-inf: no visible key) for a head, projected."""
    batch, d = 2, 96
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
    partial = random(keys[0], (batch, spans, heads, head_dim), jnp.float32)
    lse = random(keys[1], (batch, spans, heads), jnp.float32, 3.0)
    if spans > 1:
        lse = lse.at[0, 1, 2].set(-jnp.inf)
    w = random(keys[2], (d, heads * head_dim), dtype, (heads * head_dim)**-0.5)
    x = random(keys[3], (batch, d), jnp.float32)
    got = fused_decode.attend_project(partial, lse, w, x, interpret=True)
    assert got.dtype == jnp.float32
    assert_close(got, fused_decode.attend_project_reference(partial, lse, w, x), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec, position", [("block(16)", 37), ("repaired(16, 4, prefix)", 70),
                                            ("sinks(2) | window(8)", 45), ("window(128)", 300), ("block(256)", 600)])
def test_ring_attention_matches_its_reference(spec, position, dtype):
    """A cache as a prefill of `position` tokens leaves it (the ring wrapped), the new position written and
    attended in spans (four for block(256), two of them with no visible key): the combined output and the
    updated k, v and positions equal the XLA path's."""
    batch, heads, kv_heads, head_dim = 2, 4, 2, 32
    pattern = parse(spec)
    layout = CacheLayout.for_pattern(pattern, 4096)
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    kept = layout.kept(position)
    cache = KVCache.empty(layout, batch, kv_heads, head_dim, dtype)
    shape = (batch, len(kept), kv_heads, head_dim)
    cache = dataclasses.replace(cache, k=cache.k.at[:, layout.slot(kept)].set(random(keys[0], shape, dtype)),
                                v=cache.v.at[:, layout.slot(kept)].set(random(keys[1], shape, dtype)),
                                positions=cache.positions.at[layout.slot(kept)].set(jnp.asarray(kept, jnp.int32)))
    qkv = random(keys[2], (batch, (heads + 2 * kv_heads) * head_dim), dtype)
    at = jnp.array([position], jnp.int32)
    static = dict(heads=heads, head_dim=head_dim)
    *got, got_cache = jax.jit(lambda qkv, cache: fused_decode.ring_attention(qkv, at, cache, pattern, interpret=True,
                                                                             **static))(qkv, cache)
    *expected, expected_cache = fused_decode.ring_attention_reference(qkv, at, cache, pattern, **static)
    spans = got[0].shape[1]
    assert got[0].shape == (batch, spans, heads, head_dim) and layout.slots % spans == 0
    assert spans == 4 or spec != "block(256)"
    assert_close(fused_decode.combine_spans(*got, dtype), fused_decode.combine_spans(*expected, dtype), dtype)
    np.testing.assert_array_equal(got_cache.positions, expected_cache.positions)
    np.testing.assert_array_equal(np.asarray(got_cache.k, np.float32), np.asarray(expected_cache.k, np.float32))
    np.testing.assert_array_equal(np.asarray(got_cache.v, np.float32), np.asarray(expected_cache.v, np.float32))


VARIANTS = [("dense", ()), ("block(8)", ()), ("window(6)", ()), ("repaired(8, 2, bridge)", ()),
            ("repaired(8, 3, prefix)", ()), ("sinks(2) | window(5)", ()), ("dilated(4, 2)", ()),
            ("dense", ("block(8)", "block(8, 4)"))]


@pytest.mark.parametrize("pattern, schedule", VARIANTS, ids=[s[1] and "shifted(8)" or s[0] for s in VARIANTS])
def test_decode_step_equals_the_xla_step(pattern, schedule):
    """A prompt of 11 tokens, then 29 single steps across block edges and ring wraps: the fused step's logits
    and caches equal DecoderLM.decode's at every position."""
    model = model_for(pattern, schedule)
    tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 40), 0, 256)
    _, caches = model.prefill(tokens[:, :11], model.empty_caches(2, 40))
    expected_caches = caches
    weights = fused_decode.LayerWeights.of(model)
    fused = nnx.jit(lambda model, token, caches, t: fused_decode.decode_step(model, weights, token, caches, t,
                                                                              interpret=True))
    xla = nnx.jit(lambda model, token, caches, t: model.decode(token, caches, t))
    for t in range(11, 40):
        got, caches = fused(model, tokens[:, t:t + 1], caches, jnp.int32(t))
        expected, expected_caches = xla(model, tokens[:, t:t + 1], expected_caches, jnp.int32(t))
        np.testing.assert_allclose(got, expected, atol=1e-4)
    for cache, expected_cache in zip(caches, expected_caches, strict=True):
        np.testing.assert_array_equal(cache.positions, expected_cache.positions)
        np.testing.assert_allclose(cache.k, expected_cache.k, atol=1e-5)


def test_generation_through_the_fused_step_equals_xla():
    model = model_for("repaired(8, 3, prefix)")
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 256)
    triton = generation.generate(model, prompt, 12, trained_seq_len=64, impl="triton", interpret=True)
    xla = generation.generate(model, prompt, 12, trained_seq_len=64, impl="xla")
    np.testing.assert_array_equal(triton, xla)


def test_an_impl_that_cannot_run_is_refused_in_one_line():
    model = model_for("block(8)")
    with pytest.raises(ValueError, match="decode impl must be one of auto, xla, triton; got 'pallas'"):
        generation.decoder(model, 4, impl="pallas")
    fused_decode.check_impl("triton", model, interpret=True)
    if not ON_GPU:
        with pytest.raises(ValueError, match="decode impl: triton needs a GPU"):
            generation.generate(model, jnp.zeros((1, 3), jnp.int32), 4, trained_seq_len=64, impl="triton")


def test_auto_runs_the_fused_step_on_a_gpu_at_small_batches_only(monkeypatch, caplog):
    model = model_for("block(8)")
    caplog.set_level("INFO", logger=fused_decode.__name__)
    if not ON_GPU:
        assert fused_decode.choose_impl("auto", model, 1) == "xla"
        assert "decode impl=auto ran xla (triton needs a GPU" in caplog.text
    assert fused_decode.choose_impl("triton", model, 16, interpret=True) == "triton"
    assert fused_decode.choose_impl("xla", model, 1) == "xla"
    monkeypatch.setattr(fused_decode.jax, "default_backend", lambda: "gpu")
    assert fused_decode.choose_impl("auto", model, 1) == "triton"
    assert fused_decode.choose_impl("auto", model, 4) == "triton"
    assert "decode impl=auto ran triton (a GPU at batch 4 <= 4)" in caplog.text
    assert fused_decode.choose_impl("auto", model, 5) == "xla"
    assert "decode impl=auto ran xla (batch 5 > 4)" in caplog.text
    odd = model_for("block(8)", config=dataclasses.replace(MODEL, d_model=48, num_heads=4))  # head_dim 12
    assert fused_decode.choose_impl("auto", odd, 1) == "xla"
    with pytest.raises(ValueError, match="decode impl: triton needs a power-of-two head_dim"):
        fused_decode.check_impl("triton", odd)


def small_preset(num_layers: int) -> ModelConfig:
    return ModelConfig(**dict(base.get_config("small").model.to_dict(), num_layers=num_layers))


@pytest.mark.parametrize("pattern", ["block(512)", "repaired(512, 64, prefix)", "sinks(64) | window(1024)", "dense"])
def test_the_step_lowers_to_triton_for_an_h200(pattern):
    """The `small` preset's layer shapes (d_model 768, 12 heads, 4 kv heads, bfloat16) pass Pallas's Triton
    lowering for an H200 without a GPU: five kernels a layer, four where XLA attends a whole-past cache."""
    model = model_for(pattern, config=small_preset(2))
    graphdef, state = generation.split_for_inference(model)
    caches = model.empty_caches(1, 4096)
    token, position = jnp.zeros((1, 1), jnp.int32), jnp.int32(5)

    def step(state, token, caches, position):
        merged = nnx.merge(graphdef, state)
        return fused_decode.decode_step(merged, fused_decode.LayerWeights.of(merged), token, caches, position)

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=1, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(step).trace(state, token, caches, position).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == (8 if pattern == "dense" else 10)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the compiled Triton kernels at the small preset's shapes")
@pytest.mark.parametrize("pattern", ["block(512)", "repaired(512, 64, prefix)", "window(1024)", "dense"])
@pytest.mark.parametrize("batch", [1, 16])
def test_compiled_step_equals_the_xla_step_on_gpu(pattern, batch):
    """Two layers of the `small` preset in bfloat16, 1,500 positions prefilled: one step's logits and caches
    agree with the XLA step's, and the compiled decoding loop runs."""
    model = model_for(pattern, config=small_preset(2))
    prompt = jax.random.randint(jax.random.key(3), (batch, 1500), 0, 256)
    logits, caches = generation.prefill(model, prompt, 1600)
    token = prompt[:, :1]
    got, got_caches = jax.jit(fused_decode.decode_step)(model, fused_decode.LayerWeights.of(model), token, caches,
                                                        jnp.int32(1500))
    expected, expected_caches = jax.jit(lambda m, t, c, p: m.decode(t, c, p))(model, token, caches, jnp.int32(1500))
    np.testing.assert_allclose(got, expected, atol=5e-2, rtol=5e-2)
    # XLA on GPUs may skip a bfloat16 rounding between fused ops (excess precision) and sums in another order, so
    # a written key may differ by a bfloat16 step of its projection (up to 1/64 below 4), mixed by RoPE.
    for cache, expected_cache in zip(got_caches, expected_caches, strict=True):
        np.testing.assert_array_equal(cache.positions, expected_cache.positions)
        np.testing.assert_allclose(np.asarray(cache.k, np.float32), np.asarray(expected_cache.k, np.float32),
                                   rtol=2e-2, atol=4e-2)
    tokens = generation.decoder(model, 40, impl="triton")(caches, logits, jnp.int32(1500), jax.random.key(0))
    assert tokens.shape == (batch, 40) and int(tokens.min()) >= 0 and int(tokens.max()) < model.model_config.vocab_size
