import sys, time
sys.path.insert(0, "tests/lm_experiment")
import jax, jax.numpy as jnp, numpy as np
from test_fused_decode import fused_layer_case, small_preset
from lm_experiment import fused_decode
programs = int(sys.argv[1]); prefetch = sys.argv[2] == "1"
fused_decode.PREFETCH_WEIGHTS = prefetch
config = small_preset(1)
args, static = fused_layer_case("block(512)", 1500, jnp.bfloat16, batch=1, d=config.d_model, heads=config.num_heads,
                                kv_heads=config.num_kv_heads, head_dim=config.head_dim, hidden=config.mlp_hidden)
counter = jnp.zeros((4, fused_decode.BARRIER_LANES), jnp.int32)
f = jax.jit(lambda *a: fused_decode.fused_layer(*a, counter=counter, first_barrier=0, programs=programs, **static))
t0 = time.time(); c = f.lower(*args).compile(); print("programs", programs, "prefetch", prefetch, "compiled", round(time.time()-t0, 1), "s", flush=True)
t0 = time.time(); out = c(*args); jax.block_until_ready(out); print("ran", round(time.time()-t0, 3), "s counter min/max", int(out[2].min()), int(out[2].max()), flush=True)
exp, _ = jax.jit(lambda *a: fused_decode.fused_layer_reference(*a, **static))(*args)
print("max diff", float(jnp.max(jnp.abs(out[0] - exp))), flush=True)
t0 = time.time()
for _ in range(100): out = c(*args)
jax.block_until_ready(out); print("us per call", (time.time()-t0)*1e4, flush=True)
