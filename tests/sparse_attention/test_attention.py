"""attention(): the reference oracle against float64 NumPy, the XLA path against the reference (values and
gradients, jit, vmap), dispatch and input errors, and causality through gradients."""

import functools
import importlib
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_patterns import brute_force_mask, tree_spec

from sparse_attention import reference, xla

from sparse_attention.kernels import mosaic_gpu, triton
from sparse_attention.attention import AUTO_ORDER, VALID_IMPLS, ImplUnavailableError, attention, resolve_impl
from sparse_attention.patterns import parse

dispatch = importlib.import_module("sparse_attention.attention")  # the package exports the function as `attention`

ON_CPU = jax.default_backend() == "cpu"


def random_qkv(seed: int, seq_len: int, q_heads: int, kv_heads: int, dtype, batch: int = 2, head_dim: int = 8):
    """q [batch, seq, q_heads, head_dim], k and v [batch, seq, kv_heads, head_dim]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq_len, q_heads, head_dim), np.float32)
    k = rng.standard_normal((batch, seq_len, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, seq_len, kv_heads, head_dim), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def jit_attention(q, k, v, pattern, **options):
    """attention() under jit (one compile instead of one per op in eager mode)."""
    return jax.jit(lambda q, k, v: attention(q, k, v, pattern, **options))(q, k, v)


def softmax_attention_float64(q, k, v, mask: np.ndarray, scale: float) -> np.ndarray:
    """Masked softmax attention in float64; q head h reads kv head h // (q_heads // kv_heads)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = np.where(mask, logits, -np.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    weights = np.where(mask, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)  # a query that sees no key gets zeros
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


REFERENCE_CASES = [
    # (tree, seq_len, q_heads, kv_heads)
    (("dense",), 13, 4, 1),
    (("block", 8, 3), 37, 4, 2),
    (("window", 5), 29, 2, 2),
    (("repaired", 8, 3, "prefix"), 41, 4, 1),
    (("repaired", 6, 2, "bridge"), 23, 4, 2),
    (("or", ("sinks", 2), ("strided", 3)), 31, 4, 2),
    (("dilated", 3, 2), 19, 2, 1),
    (("random_blocks", 4, 2, 7), 45, 4, 1),
    (("and", ("sinks", 4), ("window", 2)), 17, 4, 2),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "case_index", range(len(REFERENCE_CASES)), ids=[tree_spec(c[0]) for c in REFERENCE_CASES]
)
def test_reference_matches_float64_softmax(case_index, dtype):
    tree, seq_len, q_heads, kv_heads = REFERENCE_CASES[case_index]
    q, k, v = random_qkv(case_index, seq_len, q_heads, kv_heads, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    pattern = parse(tree_spec(tree))
    out = jax.jit(lambda q, k, v: reference.attention(q, k, v, pattern, scale=scale))(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    expected = softmax_attention_float64(q, k, v, brute_force_mask(tree, seq_len), scale)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tolerance, rtol=tolerance)


def test_scale_argument_is_applied():
    q, k, v = random_qkv(11, 21, 2, 1, jnp.float32)
    out = jit_attention(q, k, v, "window(6)", scale=0.3)
    expected = softmax_attention_float64(q, k, v, brute_force_mask(("window", 6), 21), 0.3)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- xla vs reference


def values_and_grads(impl_attention, pattern, q, k, v, cotangent):
    """(out, (dq, dk, dv)): out = attention(q, k, v) and the gradients of sum(out * cotangent)."""
    out, pullback = jax.vjp(lambda q, k, v: impl_attention(q, k, v, pattern), q, k, v)
    return out, pullback(cotangent)


def reference_attention(q, k, v, pattern):
    return reference.attention(q, k, v, pattern, scale=1 / math.sqrt(q.shape[-1]))


def xla_attention(tile):
    def run(q, k, v, pattern):
        return xla.attention(q, k, v, pattern, scale=1 / math.sqrt(q.shape[-1]), tile=tile)

    return run


def xla_and_reference(tile, pattern, q, k, v, cotangent):
    """values_and_grads of the xla path and of the reference, under one jit (one compile per case)."""

    @jax.jit
    def both(q, k, v, cotangent):
        return tuple(
            values_and_grads(impl, pattern, q, k, v, cotangent) for impl in (xla_attention(tile), reference_attention)
        )

    return both(q, k, v, cotangent)


def random_cotangent(seed: int, like):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(like.shape), like.dtype)


# Every kind and some compositions. Tiles cycle through 8, 16, 32 and shapes through GQA 4:1 and 4:2; the
# lengths 45 and 37 are multiples of none of the tiles.
XLA_TREES = [
    ("dense",),
    ("block", 8, 0),
    ("block", 12, 5),
    ("window", 7),
    ("repaired", 8, 3, "bridge"),
    ("repaired", 16, 5, "prefix"),
    ("strided", 3),
    ("dilated", 4, 3),
    ("sinks", 4),
    ("random_blocks", 8, 2, 3),
    ("or", ("sinks", 4), ("window", 6)),
    ("and", ("block", 16, 0), ("strided", 2)),
    ("or", ("and", ("window", 20), ("strided", 2)), ("repaired", 8, 2, "prefix")),
]
XLA_SHAPES = [(45, 4, 1), (37, 4, 2)]  # (seq_len, q_heads, kv_heads)
XLA_CASES = [  # (tree, tile, seq_len, q_heads, kv_heads, dtype)
    (tree, (8, 16, 32)[i % 3], *XLA_SHAPES[i % 2], jnp.float32) for i, tree in enumerate(XLA_TREES)
] + [
    (("repaired", 8, 3, "bridge"), 16, 45, 4, 1, jnp.bfloat16),
    (("random_blocks", 8, 2, 3), 32, 37, 4, 2, jnp.bfloat16),
]


@pytest.mark.parametrize(
    "case_index",
    range(len(XLA_CASES)),
    ids=[f"{tree_spec(c[0])}-tile{c[1]}-S{c[2]}-{c[3]}:{c[4]}-{jnp.dtype(c[5]).name}" for c in XLA_CASES],
)
def test_xla_matches_reference_values_and_gradients(case_index):
    tree, tile, seq_len, q_heads, kv_heads, dtype = XLA_CASES[case_index]
    q, k, v = random_qkv(100 + case_index, seq_len, q_heads, kv_heads, dtype)
    (out, grads), (expected_out, expected_grads) = xla_and_reference(
        tile, parse(tree_spec(tree)), q, k, v, random_cotangent(case_index, q)
    )
    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected_out, *expected_grads)):
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=tolerance, rtol=tolerance, err_msg=name
        )


def test_xla_rows_without_keys_are_zero_with_finite_gradients():
    """sinks(4) & window(2): queries 0..4 see a sink, queries >= 5 see nothing."""
    tree = ("and", ("sinks", 4), ("window", 2))
    pattern = parse(tree_spec(tree))
    seq_len = 21
    assert (brute_force_mask(tree, seq_len).any(axis=1) == (np.arange(seq_len) < 5)).all()
    q, k, v = random_qkv(5, seq_len, 2, 1, jnp.float32)
    (out, (dq, dk, dv)), (expected_out, expected_grads) = xla_and_reference(
        8, pattern, q, k, v, random_cotangent(5, q)
    )
    assert (np.asarray(out[:, 5:]) == 0).all() and (np.abs(np.asarray(out[:, :5])) > 0).any()
    for got, expected in zip((out, dq, dk, dv), (expected_out, *expected_grads)):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
    # Queries without keys pass no gradient to q; keys past the sinks receive none.
    assert (np.asarray(dq[:, 5:]) == 0).all() and (np.asarray(dk[:, 4:]) == 0).all()
    assert (np.asarray(dv[:, 4:]) == 0).all()


def test_xla_under_vmap_and_jit_matches_reference():
    """vmap over an extra leading axis: [models, batch, seq, heads, d]."""
    pattern = parse("repaired(8, 3, prefix) | sinks(2)")
    seq_len, models = 27, 3
    stacked = [random_qkv(200 + m, seq_len, 4, 2, jnp.float32) for m in range(models)]
    q, k, v = (jnp.stack([s[i] for s in stacked]) for i in range(3))
    cotangent = random_cotangent(9, q)
    xla_8 = xla_attention(8)

    def loss_and_grads(q, k, v, cotangent):
        def loss(q, k, v):
            return jnp.sum(xla_8(q, k, v, pattern) * cotangent)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    out = jax.jit(jax.vmap(functools.partial(xla_8, pattern=pattern)))(q, k, v)
    losses, grads = jax.jit(jax.vmap(loss_and_grads))(q, k, v, cotangent)
    # The oracle folds the models into the batch instead of using vmap.
    folded = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v, cotangent))
    expected_out, expected_grads = jax.jit(functools.partial(values_and_grads, reference_attention, pattern))(*folded)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out).reshape(q.shape), atol=2e-5, rtol=2e-5)
    expected_losses = (np.asarray(expected_out).reshape(q.shape) * np.asarray(cotangent)).sum(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(np.asarray(losses), expected_losses, atol=1e-4, rtol=1e-4)
    for got, expected, x in zip(grads, expected_grads, (q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected).reshape(x.shape), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------- dispatch and errors


@pytest.mark.skipif(not ON_CPU, reason="auto resolves to xla on CPU only")
def test_auto_on_cpu_resolves_to_xla_and_matches_it():
    q, k, v = random_qkv(1, 19, 2, 1, jnp.float32)
    chosen, why = resolve_impl("auto", q, k, v, "window(4)")
    assert chosen == "xla" and "cpu" in why
    out = jit_attention(q, k, v, "window(4)")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jit_attention(q, k, v, "window(4)", impl="xla")))
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(jit_attention(q, k, v, "window(4)", impl="reference")), atol=2e-5, rtol=2e-5
    )


def test_auto_order_on_gpu_prefers_mosaic_gpu_then_triton():
    assert AUTO_ORDER["gpu"] == ("mosaic_gpu", "triton", "xla")


class FakeGpu:
    """What the kernels' unsupported_reason reads from jax.devices()[0]."""

    def __init__(self, compute_capability: str):
        self.compute_capability = compute_capability


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU backend without a GPU: returns set(capability, cuda_runtime) to pick the device and runtime."""

    def set_gpu(capability="9.0", cuda_runtime=13000):
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: [FakeGpu(capability)])
        monkeypatch.setattr(mosaic_gpu, "_cuda_runtime_version", lambda: cuda_runtime)

    return set_gpu


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_auto_on_hopper_picks_mosaic_gpu(fake_gpu, dtype, head_dim):
    q, k, v = random_qkv(12, 16, 4, 2, dtype, head_dim=head_dim)
    fake_gpu()
    assert resolve_impl("auto", q, k, v, "repaired(8, 2, bridge)") == ("mosaic_gpu", "auto on gpu")


FALLBACKS = [  # (what differs from bf16 at head_dim 64 on sm90 with CUDA 13.0, the reason mosaic_gpu gives)
    (dict(dtype=jnp.float32), {}, "dtype float32 is not supported"),
    (dict(head_dim=32), {}, "head_dim 32 is not supported"),
    ({}, dict(capability="8.0"), "compute capability >= 9.0 (Hopper), found 8.0"),
    ({}, dict(cuda_runtime=12080), "CUDA runtime 12080 is in [12080, 12091)"),
]


@pytest.mark.parametrize("inputs, gpu, reason", FALLBACKS, ids=["float32", "head_dim32", "sm80", "cuda12.8"])
def test_auto_on_gpu_falls_back_to_triton_and_says_why(fake_gpu, monkeypatch, caplog, inputs, gpu, reason):
    q, k, v = random_qkv(13, 16, 4, 2, inputs.get("dtype", jnp.bfloat16), head_dim=inputs.get("head_dim", 64))
    fake_gpu(**gpu)
    chosen, why = resolve_impl("auto", q, k, v, "block(8)")
    assert chosen == "triton"
    assert why.startswith("auto on gpu (skipped mosaic_gpu: ") and reason in why
    # attention() logs the same choice and calls triton (stubbed: there is no GPU to run it on).
    monkeypatch.setattr(triton, "attention", lambda q, k, v, pattern, **options: q)
    dispatch._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger=dispatch.log.name):
        assert attention(q, k, v, "block(8)") is q
    assert f"attention impl=auto ran triton ({why})" in caplog.text


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_explicit_runnable_impl_resolves_to_itself(impl):
    q, k, v = random_qkv(2, 9, 2, 2, jnp.float32)
    assert resolve_impl(impl, q, k, v, "dense") == (impl, "requested")


def test_unknown_impl_lists_the_valid_ones():
    q, k, v = random_qkv(3, 9, 2, 2, jnp.float32)
    for call in (lambda: attention(q, k, v, "dense", impl="cuda"), lambda: resolve_impl("cuda", q, k, v, "dense")):
        with pytest.raises(ValueError, match="impl: must be one of") as error:
            call()
        assert all(name in str(error.value) for name in VALID_IMPLS) and "'cuda'" in str(error.value)


@pytest.mark.parametrize("old, new", [("pallas_gpu", "triton"), ("pallas_tpu", "mosaic_tpu")])
def test_renamed_impl_says_its_new_name(old, new):
    q, k, v = random_qkv(3, 9, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match=f"impl: '{old}' is now called '{new}'"):
        resolve_impl(old, q, k, v, "dense")


@pytest.mark.skipif(not ON_CPU, reason="these kernels may run on an accelerator")
@pytest.mark.parametrize("impl", ["mosaic_gpu", "mosaic_tpu", "triton"])
def test_explicit_impl_that_cannot_run_here_says_why(impl):
    q, k, v = random_qkv(4, 16, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match=f"impl={impl!r} cannot run here: ") as error:
        attention(q, k, v, "block(8)", impl=impl)
    reason = str(error.value).split("cannot run here: ", 1)[1]
    assert reason.strip()


@pytest.mark.skipif(not ON_CPU, reason="the thread pool matters to the interpreter on CPU only")
def test_mosaic_gpu_interpreter_refuses_a_thread_pool_it_could_deadlock(monkeypatch):
    # On 2 cores a training step in the interpreter hung with SIGTERM ignored; 16 threads ran it in 12 s.
    q, k, v = random_qkv(1, 128, 2, 1, jnp.bfloat16, head_dim=64)
    monkeypatch.setenv("PJRT_NPROC", "2")
    with pytest.raises(ImplUnavailableError, match=r"impl='mosaic_gpu' cannot run here: interpret=True needs XLA's "
                                                   r"CPU thread pool to have >= 16 threads, it has 2 .*PJRT_NPROC=16"):
        attention(q, k, v, "block(64)", impl="mosaic_gpu", interpret=True)
    monkeypatch.setenv("PJRT_NPROC", "16")
    assert resolve_impl("mosaic_gpu", q, k, v, "block(64)", interpret=True) == ("mosaic_gpu", "requested")


def shaped(q_shape, kv_shape, dtype=jnp.float32, v_shape=None, k_dtype=None, v_dtype=None):
    return (
        jnp.zeros(q_shape, dtype),
        jnp.zeros(kv_shape, k_dtype or dtype),
        jnp.zeros(v_shape or kv_shape, v_dtype or dtype),
    )


BAD_INPUTS = [
    ("no dimension of size 0", shaped((1, 8, 2, 0), (1, 8, 2, 0))),  # head_dim 0: 1/sqrt(0)
    ("no dimension of size 0", shaped((1, 8, 2, 8), (1, 8, 0, 8))),  # kv_heads 0: q_heads % 0
    ("kv_heads=3 must divide q_heads=4", shaped((1, 8, 4, 8), (1, 8, 3, 8))),
    ("must share batch, seq and head_dim", shaped((1, 8, 2, 8), (1, 9, 2, 8))),
    ("must share batch, seq and head_dim", shaped((2, 8, 2, 8), (1, 8, 2, 8))),
    ("must share batch, seq and head_dim", shaped((1, 8, 2, 8), (1, 8, 2, 4))),
    (r"must be \[batch, seq, heads, head_dim\]", shaped((8, 2, 8), (8, 2, 8))),
    (r"must be \[batch, seq, heads, head_dim\]", shaped((1, 8, 2, 8), (1, 8, 2, 8, 1))),
    ("k and v must have the same shape", shaped((1, 8, 2, 8), (1, 8, 2, 8), v_shape=(1, 8, 1, 8))),
    ("must share a dtype", shaped((1, 8, 2, 8), (1, 8, 2, 8), k_dtype=jnp.bfloat16)),
    ("must share a dtype", shaped((1, 8, 2, 8), (1, 8, 2, 8), v_dtype=jnp.float16)),
    ("dtype must be one of float32, bfloat16, float16", shaped((1, 8, 2, 8), (1, 8, 2, 8), dtype=jnp.int32)),
]


@pytest.mark.parametrize("problem, qkv", BAD_INPUTS, ids=[f"{i}-{p[:30]}" for i, (p, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_value_error_naming_the_problem(problem, qkv):
    with pytest.raises(ValueError, match=problem):
        attention(*qkv, "window(4)")


@pytest.mark.parametrize("spec", ["shifted(8)", "schedule(block(8), window(4))"])
def test_schedule_spec_is_refused(spec):
    q, k, v = random_qkv(6, 16, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match="schedule"):
        attention(q, k, v, spec)
    with pytest.raises(ValueError, match="schedule"):
        attention(q, k, v, parse(spec))


def test_spec_string_works_as_the_pattern():
    tree = ("or", ("window", 4), ("sinks", 2))
    q, k, v = random_qkv(7, 23, 4, 2, jnp.float32)
    out = jit_attention(q, k, v, "window(4) | sinks(2)")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jit_attention(q, k, v, parse("window(4) | sinks(2)"))))
    expected = softmax_attention_float64(q, k, v, brute_force_mask(tree, 23), 1 / math.sqrt(8))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- causality through grads


CAUSALITY_TREES = [
    ("dense",),
    ("block", 4, 1),
    ("window", 3),
    ("repaired", 4, 2, "bridge"),
    ("repaired", 4, 2, "prefix"),
    ("strided", 3),
    ("dilated", 3, 2),
    ("sinks", 2),
    ("random_blocks", 3, 2, 5),
    ("or", ("sinks", 2), ("window", 2)),
    ("and", ("sinks", 4), ("window", 2)),
]


@pytest.mark.parametrize("tree", CAUSALITY_TREES, ids=tree_spec)
def test_gradients_respect_the_pattern(tree):
    """d out[i] / d x[j] through the xla path: zero for j > i; for v nonzero exactly where i attends j."""
    seq_len = 11
    pattern = parse(tree_spec(tree))
    q, k, v = (x[:1, :, :1, :2] for x in random_qkv(8, seq_len, 1, 1, jnp.float32))
    jacobians = jax.jit(
        jax.jacrev(lambda q, k, v: xla.attention(q, k, v, pattern, scale=1.0, tile=4), argnums=(0, 1, 2))
    )(q, k, v)
    # [batch, seq, heads, d] x [batch, seq, heads, d] -> [seq_out, seq_in], summed magnitudes.
    dq, dk, dv = (np.abs(np.asarray(j)).sum(axis=(0, 2, 3, 4, 6, 7)) for j in jacobians)
    mask = brute_force_mask(tree, seq_len)
    future = np.triu(np.ones((seq_len, seq_len), bool), k=1)
    for name, dependence in (("q", dq), ("k", dk), ("v", dv)):
        assert (dependence[future] == 0).all(), f"out depends on future {name}"
    assert (dq[~np.eye(seq_len, dtype=bool)] == 0).all()
    assert (dk[~mask] == 0).all()
    np.testing.assert_array_equal(dv > 0, mask)


@pytest.mark.skipif(not ON_CPU, reason="needs a machine where mosaic_gpu cannot run compiled")
def test_mosaic_gpu_gives_every_reason_at_once():
    q, k, v = random_qkv(0, 16, 2, 2, jnp.float32, head_dim=32)
    reason = mosaic_gpu.unsupported_reason(q, k, v, parse("block(8)"), interpret=False)
    assert reason.split("; ") == ["dtype float32 is not supported (bfloat16, float16)",
                                  "head_dim 32 is not supported (64, 128)",
                                  "needs a CUDA GPU with compute capability >= 9.0 (Hopper) or interpret=True"]


def test_inputs_as_lists_and_a_bad_scale():
    q, k, v = random_qkv(3, 8, 2, 2, jnp.float32)
    as_lists = attention(q.tolist(), k.tolist(), np.asarray(v), "block(4)", impl="reference")
    np.testing.assert_array_equal(as_lists, attention(q, k, v, "block(4)", impl="reference"))
    for scale in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match=r"scale must be a finite number > 0 \(or None for 1/sqrt\(head_dim\)\)"):
            attention(q, k, v, "block(4)", impl="reference", scale=scale)


def test_library_import_loads_no_experiment_dependency():
    # A fresh interpreter: what importing the library (every module of it) pulls in.
    code = textwrap.dedent("""
        import sys
        import sparse_attention
        from sparse_attention import atomic_io, attention, config_files, layout, patterns, reachability, reference, xla
        from sparse_attention.kernels import common, mosaic_gpu, mosaic_tpu, triton
        print(sorted({name.split(".")[0] for name in sys.modules}
                     & {"lm_experiment", "orbax", "tensorboard", "matplotlib", "flax", "optax", "torch"}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip().splitlines()[-1] == "[]"
