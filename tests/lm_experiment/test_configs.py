import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from lm_experiment.config import ExperimentConfig
from lm_experiment.model import DecoderLM, attention_impl_summary

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VARIANTS = ("dense", "block", "window", "repaired", "learned")
PRESETS = ("tiny", "compare", "small", "base")
EXPECTED_PATTERN = {
    "dense": {"tiny": "dense", "compare": "dense", "small": "dense", "base": "dense"},
    "block": {"tiny": "block(64)", "compare": "block(512)", "small": "block(512)", "base": "block(512)"},
    "window": {"tiny": "window(32)", "compare": "window(256)", "small": "window(256)", "base": "window(256)"},
    "repaired": {
        "tiny": "repaired(64, 8, bridge)",
        "compare": "repaired(512, 64, bridge)",
        "small": "repaired(512, 64, bridge)",
        "base": "repaired(512, 64, bridge)",
    },
    "learned": {
        "tiny": "topk(64, 2) | repaired(64, 8, bridge)",
        "compare": "topk(512, 4) | repaired(512, 64, bridge)",
        "small": "topk(512, 4) | repaired(512, 64, bridge)",
        "base": "topk(512, 4) | repaired(512, 64, bridge)",
    },
}


def load_config(argument: str):
    """What ml_collections' config_flags does with --config=FILE[:ARG], without absl flags."""
    path, _, arg = argument.partition(":")
    spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", CONFIGS / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def param_count(model) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_and_preset_builds_a_model(variant, preset):
    config = ExperimentConfig.from_config_dict(load_config(f"{variant}.py:{preset}"))
    assert config.attention.pattern == EXPECTED_PATTERN[variant][preset]
    assert config.attention.schedule == ()
    assert [config.attention.layer_pattern(i).spec for i in range(config.model.num_layers)] == [
        EXPECTED_PATTERN[variant][preset]
    ] * config.model.num_layers
    abstract = nnx.eval_shape(lambda: DecoderLM(config.model, config.attention, rngs=nnx.Rngs(0)))
    expected_millions = {"tiny": (0.5, 1.5), "compare": (9, 11), "small": (60, 90), "base": (240, 300)}[preset]
    assert expected_millions[0] * 1e6 < param_count(abstract) < expected_millions[1] * 1e6
    assert "xla" in attention_impl_summary(config, config.train.seq_len)


def test_presets_scale_as_documented():
    tiny, compare, small, base = (ExperimentConfig.from_config_dict(load_config(f"dense.py:{p}")) for p in PRESETS)
    # The comparison's budget: at least 5 training tokens per parameter (docs/model.md).
    parameters = param_count(nnx.eval_shape(lambda: DecoderLM(compare.model, compare.attention, rngs=nnx.Rngs(0))))
    assert compare.train.steps * compare.train.global_batch * compare.train.seq_len >= 5 * parameters
    assert tiny.model.compute_dtype == "float32" and small.model.compute_dtype == "bfloat16"
    assert small.train.seq_len == 8192 and base.train.seq_len == 32768
    assert small.model.d_model == 768 and small.model.num_layers == 12
    assert base.model.d_model >= 1024 and base.model.num_layers == 24


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_runs_and_starts_near_uniform(variant):
    config = ExperimentConfig.from_config_dict(load_config(f"{variant}.py:tiny"))
    model = DecoderLM(config.model, config.attention, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(2), (2, config.train.seq_len + 1), 0, 256)
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, config.train.seq_len, config.model.vocab_size) and logits.dtype == np.float32
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert abs(float(loss) - math.log(config.model.vocab_size)) < 0.1


def test_repaired_takes_preset_and_mode():
    assert load_config("repaired.py:tiny,prefix").attention.pattern == "repaired(64, 8, prefix)"
    assert load_config("repaired.py:small, bridge").attention.pattern == "repaired(512, 64, bridge)"
    assert load_config("repaired.py").attention.pattern == "repaired(64, 8, bridge)"
    config = ExperimentConfig.from_config_dict(load_config("repaired.py:base,prefix"))
    assert config.attention.layer_pattern(5).spec == "repaired(512, 64, prefix)"
    with pytest.raises(ValueError, match="mode must be one of bridge, prefix"):
        load_config("repaired.py:tiny,middle")
    with pytest.raises(ValueError, match="preset must be one of tiny, compare, small, base"):
        load_config("block.py:huge")


def test_learned_takes_preset_and_form():
    assert load_config("learned.py:small,alone").attention.pattern == "topk(512, 4)"
    assert load_config("learned.py").attention.pattern == "topk(64, 2) | repaired(64, 8, bridge)"
    with pytest.raises(ValueError, match="form must be one of repaired, alone"):
        load_config("learned.py:tiny,prefix")


def test_overrides_by_setting_fields():
    cd = load_config("block.py:tiny")
    cd.train.seq_len = 512
    cd.attention.schedule = ["block(64)", "window(32)", "dense"]
    cd.model.num_kv_heads = 1
    config = ExperimentConfig.from_config_dict(cd)
    assert config.train.seq_len == 512 and config.model.num_kv_heads == 1
    assert [config.attention.layer_pattern(i).spec for i in range(4)] == [
        "block(64)", "window(32)", "dense", "block(64)"
    ]
    cd.attention.schedule = ()
    cd.attention.pattern = "shifted(64)"
    config = ExperimentConfig.from_config_dict(cd)
    assert [config.attention.layer_pattern(i).spec for i in range(3)] == [
        "block(64)", "block(64, 32)", "block(64)"
    ]
    summary = attention_impl_summary(config, 512)
    assert "block(64) on layers 0,2 -> xla" in summary and "block(64, 32) on layers 1,3 -> xla" in summary


@pytest.mark.filterwarnings(r"ignore:the load_module\(\) method is deprecated")  # inside ml_collections
def test_command_line_overrides_through_config_flags(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    argv = [
        "train",
        "--config=configs/repaired.py:tiny,prefix",
        "--config.train.seq_len=128",
        "--config.attention.schedule=('block(64)', 'repaired(64, 4, bridge)')",
        "--config.data.corpus=files",
        "--config.data.path=/tmp/corpus",
        "--config.model.remat=True",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = ExperimentConfig.from_config_dict(flag_values.config)
    assert config.attention.pattern == "repaired(64, 8, prefix)"
    assert config.attention.layer_pattern(1).spec == "repaired(64, 4, bridge)"
    assert config.train.seq_len == 128 and config.model.remat
    assert (config.data.corpus, config.data.path) == ("files", "/tmp/corpus")


def test_to_dict_is_json_and_round_trips():
    cd = load_config("repaired.py:small,prefix")
    cd.attention.schedule = ("block(512)", "dense")
    config = ExperimentConfig.from_config_dict(cd)
    restored = ExperimentConfig.from_config_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    attention = {**cd.attention.to_dict(), "schedule": ["block(512)", "dense"]}
    assert config.to_dict() == {**cd.to_dict(), "attention": attention}


def _set(path: str, value, *more):
    """A mutation of a config dict: _set("train.seq_len", 0) or _set(path, value, path2, value2, ...)."""
    def mutate(cd):
        for field, new in zip((path, *more[::2]), (value, *more[1::2])):
            section, _, key = field.rpartition(".")
            (cd[section] if section else cd)[key] = new
    return mutate


BAD_CONFIGS = [
    (_set("attention.pattern", "blocky(64)"), "attention.pattern", "unknown pattern 'blocky'"),
    (_set("attention.pattern", "repaired(64, 128, bridge)"), "attention.pattern", "must be <= B"),
    (_set("attention.schedule", ("block(64)", "shifted(64)")), "attention.schedule", "single patterns"),
    (_set("attention.schedule", "block(64)"), "attention.schedule", "list of pattern spec strings"),
    (
        _set("attention.pattern", "random_blocks(1, 2, 0)", "train.seq_len", 2_000_000),
        "train.seq_len",
        "2000000 cannot be used with attention pattern 'random_blocks(1, 2, 0)'",
    ),
    (_set("attention.impl", "cuda"), "attention.impl", "auto, reference, xla"),
    (_set("attention.interpret", "yes"), "attention.interpret", "True or False"),
    (_set("model.num_kv_heads", 3), "model.num_kv_heads", "must divide model.num_heads=4"),
    (_set("model.num_heads", 3), "model.num_heads", "must divide model.d_model=128"),
    (_set("model.num_heads", 128), "model.num_heads", "must be even"),
    (_set("model.compute_dtype", "float16"), "model.compute_dtype", "bfloat16, float32"),
    (_set("model.param_dtype", "bfloat16"), "model.param_dtype", "float32"),
    (_set("model.vocab_size", 100), "model.vocab_size", ">= 256"),
    (_set("model.d_model", 128.0), "model.d_model", "must be an integer"),
    (_set("data.corpus", "wiki"), "data.corpus", "code, books, files"),
    (_set("data.corpus", "files"), "data.path", "must name the folder"),
    (_set("data.path", "/tmp/x"), "data.path", "must be '' unless data.corpus='files'"),
    (_set("train.seq_len", 0), "train.seq_len", ">= 1"),
    (_set("train.grad_accum", 3), "train.grad_accum", "must divide train.global_batch=16"),
    (_set("train.warmup_steps", 10**6), "train.warmup_steps", "<= train.steps"),
    (_set("train.end_lr_ratio", 1.5), "train.end_lr_ratio", "<= 1.0"),
    (_set("train.learning_rate", 0.0), "train.learning_rate", "> 0.0"),
    (_set("mesh.data", 0), "mesh.data", ">= 1 (or -1)"),
    (_set("mesh.fsdp", -1), "mesh.fsdp", "at most one mesh axis"),
    (_set("seed", -1), "seed", ">= 0"),
]


@pytest.mark.parametrize("mutate, field, detail", BAD_CONFIGS, ids=[f"{f}-{d}" for _, f, d in BAD_CONFIGS])
def test_bad_configs_name_the_field_and_valid_values(mutate, field, detail):
    cd = load_config("repaired.py:tiny").to_dict()  # a plain dict: ConfigDict would refuse wrong types itself
    mutate(cd)
    with pytest.raises(ValueError) as error:
        ExperimentConfig.from_config_dict(cd)
    message = str(error.value)
    assert message.startswith(f"{field}:") and detail in message


def test_every_key_is_read():
    cd = load_config("dense.py:tiny").to_dict()
    fields = {name: {f.name for f in dataclasses.fields(getattr(ExperimentConfig.from_config_dict(cd), name))}
              for name in ("model", "attention", "data", "train", "mesh")}
    assert set(cd) == {"seed", *fields} and all(set(cd[name]) == keys for name, keys in fields.items())

    extra = load_config("dense.py:tiny")
    extra.train.dropout = 0.1
    with pytest.raises(ValueError, match=r"^train\.dropout: unknown key; valid keys of train: steps, seq_len"):
        ExperimentConfig.from_config_dict(extra)
    top = load_config("dense.py:tiny")
    top.notes = "x"
    with pytest.raises(ValueError, match=r"^notes: unknown key"):
        ExperimentConfig.from_config_dict(top)
    missing = cd.copy()
    missing["model"] = {k: v for k, v in cd["model"].items() if k != "rope_base"}
    with pytest.raises(ValueError, match=r"^model\.rope_base: missing key"):
        ExperimentConfig.from_config_dict(missing)
    with pytest.raises(ValueError, match=r"^mesh: missing key"):
        ExperimentConfig.from_config_dict({k: v for k, v in cd.items() if k != "mesh"})


def test_load_config_file_imports_siblings_from_any_working_directory(tmp_path, monkeypatch):
    from sparse_attention.config_files import load_config_file

    folder = tmp_path / "project" / "settings_for_test"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "shared.py").write_text("WIDTH = 7\n")
    (folder / "one.py").write_text("from settings_for_test import shared\n\n"
                                   "def get_config(arg=None):\n    return {'width': shared.WIDTH, 'arg': arg}\n")
    (folder / "none.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert load_config_file(str(folder / "one.py")) == {"width": 7, "arg": None}
    assert load_config_file(f"{folder / 'one.py'}:wide") == {"width": 7, "arg": "wide"}
    with pytest.raises(ValueError, match="no such file"):
        load_config_file(str(folder / "missing.py:tiny"))
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config_file(str(folder / "none.py"))
