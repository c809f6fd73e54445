"""The README's main job: the four default variants, from reachability to (once trained) comparison.

    python -m sparse_attention.main_job [--out reports/main]

Writes the reachability report of the `tiny` presets' patterns (block, window, both repairs) at the
sequence length and depth below: a table on the terminal, `reachability.json` and `reachability.png`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from sparse_attention import reachability

# The four default variants at the tiny preset's block size (64) and repair width (8).
VARIANTS = ("block(64)", "window(64)", "repaired(64, 8, bridge)", "repaired(64, 8, prefix)")
REACH_SEQ_LEN = 1024
REACH_LAYERS = 4


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("reports", "main"), help="output folder")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    results = [reachability.reachability(spec, REACH_SEQ_LEN, REACH_LAYERS) for spec in VARIANTS]
    reachability.write_json(results, os.path.join(args.out, "reachability.json"))
    reachability.plot(results, os.path.join(args.out, "reachability.png"))
    print(f"reachability after {REACH_LAYERS} layers at S = {REACH_SEQ_LEN}")
    print(reachability.format_table(results))
    print(f"wrote {args.out}/reachability.json and reachability.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
