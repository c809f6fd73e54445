"""A minuscule training run shared by the tests that need a trained workdir: d_model 32, 2 layers, seq_len 64,
repaired(16, 2, bridge), 3 steps; compiling dominates its cost."""

from pathlib import Path

from configs import repaired
from lm_experiment import data, training
from lm_experiment.config import ExperimentConfig

TINY_RUN = {"model": {"d_model": 32, "num_layers": 2, "mlp_hidden": 64},
            "train": {"seq_len": 64, "global_batch": 4, "steps": 3, "warmup_steps": 1, "log_every": 1},
            "attention": {"pattern": "repaired(16, 2, bridge)"},
            "data": {"data_dir": str(data.DEFAULT_DATA_DIR)}}


def tiny_config() -> ExperimentConfig:
    config = repaired.get_config("tiny")
    for section, values in TINY_RUN.items():
        for key, value in values.items():
            config[section][key] = value
    return ExperimentConfig.from_config_dict(config)


def train_tiny(folder: Path) -> Path:
    """The minuscule run trained into folder/tiny (the eval sets prepared too); returns the workdir."""
    data.prepare("all")
    workdir = folder / "tiny"
    training.train(tiny_config(), workdir)
    return workdir
