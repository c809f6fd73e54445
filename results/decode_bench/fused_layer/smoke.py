"""Two layers of the small preset, block(512), bf16, 1,500 prefilled: the fused step against XLA's, and its time."""
import sys, time
sys.path.insert(0, "tests/lm_experiment")
import jax, jax.numpy as jnp, numpy as np
from test_fused_decode import model_for, small_preset
from lm_experiment import fused_decode, generation
print("devices", jax.devices(), jax.devices()[0].core_count, flush=True)
for pattern in sys.argv[1:]:
    model = model_for(pattern, config=small_preset(2))
    prompt = jax.random.randint(jax.random.key(3), (1, 1500), 0, 256)
    logits, caches = generation.prefill(model, prompt, 1600)
    token = prompt[:, :1]
    step = jax.jit(fused_decode.decode_step, static_argnames=("programs",))
    weights = fused_decode.LayerWeights.of(model)
    for programs in (None, 5):
        t0 = time.time()
        got, _ = step(model, weights, token, caches, jnp.int32(1500), programs=programs)
        got.block_until_ready()
        print(pattern, programs, "first call", round(time.time() - t0, 2), "s", flush=True)
    expected, _ = jax.jit(lambda m, t, c, p: m.decode(t, c, p))(model, token, caches, jnp.int32(1500))
    print(pattern, "max |fused - xla|", float(jnp.max(jnp.abs(got - expected))), flush=True)
