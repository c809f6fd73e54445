"""The README's main job: the four default variants, from reachability to trained and evaluated models.

    python -m lm_experiment.main_job [--out reports/main] [--runs runs/main] [--preset tiny]

1. Reachability of each variant's attention pattern at its own depth (config.model.num_layers), at a
   sequence of REACH_SEQ_LEN: a table on the terminal, `reachability.json` and `reachability.png`.
2. Trains each variant (configs/{dense,block,window,repaired}.py at the preset) on the embedded code
   corpus into runs/main/<variant>; rerunning resumes or skips finished runs.
3. Evaluates the four runs (lm_experiment.evaluation) into the same folder: `report.md`,
   `results.json` and the plots. The evaluation is subsampled (`main_eval_options`) so that the whole job
   takes under 20 minutes on a 2-core CPU; the report states the subsampling. The fine-tuned synthetic
   diagnostics are left out (eval.py runs them).
4. The boundary copy task trained from scratch at the `tiny` preset of configs/boundary_tasks.py (seven
   patterns, depths 1 and 2; lm_experiment.boundary_tasks) into <out>/boundary_tasks/, and prints
   its bars and agreement with the reachability prediction.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from lm_experiment import boundary_report, boundary_tasks, data, eval_options, eval_runs, evaluation, report, training
from lm_experiment.config import ExperimentConfig
from sparse_attention import reachability
from sparse_attention.config_files import load_config_file

VARIANTS = ("dense", "block", "window", "repaired")
REACH_SEQ_LEN = 1024


def variant_config(variant: str, preset: str) -> ExperimentConfig:
    """configs/<variant>.py:<preset> as a validated ExperimentConfig."""
    return ExperimentConfig.from_config_dict(load_config_file(f"configs/{variant}.py:{preset}"))


def main_eval_options() -> eval_options.EvalOptions:
    """The main job's evaluation, cut to a few minutes on a 2-core CPU at the tiny preset: the default
    lengths (T/4 .. 4T: 64 to 1024 for tiny), 8 documents per eval set (first 4096 tokens each), 8 ablation
    targets per window. Without the fine-tuned diagnostics: after short fine-tunes they stayed at chance for
    every sparse model, so they could not show what reachability predicts; the boundary tasks trained from
    scratch (step 4) do."""
    return eval_options.EvalOptions(max_documents=8, max_document_tokens=4096, ablation_targets=8, diagnostics=None)


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

    print("\n== evaluating")
    data.prepare("all")  # the eval sets (code:long, books:long); evaluation itself never downloads
    runs = eval_runs.load_runs([os.path.join(args.runs, variant) for variant in VARIANTS])
    results = evaluation.evaluate(runs, main_eval_options())
    paths = report.write_report(results, args.out)
    print(report.bits_per_byte_tables(results))
    print("\n".join(str(path) for path in paths))

    print("\n== boundary copy task, trained from scratch (configs/boundary_tasks.py:tiny)")
    config = boundary_tasks.BoundaryTaskConfig.from_config_dict(load_config_file("configs/boundary_tasks.py:tiny"))
    out = os.path.join(args.out, "boundary_tasks")
    results = boundary_tasks.run(config, on_progress=lambda partial: boundary_report.write(partial, out))
    paths = boundary_report.write(results, out)
    print(boundary_report.summary_text(results))
    print("\n".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
