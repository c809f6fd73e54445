"""Trained runs as evaluated: restored checkpoints, their configs with --config overrides, labels, and
the block grid each run is measured on."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from lm_experiment.checkpointing import CHECKPOINT_DIR, CONFIG_FILE, restore_model
from lm_experiment.config import ExperimentConfig
from lm_experiment.model import DecoderLM
from lm_experiment.training import SUMMARY_FILE
from sparse_attention.config_files import load_config_file
from sparse_attention.patterns import PatternOrSchedule, as_schedule

# Model fields that fix the shapes of the parameters: an eval config must keep the checkpoint's values.
SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_hidden", "tie_embeddings")
# Config fields whose change alters what the model computes; a changed one is named in the run's label.
COMPUTE_FIELDS = ("model.rope_base", "model.compute_dtype", "attention.pattern", "attention.schedule")


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Where block edges fall: position p starts a block when (p + offset) % size == 0. `source` says
    whether the grid is the pattern's own ("pattern") or the reference grid given to patterns without
    blocks ("reference")."""

    size: int
    offset: int
    source: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pattern_block_grid(schedule: PatternOrSchedule) -> tuple[int, int] | None:
    """(size, offset) of the block grid of the first layer's pattern (`Pattern.block_grid`), or None."""
    return as_schedule(schedule).layer(0).block_grid()


@dataclasses.dataclass(frozen=True, eq=False)
class EvalRun:
    """One trained model as evaluated: its restored parameters under the eval config."""

    label: str
    workdir: str
    step: int
    model: DecoderLM
    config: ExperimentConfig  # the eval config (the trained one unless overridden)
    trained_config: ExperimentConfig
    overrides: dict  # "section.key" -> {"trained": ..., "eval": ...}, the fields that change the computation
    train_summary: dict | None

    @property
    def schedule(self) -> PatternOrSchedule:
        return self.config.attention.layers

    @property
    def train_seq_len(self) -> int:
        return self.trained_config.train.seq_len


def parse_overrides(arguments: Sequence[str]) -> list[tuple[str, object]]:
    """`--config.SECTION.KEY=VALUE` arguments as (dotted key, value); VALUE is a Python literal when it
    parses as one (64, 1e-3, True, ("block(64)", "dense")), otherwise the string itself (window(64))."""
    overrides = []
    for argument in arguments:
        key, separator, text = argument.removeprefix("--config.").partition("=")
        if not argument.startswith("--config.") or not separator or not key:
            raise ValueError(f"expected --config.SECTION.KEY=VALUE, got {argument!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        overrides.append((key, value))
    return overrides


def _apply_override(config: dict, key: str, value) -> None:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if not isinstance(node, dict) or part not in node:
            valid = ", ".join(node) if isinstance(node, dict) else "none (not a section)"
            raise ValueError(f"--config.{key}: unknown key {part!r} in {where}; valid keys: {valid}")
        if depth == len(parts) - 1:
            node[part] = list(value) if isinstance(value, tuple) else value
        else:
            node = node[part]


def config_file_dict(location: str) -> dict:
    """The validated `to_dict()` of "path/to/config.py[:arg]" (the file's get_config(arg))."""
    return ExperimentConfig.from_config_dict(load_config_file(location)).to_dict()


def _checkpoint_location(path: str) -> tuple[Path, int]:
    """(workdir, step) of a checkpoint folder WORKDIR/checkpoints/STEP."""
    folder = Path(path)
    if folder.parent.name != CHECKPOINT_DIR or not folder.name.isdigit():
        raise ValueError(f"--checkpoint: expected a folder WORKDIR/{CHECKPOINT_DIR}/STEP, got {path!r}")
    if not folder.is_dir():
        raise ValueError(f"--checkpoint: {path} does not exist")
    return folder.parent.parent, int(folder.name)


def run_labels(workdirs: Sequence[Path]) -> list[str]:
    """The workdir's name, or its path where two runs share a name."""
    names = [w.name for w in workdirs]
    return [w.name if names.count(w.name) == 1 else str(w) for w in workdirs]


def load_runs(workdirs: Sequence[str] = (), *, checkpoints: Sequence[str] = (), config_file: str | None = None,
              overrides: Sequence[tuple[str, object]] = (), pattern_override: str | None = None) -> list[EvalRun]:
    """Restores each workdir's latest checkpoint (each checkpoint folder's own step) with the config saved
    beside it.

    config_file replaces the saved configs; `overrides` (dotted key, value) apply on top; pattern_override
    sets attention.pattern and clears attention.schedule. The parameter shapes must stay those of the
    checkpoint (SHAPE_FIELDS); a changed pattern, schedule, rope_base or compute dtype is allowed and
    appears in the run's label.
    """
    locations = [(Path(w), None) for w in workdirs] + [_checkpoint_location(c) for c in checkpoints]
    if not locations:
        raise ValueError("nothing to evaluate: give --workdirs or --checkpoint")
    base = config_file_dict(config_file) if config_file else None
    runs = []
    for label, (workdir, step) in zip(run_labels([w for w, _ in locations]), locations):
        if not workdir.is_dir():
            raise ValueError(f"workdir: {workdir} does not exist")
        if not (workdir / CONFIG_FILE).exists():
            raise ValueError(f"workdir: {workdir} has no {CONFIG_FILE}; is it a training workdir?")
        model, trained, step = restore_model(workdir, step)
        wanted = copy.deepcopy(base) if base is not None else trained.to_dict()
        for key, value in overrides:
            _apply_override(wanted, key, value)
        if pattern_override is not None:
            wanted["attention"]["pattern"] = pattern_override
            wanted["attention"]["schedule"] = []
        try:
            config = ExperimentConfig.from_config_dict(wanted)
        except ValueError as error:
            raise ValueError(f"eval config for {workdir}: {error}") from error
        for name in SHAPE_FIELDS:
            if getattr(config.model, name) != getattr(trained.model, name):
                raise ValueError(
                    f"model.{name}: the eval config has {getattr(config.model, name)!r} but the checkpoint in "
                    f"{workdir} was trained with {getattr(trained.model, name)!r}; its parameters fit only the "
                    f"trained shape (override patterns, not model sizes)")
        changed = {}
        for field in COMPUTE_FIELDS:
            section, key = field.split(".")
            before, now = trained.to_dict()[section][key], config.to_dict()[section][key]
            if before != now:
                changed[field] = {"trained": before, "eval": now}
        if changed or config.model != trained.model or config.attention != trained.attention:
            model = _rebuild(model, config)
        if changed:
            label = f"{label} [eval {_override_text(changed, config)}]"
        summary_path = workdir / SUMMARY_FILE
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        runs.append(EvalRun(label=label, workdir=str(workdir), step=step, model=model, config=config,
                            trained_config=trained, overrides=changed, train_summary=summary))
    return runs


def _override_text(changed: dict, config: ExperimentConfig) -> str:
    parts = []
    if "attention.pattern" in changed or "attention.schedule" in changed:
        parts.append(config.attention.spec)
    parts += [f"{field.split('.')[1]}={change['eval']}" for field, change in changed.items()
              if field.startswith("model.")]
    return ", ".join(parts)


def _rebuild(model: DecoderLM, config: ExperimentConfig) -> DecoderLM:
    """The same parameters in a DecoderLM built from `config` (another pattern or numerics)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(config.model, config.attention, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
