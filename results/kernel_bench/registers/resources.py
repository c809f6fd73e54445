"""Issue 15: what ptxas made of the `mosaic_gpu` kernels: registers, spills and its warnings.

    python results/kernel_bench/registers/resources.py --patterns "dense;window(1024)" --head-dims 128,64 \
        --variants '[{"overlap_backward": true}]' --out resources.json

Each case (pattern, head_dim, kv heads, variant) compiles forward+backward at --seq in a child process with
Mosaic GPU's dumps on (`MOSAIC_GPU_DUMP_PTXAS`, `MOSAIC_GPU_DUMP_TO` a fresh folder), and this script reads
each kernel's `.ptxas` log back: registers, stack frame and spill bytes, and ptxas's warnings (spills, wgmma
serialized). The folder also receives the PTX and Mosaic GPU's MLIR passes, which are not read; no SASS
listing appeared there on the H200 image. Variants override fields of the defaults
(`BlockSizes.for_head_dim(head_dim, pattern, seq)`), as in `../tuning/sweep.py`, which times them. Needs a
Hopper GPU.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from sparse_attention.atomic_io import write_json

PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_WARNING = re.compile(r"(warning|Performance Loss)", re.IGNORECASE)  # e.g. wgmma serialized by ptxas
BEFORE_FUNCTIONS = "(file)"  # the key of warnings that come before a log's first function

CHILD = """
import dataclasses, json, sys
import jax
from lm_experiment.bench import Shape, make_inputs, timed_function
from sparse_attention.kernels import mosaic_gpu
from sparse_attention.patterns import parse
spec, head_dim, kv_heads, heads, seq, overrides = json.loads(sys.argv[1])
shape = Shape(1, seq, heads, kv_heads, head_dim, "bfloat16")
sizes = dataclasses.replace(mosaic_gpu.BlockSizes.for_head_dim(head_dim, parse(spec), seq), **overrides)
def forward(q, k, v):
    return mosaic_gpu.attention(q, k, v, parse(spec), scale=head_dim ** -0.5, block_sizes=sizes)
jax.block_until_ready(timed_function(forward, "fwd_bwd")(*make_inputs(shape)))
"""


def read_ptxas(text: str) -> dict[str, dict]:
    """{function: {registers, stack, spill_stores, spill_loads, warnings}} from ptxas's verbose log."""
    kernels, current = {}, None
    for line in text.splitlines():
        if match := PTXAS_FUNCTION.search(line):
            current = kernels.setdefault(match.group(1), {})
        elif PTXAS_WARNING.search(line):
            (current if current is not None else kernels.setdefault(BEFORE_FUNCTIONS, {})).setdefault(
                "warnings", []).append(line.strip()[:300])
        elif current is not None and (match := PTXAS_REGISTERS.search(line)):
            current["registers"] = int(match.group(1))
        elif current is not None and (match := PTXAS_SPILLS.search(line)):
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
    return kernels


def resources(dump: pathlib.Path) -> dict[str, dict]:
    """{file: {function: figures}} for every ptxas log in the dump. Files, not function names, are the keys: the
    dump names a file after its kernel, and every kernel's function has the same name."""
    return {path.name: read_ptxas(path.read_text(errors="replace")) for path in sorted(dump.rglob("*.ptxas"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", default="16", help="','-separated kv head counts")
    parser.add_argument("--head-dims", default="128", help="','-separated head dims")
    parser.add_argument("--patterns", default="dense;window(1024)", help="';'-separated pattern specs")
    parser.add_argument("--variants", type=json.loads, default=[],
                        help="JSON list of objects of BlockSizes fields overriding the head_dim's defaults")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.patterns.split(";"):
        for head_dim in map(int, args.head_dims.split(",")):
            for kv_heads in map(int, args.kv_heads.split(",")):
                for overrides in [{}] + args.variants:
                    with tempfile.TemporaryDirectory() as dump:
                        environment = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump)
                        case = [spec, head_dim, kv_heads, args.heads, args.seq, overrides]
                        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], env=environment,
                                               capture_output=True, text=True)
                        row = dict(pattern=spec, head_dim=head_dim, kv_heads=kv_heads, variant=overrides,
                                   status="ok" if child.returncode == 0 else f"error: {child.stderr[-400:]}",
                                   files=sorted(p.name for p in pathlib.Path(dump).rglob("*") if p.is_file()),
                                   kernels=resources(pathlib.Path(dump)))
                    rows.append(row)
                    for file, kernels in sorted(row["kernels"].items()):
                        for name, figures in kernels.items():
                            print(f"{spec:<22} d{head_dim:<4} kv{kv_heads:<3} {json.dumps(overrides):<34} "
                                  f"{file[:40]:<40} {name[:30]:<30} "
                                  + " ".join(f"{key}={value}" for key, value in figures.items()
                                             if key != "warnings"), flush=True)
                            for warning in figures.get("warnings", []):
                                print(f"    {warning}", flush=True)
                    if not row["kernels"]:
                        print(f"{spec:<22} d{head_dim:<4} kv{kv_heads:<3} {json.dumps(overrides):<34} "
                              f"no kernels found; {row['status'][:200]} files={row['files'][:8]}", flush=True)
                    write_json(args.out, dict(seq=args.seq, heads=args.heads, rows=rows))


if __name__ == "__main__":
    main()
