"""Experiment configuration: frozen dataclasses built from an ml-collections ConfigDict, validated once.

The config files (`configs/*.py`) produce a ConfigDict; `ExperimentConfig.from_config_dict` turns it into
these dataclasses and rejects unknown keys, missing keys and bad values with a ValueError that names the
field (e.g. `attention.pattern`) and its valid values. Every key of the ConfigDict is a field here, so
every key is read. `to_dict()` is the JSON-able form saved beside checkpoints, and round-trips through
`from_config_dict`.

The dataclasses build modules and closures; they are never jit static arguments.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping

import jax.numpy as jnp

from sparse_attention.attention import check_impl
from sparse_attention.patterns import Pattern, PatternOrSchedule, TileGrid, as_schedule

COMPUTE_DTYPES = ("bfloat16", "float32")
PARAM_DTYPES = ("float32",)
CORPORA = ("code", "books", "files")
MIN_VOCAB_SIZE = 256  # byte-level data: every byte is a token
# Tile used to check that every layer's pattern can lay out a sequence of train.seq_len.
_CHECK_TILE = 128


def _fail(field: str, problem: str) -> typing.NoReturn:
    raise ValueError(f"{field}: {problem}")


def _check_int(field: str, value, *, minimum: int | None = None, allowed: tuple[int, ...] = ()) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(field, f"must be an integer, got {value!r}")
    if value in allowed:
        return
    if minimum is not None and value < minimum:
        also = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        _fail(field, f"must be >= {minimum}{also}, got {value}")


def _check_float(field: str, value, *, minimum: float, maximum: float = math.inf, open_min: bool = False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        _fail(field, f"must be a finite number, got {value!r}")
    if value < minimum or (open_min and value == minimum) or value > maximum:
        low = f"> {minimum}" if open_min else f">= {minimum}"
        high = "" if maximum == math.inf else f" and <= {maximum}"
        _fail(field, f"must be {low}{high}, got {value}")


def _check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        _fail(field, f"must be True or False, got {value!r}")


def _check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder LM shape and numerics. head_dim = d_model // num_heads (even, for RoPE)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    tie_embeddings: bool
    remat: bool
    rope_base: float
    compute_dtype: str
    param_dtype: str

    def __post_init__(self):
        _check_int("model.vocab_size", self.vocab_size, minimum=MIN_VOCAB_SIZE)
        for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_hidden"):
            _check_int(f"model.{name}", getattr(self, name), minimum=1)
        if self.d_model % self.num_heads:
            _fail("model.num_heads", f"must divide model.d_model={self.d_model}, got {self.num_heads}")
        if self.head_dim % 2:
            _fail("model.num_heads", f"d_model / num_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            _fail(
                "model.num_kv_heads",
                f"must divide model.num_heads={self.num_heads} (GQA groups), got {self.num_kv_heads}",
            )
        _check_bool("model.tie_embeddings", self.tie_embeddings)
        _check_bool("model.remat", self.remat)
        _check_float("model.rope_base", self.rope_base, minimum=1.0, open_min=True)
        _check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("model.param_dtype", self.param_dtype, PARAM_DTYPES)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which pattern each layer attends with, and which implementation computes it.

    `schedule` (spec strings, cycled over layers) replaces `pattern` when non-empty; when empty, `pattern`
    is used on every layer, and a schedule spec such as "shifted(64)" in `pattern` is itself per-layer.
    """

    pattern: str
    schedule: tuple[str, ...]
    impl: str
    interpret: bool

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            _fail("attention.pattern", f"must be a pattern spec string, got {self.pattern!r}")
        if isinstance(self.schedule, str) or not isinstance(self.schedule, (tuple, list)):
            _fail("attention.schedule", f"must be a list of pattern spec strings, got {self.schedule!r}")
        object.__setattr__(self, "schedule", tuple(self.schedule))
        try:
            as_schedule(self.pattern)
        except ValueError as error:
            _fail("attention.pattern", str(error))
        if self.schedule:
            if not all(isinstance(spec, str) for spec in self.schedule):
                _fail("attention.schedule", f"entries must be pattern spec strings, got {self.schedule!r}")
            try:
                as_schedule(self.schedule)
            except ValueError as error:
                _fail("attention.schedule", str(error))
        check_impl("attention.impl", self.impl)
        _check_bool("attention.interpret", self.interpret)

    @property
    def layers(self) -> PatternOrSchedule:
        """The pattern, or the per-layer schedule, that the layers cycle through."""
        return as_schedule(self.schedule if self.schedule else self.pattern)

    @property
    def spec(self) -> str:
        """One spec string for what the layers use (a schedule's spec when per-layer)."""
        return self.layers.spec

    def layer_pattern(self, layer_index: int) -> Pattern:
        """The pattern of layer `layer_index`."""
        return self.layers.layer(layer_index)

    def check_seq_len(self, seq_len: int, field: str = "train.seq_len") -> None:
        """ValueError naming `field` if some layer's pattern cannot lay out a sequence of `seq_len`."""
        _check_int(field, seq_len, minimum=1)
        layers = self.layers
        tile = min(_CHECK_TILE, seq_len)
        for index in range(layers.period):
            pattern = layers.layer(index)
            try:
                pattern.candidate_tiles(TileGrid(seq_len, tile, tile))
            except ValueError as error:
                _fail(field, f"{seq_len} cannot be used with attention pattern {pattern.spec!r}: {error}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """corpus: a built-in corpus ("code", "books") under data_dir, or "files" read from `path`."""

    corpus: str
    data_dir: str
    path: str

    def __post_init__(self):
        _check_choice("data.corpus", self.corpus, CORPORA)
        if not isinstance(self.data_dir, str) or not self.data_dir:
            _fail("data.data_dir", f"must be a non-empty path, got {self.data_dir!r}")
        if not isinstance(self.path, str):
            _fail("data.path", f"must be a string, got {self.path!r}")
        if self.corpus == "files" and not self.path:
            _fail("data.path", "must name the folder or token file to read when data.corpus='files'")
        if self.corpus != "files" and self.path:
            _fail("data.path",
                  f"must be '' unless data.corpus='files' (corpus is {self.corpus!r}), got {self.path!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule and bookkeeping. grad_clip = 0 disables clipping; checkpoint_every = 0 keeps
    only the final checkpoint."""

    steps: int
    seq_len: int
    global_batch: int
    learning_rate: float
    warmup_steps: int
    end_lr_ratio: float
    weight_decay: float
    grad_clip: float
    grad_accum: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoint: bool

    def __post_init__(self):
        for name in ("steps", "seq_len", "global_batch", "grad_accum", "log_every", "keep_checkpoints"):
            _check_int(f"train.{name}", getattr(self, name), minimum=1)
        _check_int("train.warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.steps:
            _fail("train.warmup_steps", f"must be <= train.steps={self.steps}, got {self.warmup_steps}")
        _check_int("train.checkpoint_every", self.checkpoint_every, minimum=0)
        _check_float("train.learning_rate", self.learning_rate, minimum=0.0, open_min=True)
        _check_float("train.end_lr_ratio", self.end_lr_ratio, minimum=0.0, maximum=1.0)
        _check_float("train.weight_decay", self.weight_decay, minimum=0.0)
        _check_float("train.grad_clip", self.grad_clip, minimum=0.0)
        if self.global_batch % self.grad_accum:
            _fail(
                "train.grad_accum",
                f"must divide train.global_batch={self.global_batch} (equal microbatches), got {self.grad_accum}",
            )
        _check_bool("train.async_checkpoint", self.async_checkpoint)

    @property
    def microbatch(self) -> int:
        """Sequences per microbatch, over all devices."""
        return self.global_batch // self.grad_accum


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; -1 takes all remaining devices (on data or fsdp, at most one). `seq` splits every
    sequence into that many shards (`sparse_attention.sequence_sharding`)."""

    data: int
    fsdp: int
    seq: int = 1

    def __post_init__(self):
        _check_int("mesh.data", self.data, minimum=1, allowed=(-1,))
        _check_int("mesh.fsdp", self.fsdp, minimum=1, allowed=(-1,))
        _check_int("mesh.seq", self.seq, minimum=1)
        if self.data == -1 and self.fsdp == -1:
            _fail("mesh.fsdp", "at most one mesh axis may be -1 (all remaining devices); set mesh.fsdp to a size")


# Keys added after runs were saved without them, and the value those runs had: a saved config.json of an
# older run is read with them.
_LATER_KEYS = {"mesh": {"seq": 1}}

_SECTIONS = {
    "model": ModelConfig,
    "attention": AttentionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
}


def _to_plain(value):
    """ConfigDicts and other mappings as dicts (without importing ml_collections here)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value) if isinstance(value, Mapping) else value


def _check_keys(where: str, given: Mapping, expected: list[str]) -> None:
    prefix = f"{where}." if where else ""
    unknown = sorted(set(given) - set(expected))
    missing = [key for key in expected if key not in given]
    if unknown:
        of = f" of {where}" if where else ""
        _fail(f"{prefix}{unknown[0]}", f"unknown key; valid keys{of}: {', '.join(expected)}")
    if missing:
        _fail(f"{prefix}{missing[0]}", f"missing key; every one of {', '.join(expected)} must be set")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    seed: int
    model: ModelConfig
    attention: AttentionConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig

    def __post_init__(self):
        _check_int("seed", self.seed, minimum=0)
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                _fail(name, f"must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self.attention.check_seq_len(self.train.seq_len)

    @classmethod
    def from_config_dict(cls, config) -> "ExperimentConfig":
        """From a ConfigDict (or nested mapping, e.g. `to_dict()` output) with exactly the known keys."""
        config = _to_plain(config)
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a ConfigDict or mapping, got {type(config).__name__}")
        _check_keys("", config, ["seed", *_SECTIONS])
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = _to_plain(config[name])
            if not isinstance(values, Mapping):
                _fail(name, f"must be a section of keys, got {values!r}")
            values = {**_LATER_KEYS.get(name, {}), **values}
            _check_keys(name, values, [field.name for field in dataclasses.fields(section_cls)])
            sections[name] = section_cls(**values)
        return cls(seed=config["seed"], **sections)

    def to_dict(self) -> dict:
        """JSON-able nested dict with the same keys as the ConfigDict (tuples become lists)."""
        result = {"seed": self.seed}
        for name in _SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            result[name] = {key: list(value) if isinstance(value, tuple) else value
                            for key, value in section.items()}
        return result
