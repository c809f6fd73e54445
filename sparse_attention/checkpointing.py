"""Checkpoints of a training run (orbax) and the config saved beside them.

Layout of a workdir:

  ``config.json``             the ExperimentConfig of the latest invocation (``to_dict()``)
  ``checkpoints/{step}/``     orbax checkpoints, two items: ``params`` (model parameters as a plain
                              nested dict, the keys of ``nnx.to_pure_dict``) and ``opt_state`` (the optax
                              state); the step is the folder name

A checkpoint becomes visible only once fully committed (orbax writes to a temporary folder and renames
it), so a crash or a preemption mid-save leaves the previous checkpoints as the latest. Saving is
collective: every process calls ``save`` with its shards of the global arrays.

Evaluation loads a trained model with ``restore_model(workdir)``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sparse_attention.config import ExperimentConfig
from sparse_attention.model import DecoderLM
from sparse_attention.atomic_io import write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def save_config(workdir: str | os.PathLike, config: ExperimentConfig) -> None:
    """Writes config.json (atomically) on process 0."""
    if jax.process_index() == 0:
        write_json(Path(workdir) / CONFIG_FILE, config.to_dict())


def load_config(workdir: str | os.PathLike) -> ExperimentConfig | None:
    """The config saved in workdir, or None if there is none."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    return ExperimentConfig.from_config_dict(json.loads(path.read_text()))


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
        """Saves the state after ``step`` updates. Callers check it is finite first."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)))

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state) of ``step``, laid out as the abstract trees' shardings say (so a run may
        resume on another mesh or number of processes)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state)))
        return restored["params"], restored["opt_state"]

    def restore_params(self, step: int, abstract_params):
        """Only the params of ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

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
        step = available[-1] if step is None else step
        if step not in available:
            raise ValueError(f"step must be one of the saved steps {available}, got {step}")
        abstract_model = nnx.eval_shape(
            lambda: DecoderLM(config.model, config.attention, rngs=nnx.Rngs(config.seed)))
        graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                       nnx.to_pure_dict(abstract_state))
        params = checkpoints.restore_params(step, abstract_params)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), config, step
