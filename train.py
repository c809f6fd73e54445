"""Train the decoder LM with one attention variant; see docs/training.md.

    python train.py --config configs/repaired.py:tiny --workdir runs/repaired [--config.train.steps=50 ...]

Rerunning the same command resumes from the latest checkpoint in the workdir. Every process of a
multi-host job runs the same command (--distributed decides whether to join them).

Exit status: 0 when trained to config.train.steps; 75 (EX_TEMPFAIL) when SIGTERM stopped the run after it
saved a checkpoint, so rerunning resumes; 1 on an error.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from lm_experiment import training, workdir_lock
from lm_experiment.checkpointing import CorruptCheckpointError
from lm_experiment.config import ExperimentConfig
from lm_experiment.data import DataError
from sparse_attention.attention import ImplUnavailableError

PREEMPTED_EXIT_CODE = 75
# What a user can cause and fix (workdir, devices, data, kernels, divergence, damaged checkpoints): one line
# on stderr and exit status 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (training.WorkdirError, workdir_lock.WorkdirBusyError, training.MeshError, ImplUnavailableError,
               DataError, training.NonFiniteLossError, CorruptCheckpointError)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file and preset, e.g. configs/repaired.py:tiny; override keys with "
    "--config.train.steps=100")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "folder for checkpoints, config.json, metrics.jsonl, tensorboard/ and "
    "train_summary.json; created if missing (its parent must exist)")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", training.DISTRIBUTED_MODES,
    "join the processes of a multi-process job with jax.distributed.initialize: auto = when "
    "JAX_COORDINATOR_ADDRESS, a multi-task SLURM job, Open MPI or a multi-host TPU slice is detected")
_OVERRIDE_CONFIG = flags.DEFINE_bool(
    "override_config", False, "resume a workdir's checkpoints with a config that differs from the saved one "
    "in more than train.steps and the mesh (the model and attention patterns must still match)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # orbax logs every save in detail through absl's logger; keep its warnings, and our INFO lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    training.initialize_distributed(_DISTRIBUTED.value)
    try:
        config = ExperimentConfig.from_config_dict(_CONFIG.value)
    except ValueError as error:
        raise app.UsageError(f"bad config: {error}") from error
    try:
        result = training.train(config, _WORKDIR.value, override_config=_OVERRIDE_CONFIG.value)
    except USER_ERRORS as error:
        sys.exit(f"train.py: {error}")
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


def parse_flags(argv):
    """absl's flag parsing, with a config override of a missing key as one line (ml_collections raises)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"train.py: {error}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as error:
        while isinstance(error, BaseException) and error.args:  # ml_collections wraps a KeyError's message
            error = error.args[0]
        key = str(error).replace("\n", "; ")
        sys.exit(f"train.py: a --config.* override names a key the config does not have: {key}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
