"""Shared experiment settings; the variant files (dense, block, window, repaired) build on these.

    get_config("tiny" | "small" | "base") -> ml_collections.ConfigDict

Every key is read by `lm_experiment.config.ExperimentConfig.from_config_dict`; docs/model.md lists
them. The presets:

  tiny   CPU, minutes: 4 layers x d_model 128 on 256-token sequences, float32 (XLA's CPU bfloat16 matmuls
         are emulated and slower). The main job trains four variants of it in under 15 minutes.
  compare  one H200, the paired LM comparison (results/lm_compare): 6 layers x d_model 384, 9.6M
         parameters, 4096-token context, 380 updates of 32 sequences (49.8M tokens, 5.2 per parameter):
         about 75 s of training per run, 20 minutes for the 16 runs (docs/model.md says how it was sized).
  small  one GPU, 8192-token context (8k-32k via --config.train.seq_len): 12 layers x d_model 768, ~76M
         parameters, bfloat16 compute.
  base   larger: 24 layers x d_model 1024, ~270M parameters, 32768-token context.

`attention.pattern` here is "dense"; each variant file sets its own pattern per preset, scaled to the
preset's block size (`BLOCK_SIZE`).
"""

import ml_collections

PRESETS = ("tiny", "compare", "small", "base")
# The attention block size of each preset; the variants derive their patterns from it.
BLOCK_SIZE = {"tiny": 64, "compare": 512, "small": 512, "base": 512}

_MODEL = {
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_hidden=384,
                 remat=False, compute_dtype="float32"),
    "compare": dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, mlp_hidden=1024,
                    remat=False, compute_dtype="bfloat16"),
    "small": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, mlp_hidden=2048,
                  remat=True, compute_dtype="bfloat16"),
    "base": dict(d_model=1024, num_layers=24, num_heads=8, num_kv_heads=2, mlp_hidden=2816,
                 remat=True, compute_dtype="bfloat16"),
}

_TRAIN = {
    "tiny": dict(steps=300, seq_len=256, global_batch=16, learning_rate=3e-3, warmup_steps=30,
                 grad_accum=1, log_every=10, checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False),
    "compare": dict(steps=380, seq_len=4096, global_batch=32, learning_rate=2e-3, warmup_steps=40,
                    grad_accum=1, log_every=25, checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False),
    "small": dict(steps=5000, seq_len=8192, global_batch=16, learning_rate=1e-3, warmup_steps=250,
                  grad_accum=1, log_every=50, checkpoint_every=500, keep_checkpoints=3, async_checkpoint=True),
    "base": dict(steps=20000, seq_len=32768, global_batch=16, learning_rate=6e-4, warmup_steps=1000,
                 grad_accum=4, log_every=50, checkpoint_every=1000, keep_checkpoints=3, async_checkpoint=True),
}


def parse_preset(arg) -> str:
    """The preset named by a config-file argument ("tiny", or None for the default "tiny")."""
    preset = (arg or "tiny").strip()
    if preset not in PRESETS:
        raise ValueError(f"config preset must be one of {', '.join(PRESETS)}; got {arg!r}")
    return preset


def parse_preset_and(arg, config: str, field: str, choices: tuple[str, ...]) -> tuple[str, str]:
    """(preset, option) of a variant's argument "PRESET" or "PRESET,OPTION"; the option defaults to
    choices[0], and one outside `choices` is refused naming `config` and `field`."""
    preset, _, option = (arg or "tiny").partition(",")
    option = option.strip() or choices[0]
    if option not in choices:
        raise ValueError(f"{config} config: {field} must be one of {', '.join(choices)}; got {option!r} in {arg!r}")
    return parse_preset(preset), option


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0

    # 256 byte tokens plus 4 spare ids for special tokens. With so small a vocabulary, tying the
    # embeddings would save only vocab_size x d_model parameters, so the head is separate.
    config.model = ml_collections.ConfigDict(
        dict(vocab_size=260, tie_embeddings=False, rope_base=10000.0, param_dtype="float32", **_MODEL[preset])
    )

    config.attention = ml_collections.ConfigDict()
    config.attention.pattern = "dense"
    # A tuple, not a list, so that --config.attention.schedule='("block(64)", "dense")' can override it.
    config.attention.schedule = ()
    config.attention.impl = "auto"
    config.attention.interpret = False

    config.data = ml_collections.ConfigDict(dict(corpus="code", data_dir="data", path=""))

    config.train = ml_collections.ConfigDict(
        dict(end_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, **_TRAIN[preset])
    )

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1))
    return config
