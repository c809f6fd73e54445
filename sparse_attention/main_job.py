"""The README's main job: the four default variants, from reachability to trained models.

    python -m sparse_attention.main_job [--out reports/main] [--runs runs/main] [--preset tiny]

1. Reachability of each variant's attention pattern at its own depth (config.model.num_layers), at a
   sequence of REACH_SEQ_LEN: a table on the terminal, `reachability.json` and `reachability.png`.
2. Trains each variant (configs/{dense,block,window,repaired}.py at the preset) on the embedded code
   corpus into runs/main/<variant>; rerunning resumes or skips finished runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from sparse_attention import reachability, training
from sparse_attention.config import ExperimentConfig

VARIANTS = ("dense", "block", "window", "repaired")
REACH_SEQ_LEN = 1024


def variant_config(variant: str, preset: str) -> ExperimentConfig:
    """configs/<variant>.py:<preset> as a validated ExperimentConfig."""
    return ExperimentConfig.from_config_dict(importlib.import_module(f"configs.{variant}").get_config(preset))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("reports", "main"), help="report folder")
    parser.add_argument("--runs", default=os.path.join("runs", "main"), help="folder of the training workdirs")
    parser.add_argument("--preset", default="tiny", help="config preset of every variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)
    configs = {variant: variant_config(variant, args.preset) for variant in VARIANTS}

    results = [
        reachability.reachability(config.attention.layers, REACH_SEQ_LEN, config.model.num_layers)
        for config in configs.values()
    ]
    reachability.write_json(results, os.path.join(args.out, "reachability.json"))
    reachability.plot(results, os.path.join(args.out, "reachability.png"))
    print(f"reachability at S = {REACH_SEQ_LEN} after each model's depth")
    print(reachability.format_table(results))

    for variant, config in configs.items():
        print(f"\n== training {variant}: {config.attention.spec}")
        training.train(config, os.path.join(args.runs, variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
