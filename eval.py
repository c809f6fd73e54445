"""Evaluate trained runs on long documents and synthetic boundary diagnostics; see docs/evaluation.md.

    python eval.py --workdirs runs/dense runs/block runs/window runs/repaired --out reports/compare
    python eval.py --checkpoint runs/dense/checkpoints/200 --pattern-override "window(64)" --out reports/w64
    python eval.py --workdirs runs/dense --config.attention.pattern="block(64)" --lengths 256 1024
    python eval.py --merge reports/dense_s0/results.json reports/block_s0/results.json --out reports/all

Each run is restored from its latest checkpoint (or the --checkpoint folder) with the config saved beside
it; --config FILE.py[:ARG] replaces that config, and --config.SECTION.KEY=VALUE overrides single keys
(parameter shapes must match the checkpoint). A changed pattern is labelled in every table and plot.
Writes report.md, results.json and PNG plots into --out. --merge writes them from results.json files of
runs evaluated separately (with the same evaluation flags), without loading a model.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from lm_experiment import eval_options, eval_runs, evaluation, paired, report
from lm_experiment.data import DataError
from lm_experiment.diagnostics import DiagnosticsOptions


# The flags --merge reads; every other flag configures an evaluation and is refused with --merge.
MERGE_FLAGS = ("merge", "out", "baselines")


def _tuple(values):
    return tuple(values) if values else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="--config.SECTION.KEY=VALUE "
                                "overrides a key of every run's eval config")
    p.add_argument("--workdirs", nargs="+", default=[], metavar="DIR", help="training workdirs (latest checkpoint)")
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR",
                   help="checkpoint folders WORKDIR/checkpoints/STEP, evaluated at that step")
    p.add_argument("--merge", nargs="+", default=[], metavar="RESULTS",
                   help="report on these results.json files (or their folders) together instead of evaluating")
    p.add_argument("--config", metavar="FILE.py[:ARG]", help="config to evaluate with instead of the saved ones")
    p.add_argument("--pattern-override", metavar="SPEC", help="evaluate with this attention pattern (labelled)")
    p.add_argument("--out", required=True, help="report folder (created if missing)")
    p.add_argument("--eval-sets", nargs="+", default=list(eval_options.DEFAULT_EVAL_SETS), metavar="CORPUS:SPLIT")
    p.add_argument("--lengths", nargs="+", type=int, metavar="C",
                   help="context lengths (default: T/4, T/2, T, 2T, 4T for the longest training length T)")
    p.add_argument("--max-documents", type=int, help="documents per eval set (evenly spaced; default all)")
    p.add_argument("--max-document-tokens", type=int, help="score only each document's first tokens")
    p.add_argument("--document-chunk-tokens", type=int, metavar="N",
                   help="cut every document into chunks of N tokens, each its own unit (more units for intervals)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass")
    p.add_argument("--trailing-window", type=int, help="W of the trailing window and the ablation (default B)")
    p.add_argument("--block-size", type=int, help="reference block grid for patterns without blocks")
    p.add_argument("--ablation-targets", type=int, default=16, help="ablation targets per window")
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines", nargs="+", metavar="SPEC",
                   help="eval patterns of the paired differences' baselines (default: dense and every block(B))")
    p.add_argument("--data-dir", help="data folder (default: the first run's data.data_dir); a relative one is "
                   "relative to the current folder; eval.py never downloads: prepare corpora with "
                   "python -m lm_experiment.data prepare")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the synthetic diagnostics")
    d = DiagnosticsOptions()
    p.add_argument("--diag-seq-len", type=int, help="diagnostics sequence length (default: training length)")
    p.add_argument("--diag-steps", type=int, default=d.steps, help="fine-tuning steps of edge-pair recall")
    p.add_argument("--tracking-steps", type=int, help="fine-tuning steps of variable tracking per depth "
                   "(default: --diag-steps)")
    p.add_argument("--diag-batch", type=int, default=d.batch_size)
    p.add_argument("--diag-lr", type=float, default=d.learning_rate)
    p.add_argument("--diag-samples", type=int, default=d.eval_samples, help="held-out sequences per cell")
    p.add_argument("--edge-offsets", nargs="+", type=int, help="key offsets of the heat-map, e.g. 0 32 63")
    p.add_argument("--edge-query-offset", type=int, default=d.query_offset)
    p.add_argument("--chain-lengths", nargs="+", type=int, help="chain lengths h, e.g. 1 2 3")
    p.add_argument("--diag-depths", nargs="+", type=int, help="model depths of the tracking task, e.g. 1 4")
    return p


def _evaluated(args, rest) -> dict:
    """The results of evaluating the runs the flags name."""
    overrides = eval_runs.parse_overrides(rest)
    diagnostics = None if args.no_diagnostics else DiagnosticsOptions(
        seq_len=args.diag_seq_len, steps=args.diag_steps, tracking_steps=args.tracking_steps,
        batch_size=args.diag_batch, learning_rate=args.diag_lr, eval_samples=args.diag_samples,
        edge_offsets=_tuple(args.edge_offsets), query_offset=args.edge_query_offset,
        chain_lengths=_tuple(args.chain_lengths), depths=_tuple(args.diag_depths),
        seed=args.seed)
    options = eval_options.EvalOptions(
        eval_sets=tuple(args.eval_sets), lengths=tuple(args.lengths) if args.lengths else None,
        max_documents=args.max_documents, max_document_tokens=args.max_document_tokens,
        document_chunk_tokens=args.document_chunk_tokens, batch_tokens=args.batch_tokens,
        trailing_window=args.trailing_window, block_size=args.block_size, ablation_targets=args.ablation_targets,
        bootstrap_samples=args.bootstrap_samples, seed=args.seed, data_dir=args.data_dir, diagnostics=diagnostics,
        baselines=_tuple(args.baselines))
    runs = eval_runs.load_runs(args.workdirs, checkpoints=args.checkpoint, config_file=args.config,
                                overrides=overrides, pattern_override=args.pattern_override)
    return evaluation.evaluate(runs, options)


def _merged(args, rest, arguments: argparse.ArgumentParser) -> dict:
    """The results of the --merge files, merged."""
    refused = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
               if name not in MERGE_FLAGS and value != arguments.get_default(name)] + rest
    if refused:
        raise ValueError(f"--merge combines finished results.json files; it cannot be combined with "
                         f"{', '.join(refused)} (evaluation flags)")
    files = [Path(path) / "results.json" if Path(path).is_dir() else Path(path) for path in args.merge]
    results_list = []
    for file in files:
        if not file.is_file():
            raise ValueError(f"--merge: no such file {file}")
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--merge: {file} is not JSON: {error}") from error
        if not isinstance(results, dict) or not {"settings", "models"} <= set(results):
            raise ValueError(f"--merge: {file} is not an eval.py results.json (no settings and models)")
        results_list.append(results)
    return paired.merge_results(results_list, [str(file.parent) for file in files], _tuple(args.baselines))


def main(argv=None) -> int:
    arguments = parser()
    args, rest = arguments.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        report.check_out_dir(args.out)
        results = _merged(args, rest, arguments) if args.merge else _evaluated(args, rest)
    except (ValueError, DataError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    for path in report.write_report(results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
