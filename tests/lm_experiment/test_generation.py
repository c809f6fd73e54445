"""Generation: prefill + cached decoding reproduce the full forward pass for every pattern kind, sampling
keeps to its definitions, lengths and bad input are refused in one line, and the CLI generates from a
minuscule trained run."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_experiment import generation
from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.generation import Sampling
from lm_experiment.model import DecoderLM
from tiny_run import train_tiny

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                    tie_embeddings=True, remat=False, rope_base=10000.0, compute_dtype="float32",
                    param_dtype="float32")
# (pattern, schedule): every kind, a union with sinks, and a per-layer schedule (shifted's).
VARIANTS = [("dense", ()), ("block(8)", ()), ("window(6)", ()), ("repaired(8, 2, bridge)", ()),
            ("repaired(8, 3, prefix)", ()), ("sinks(2) | window(5)", ()), ("strided(3)", ()), ("dilated(4, 2)", ()),
            ("random_blocks(8, 1, 3)", ()), ("dense", ("block(8)", "block(8, 4)"))]


def model_for(pattern: str, schedule=(), seed: int = 0) -> DecoderLM:
    attention = AttentionConfig(pattern=pattern, schedule=schedule, impl="reference", interpret=False)
    return DecoderLM(MODEL, attention, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("pattern, schedule", VARIANTS, ids=[s[1] and "shifted(8)" or s[0] for s in VARIANTS])
def test_decoding_logits_equal_the_full_pass(pattern, schedule):
    """A prompt of 11 tokens, then 37 tokens fed one at a time across five block edges: every step's logits
    equal the full pass's at that position."""
    model = model_for(pattern, schedule)
    tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 48), 0, 256)
    full = model(tokens)
    logits, caches = model.prefill(tokens[:, :11], model.empty_caches(2, 48))
    np.testing.assert_allclose(logits, full[:, :11], atol=1e-4)
    decode = nnx.jit(lambda model, token, caches, t: model.decode(token, caches, t))
    for t in range(11, 48):
        step, caches = decode(model, tokens[:, t:t + 1], caches, jnp.int32(t))
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-4)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_parameters_rounded_for_inference_change_no_output(tie_embeddings):
    """Decoding reads the parameters rounded to bfloat16 once; every layer rounds them so anyway."""
    config = dataclasses.replace(MODEL, compute_dtype="bfloat16", tie_embeddings=tie_embeddings)
    model = DecoderLM(config, AttentionConfig(pattern="block(8)", schedule=(), impl="reference", interpret=False),
                      rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 256)
    logits, _ = generation.prefill(model, tokens, 30)
    np.testing.assert_array_equal(logits, model(tokens)[:, -1])


def test_local_caches_stay_small_and_dense_keeps_everything():
    slots = {pattern: [c.layout.slots for c in model_for(pattern).empty_caches(1, 10_000)]
             for pattern in ("dense", "block(8)", "repaired(8, 3, prefix)", "sinks(2) | window(5)")}
    # dense: 10,000 positions in slots rounded up to a multiple of 1,024
    assert slots == {"dense": [10_240] * 2, "block(8)": [8] * 2, "repaired(8, 3, prefix)": [11] * 2,
                     "sinks(2) | window(5)": [7] * 2}
    shifted = model_for("dense", ("block(8)", "block(8, 4)"))
    assert [c.layout.slots for c in shifted.empty_caches(1, 10_000)] == [8, 8]


def test_greedy_generation_follows_the_argmax_of_the_full_pass():
    model = model_for("repaired(8, 2, prefix)")
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, 256)
    generated = generation.generate(model, prompt, 20, trained_seq_len=64)
    tokens = prompt
    for _ in range(20):
        tokens = jnp.concatenate([tokens, jnp.argmax(model(tokens)[:, -1], -1)[:, None].astype(jnp.int32)], 1)
    np.testing.assert_array_equal(generated, tokens[:, 5:])


def test_sampling_follows_temperature_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)

    def draws(sampling):
        return np.asarray(jax.vmap(lambda key: generation.sample(logits, sampling, key)[0])(keys))

    assert generation.sample(logits, Sampling(), keys[0]).tolist() == [0]
    frequencies = np.bincount(draws(Sampling(temperature=1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it; the two renormalise to 0.625 / 0.375.
    nucleus = np.bincount(draws(Sampling(temperature=1.0, top_p=0.7)), minlength=4) / len(keys)
    assert nucleus[2:].sum() == 0
    np.testing.assert_allclose(nucleus[:2], [0.625, 0.375], atol=0.03)
    assert set(draws(Sampling(temperature=5.0, top_p=0.01))) == {0}
    # A high temperature flattens the distribution.
    hot = np.bincount(draws(Sampling(temperature=100.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(hot, 0.25, atol=0.03)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_lengths_are_checked_against_what_the_pattern_needs():
    with pytest.raises(ValueError, match="prompt: must hold at least one token"):
        generation.generate(model_for("block(8)"), jnp.zeros((1, 0), jnp.int32), 4, trained_seq_len=64)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generation.generate(model_for("block(8)"), jnp.zeros((1, 3), jnp.int32), 0, trained_seq_len=64)
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens 10 = 70 exceeds the trained context of 64, "
                                         r"and dense needs the whole past"):
        generation.generate(model_for("dense"), jnp.zeros((1, 60), jnp.int32), 10, trained_seq_len=64)
    # A local pattern never looks further back than its reach, so it may run past the trained context.
    assert generation.generate(model_for("block(8)"), jnp.zeros((1, 60), jnp.int32), 10,
                               trained_seq_len=64).shape == (1, 10)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("generate"))


def run_cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_generates_from_a_trained_run(trained_run):
    done = run_cli("--workdir", str(trained_run), "--prompt", "def f(", "--max-new-tokens", "30",
                   "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def f(") and len(done.stdout.encode()) >= len("def f(") + 1


@pytest.mark.parametrize("arguments, message", [
    (["--prompt", ""], "generate.py: prompt: must hold at least one character"),
    (["--prompt", "x", "--top-p", "2"], r"generate.py: top_p must be in \(0, 1\]"),
    (["--prompt", "x", "--step", "999"], "generate.py: step must be one of the saved steps"),
])
def test_cli_bad_input_is_one_line(trained_run, arguments, message):
    done = run_cli("--workdir", str(trained_run), *arguments)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert re.search(message, done.stderr)


def test_cli_refuses_a_folder_without_a_run(tmp_path):
    done = run_cli("--workdir", str(tmp_path), "--prompt", "x")
    assert done.returncode == 1 and "has no config.json" in done.stderr
