"""Checkpoints of a training run (orbax) and the config saved beside them.

Layout of a workdir:

  ``config.json``             the ExperimentConfig of the latest invocation (``to_dict()``)
  ``checkpoints/{step}/``     orbax checkpoints, three items: ``params`` (model parameters as a plain
                              nested dict, the keys of ``nnx.to_pure_dict``), ``opt_state`` (the optax
                              state) and ``integrity`` (JSON: two sums of every array's bits, computed
                              before saving); the step is the folder name

A checkpoint becomes visible only once fully committed (orbax writes to a temporary folder and renames
it), so a crash or a preemption mid-save leaves the previous checkpoints as the latest. Saving is
collective: every process calls ``save`` with its shards of the global arrays.

Every restore recomputes the sums and compares them with the saved ones, so damaged files raise
CorruptCheckpointError instead of giving a model with other weights. A resume takes the newest step that
restores and verifies (`restore_newest_valid`), and moves each newer, damaged one aside to
``checkpoints/{step}.corrupt`` so that the run can write that step again; it deletes nothing.

Evaluation loads a trained model with ``restore_model(workdir)``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from lm_experiment.config import ExperimentConfig
from lm_experiment.model import DecoderLM
from sparse_attention.atomic_io import write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
INTEGRITY_ITEM = "integrity"
CORRUPT_SUFFIX = ".corrupt"
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class CorruptCheckpointError(ValueError):
    """A checkpoint's files cannot be read, or their arrays differ from what was saved."""


def _leaf_sums(x: jax.Array) -> jax.Array:
    """uint32 [2]: the sum of the array's bits read as unsigned integers, and the sum weighted by position,
    both modulo 2^32: exact whatever the order of the reduction (so any sharding gives the same), and a
    change of any element, or two elements swapped, changes them (but for a 2^-32 chance)."""
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32).ravel()
    position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * position).sum(dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_leaf_sums, tree))


def array_sums(tree) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of a tree of arrays (sharded or not), as JSON-ready ints."""
    sums = jax.device_get(_tree_sums(tree))
    return {jax.tree_util.keystr(path): [int(value) for value in leaf]
            for path, leaf in jax.tree_util.tree_leaves_with_path(sums)}


def _first_mismatch(saved: dict, restored: dict) -> str | None:
    for path in sorted(set(saved) | set(restored)):
        if saved.get(path) != restored.get(path):
            return path
    return None


def save_config(workdir: str | os.PathLike, config: ExperimentConfig) -> None:
    """Writes config.json (atomically) on process 0."""
    if jax.process_index() == 0:
        write_json(Path(workdir) / CONFIG_FILE, config.to_dict())


def load_config(workdir: str | os.PathLike) -> ExperimentConfig | None:
    """The config saved in workdir, or None if there is none."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it is damaged or was cut short") from error
    try:
        return ExperimentConfig.from_config_dict(saved)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


class Checkpoints:
    """The checkpoints of one workdir: keeps the newest ``keep``; saves asynchronously if ``async_save``
    (a save returns once the arrays are copied to host memory; ``wait()`` blocks until it is on disk)."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool):
        self.directory = Path(workdir).resolve() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, opt_state) -> None:
        """Saves the state after ``step`` updates, with the sums of its arrays. Callers check it is finite
        first."""
        sums = {"params": array_sums(params), "opt_state": array_sums(opt_state)}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            **{INTEGRITY_ITEM: ocp.args.JsonSave(sums)}))

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state) of ``step``, laid out as the abstract trees' shardings say (so a run may
        resume on another mesh or number of processes), verified against the saved sums."""
        restored = self._restore_verified(step, params=abstract_params, opt_state=abstract_opt_state)
        return restored["params"], restored["opt_state"]

    def restore_params(self, step: int, abstract_params):
        """Only the params of ``step``, verified."""
        return self._restore_verified(step, params=abstract_params)["params"]

    def restore_newest_valid(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state) of the newest step that restores and verifies, or None if there are no
        checkpoints. Each newer step that fails is logged and moved aside (CORRUPT_SUFFIX); if every step
        fails, CorruptCheckpointError names them all."""
        failures = []
        for step in reversed(self.all_steps()):
            try:
                params, opt_state = self.restore(step, abstract_params, abstract_opt_state)
            except CorruptCheckpointError as error:
                failures.append((step, str(error)))
                continue
            for bad, reason in failures:
                log.warning("skipped the checkpoint of step %d: %s; moved it to %s%s", bad, reason, bad,
                            CORRUPT_SUFFIX)
                if jax.process_index() == 0:
                    (self.directory / str(bad)).rename(self.directory / f"{bad}{CORRUPT_SUFFIX}")
            if failures:
                if jax.process_count() > 1:  # every process sees the renames before it lists steps again
                    multihost_utils.sync_global_devices("checkpoints moved aside")
                self._manager.reload()
            return step, params, opt_state
        if failures:
            raise CorruptCheckpointError(f"no checkpoint in {self.directory} can be restored: "
                                         + "; ".join(reason for _, reason in failures))
        return None

    def _restore_verified(self, step: int, **abstract_items):
        where = f"checkpoint of step {step} in {self.directory}"
        verified = (self.directory / str(step) / INTEGRITY_ITEM).exists()
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        if verified:
            items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # whatever orbax or tensorstore raise on damaged files
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CorruptCheckpointError(f"{where} cannot be read ({type(error).__name__}: "
                                         f"{first_line[:300]})") from error
        if not verified:
            log.warning("%s has no saved sums (written before they existed): restored unverified", where)
            return restored
        for name in abstract_items:
            path = _first_mismatch(restored[INTEGRITY_ITEM][name], array_sums(restored[name]))
            if path is not None:
                raise CorruptCheckpointError(f"{where}: {name}{path} differs from the array that was saved (its "
                                             f"files were changed or damaged)")
        return restored

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def restore_model(workdir: str | os.PathLike, step: int | None = None):
    """(DecoderLM with trained params, its ExperimentConfig, step) from a training workdir; ``step``
    defaults to the latest checkpoint. Params are placed on the default device."""
    workdir = Path(workdir)
    config = load_config(workdir)
    if config is None:
        raise ValueError(f"workdir: {workdir} has no {CONFIG_FILE}; is it a training workdir?")
    checkpoints = Checkpoints(workdir, keep=1_000_000, async_save=False)
    try:
        available = checkpoints.all_steps()
        if not available:
            raise ValueError(f"workdir: {workdir} has no checkpoints under {CHECKPOINT_DIR}/")
        latest = step is None
        step = available[-1] if latest else step
        if step not in available:
            raise ValueError(f"step must be one of the saved steps {available}, got {step}")
        abstract_model = nnx.eval_shape(
            lambda: DecoderLM(config.model, config.attention, rngs=nnx.Rngs(config.seed)))
        graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                       nnx.to_pure_dict(abstract_state))
        try:
            params = checkpoints.restore_params(step, abstract_params)
        except CorruptCheckpointError as error:
            older = [s for s in available if s < step]
            hint = (f"; evaluate an earlier step with --checkpoint {checkpoints.directory / str(older[-1])}"
                    if latest and older else "")
            raise CorruptCheckpointError(f"{error}{hint}") from error
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), config, step
