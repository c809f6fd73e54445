"""Boundary tasks trained from scratch (lm_experiment.boundary_tasks; docs/boundary_tasks.md).

    python -m lm_experiment.boundary_tasks --config configs/boundary_tasks.py:full --out results/boundary_tasks

Presets:
  tiny  CPU, about 2 minutes: the README's main job runs it. The copy task only, 64-token sequences, blocks
        of 8, depths 1 and 2.
  full  one GPU: 256-token sequences, blocks of 32, depths 1, 2 and 4, every cell of both tasks; the hops
        task in a curriculum over the hop count (1, then up to 2, then up to 3); looped models (one block
        applied depth times).

`train.seeds` trains that many initialisations of every pattern side by side (1 in both presets).

The seven patterns follow the block size B: dense, block(B), window(B / 2) (block(B)'s cost: (B + 1) / 2 keys
per query on average), window(2B), repaired(B, B / 8) in both modes, and shifted(B).
"""

import ml_collections

PRESETS = ("tiny", "full")


def patterns(block: int) -> tuple[str, ...]:
    repair = max(block // 8, 1)
    return ("dense", f"block({block})", f"window({block // 2})", f"window({2 * block})",
            f"repaired({block}, {repair}, bridge)", f"repaired({block}, {repair}, prefix)", f"shifted({block})")


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = (arg or "tiny").strip()
    if preset not in PRESETS:
        raise ValueError(f"boundary_tasks config preset must be one of {', '.join(PRESETS)}; got {arg!r}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    if preset == "tiny":
        block = 8
        config.tasks = ("copy",)
        config.depths = (1, 2)
        config.sequence = dict(seq_len=64, block_size=block, symbols=16)
        config.copy = dict(distances=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48), phases=(0, 1, 2, 4, 7), steps=300)
        config.hops = dict(hops=(1,), crossings=(1,), chains=4, steps=300, curriculum=False)
        config.model = dict(d_model=64, num_heads=4, mlp_hidden=128, compute_dtype="float32", shared_layers=False)
        config.train = dict(batch=32, seeds=1, learning_rate=3e-3, warmup_steps=30, log_every=50)
        config.eval = dict(samples_per_cell=64, accuracy_bar=0.9, confidence=0.95, batch=256)
    else:
        block = 32
        config.tasks = ("copy", "hops")
        config.depths = (1, 2, 4)
        config.sequence = dict(seq_len=256, block_size=block, symbols=16)
        config.copy = dict(distances=(1, 2, 3, 4, 5, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128, 192),
                           phases=(0, 1, 2, 3, 4, 5, 8, 16, 24, 31), steps=1500)
        # Four chains, all queried: with two, no model left the plateau of choosing one of two values blindly
        # in 4,000 steps (results/boundary_tasks/README.md); with four a depth-2 model learned the lookup in
        # 600 steps on a CPU. Without the curriculum, 4,000 steps taught one hop but not two or three to every
        # pattern except window(64) at depth 4 (results/boundary_tasks/hops_4chains/).
        config.hops = dict(hops=(1, 2, 3), crossings=(0, 1, 2), chains=4, steps=6000, curriculum=True)
        # One block applied `depth` times (the same reachable sets): with a block per layer no model got past
        # one hop in seven runs (results/boundary_tasks/README.md); the looped model of the cpu_small trial
        # learned two hops in the same 4,000 steps (hops_trials/cpu_looped/).
        config.model = dict(d_model=128, num_heads=4, mlp_hidden=256, compute_dtype="bfloat16", shared_layers=True)
        config.train = dict(batch=64, seeds=1, learning_rate=1e-3, warmup_steps=100, log_every=100)
        config.eval = dict(samples_per_cell=200, accuracy_bar=0.9, confidence=0.95, batch=512)
    config.patterns = patterns(block)
    return config
