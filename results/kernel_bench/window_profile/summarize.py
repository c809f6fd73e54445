"""Issue 15: a markdown summary of Nsight Compute raw exports (`ncu --import X.ncu-rep --page raw --csv`).

    python results/kernel_bench/window_profile/summarize.py profile1.csv [profile2.csv ...]

For each profiled kernel: its duration, the busiest pipes (share of the active cycles in which each pipe
issued), issue activity, and the warp stall reasons that cost the most cycles per issued instruction.
Metrics a profile lacks are left blank; nothing is derived that the profiler did not measure.
"""

import csv
import re
import sys
from pathlib import Path

DURATION = "gpu__time_duration.sum"
MICROSECONDS_PER = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
COLUMNS = {  # heading: metric
    "registers": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "SM cycles": "sm__cycles_elapsed.avg",
    "issue active %": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "tensor % of elapsed": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "xu (exp) %": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "fma %": "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "alu %": "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "lsu %": "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "warp cycles / issue": "smsp__average_warp_latency_per_inst_issued.ratio",
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
TOP_STALLS = 6


def read_profile(path: Path) -> list[dict[str, str]]:
    """One dict per profiled kernel launch; values are the export's text, with its units row applied to the
    duration (microseconds)."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if len(rows) < 3:
        raise ValueError(f"{path}: no profiled kernel (an ncu raw export has a header, a units row, then kernels)")
    header, units, *launches = rows
    unit_of = dict(zip(header, units))
    kernels = []
    for launch in launches:
        kernel = dict(zip(header, launch))
        if DURATION in kernel:
            scale = MICROSECONDS_PER.get(unit_of.get(DURATION, ""))
            if scale is None:
                raise ValueError(f"{path}: unknown unit {unit_of.get(DURATION)!r} of {DURATION}")
            kernel[DURATION] = f"{_number(kernel[DURATION]) * scale:.1f}"
        kernels.append(kernel)
    return kernels


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _shown(text: str) -> str:
    """Counts with thousands separators, other numbers to one decimal; anything else as exported."""
    try:
        value = _number(text)
    except ValueError:
        return text
    return f"{value:,.0f}" if abs(value) >= 1000 or value.is_integer() else f"{value:.1f}"


def _short_name(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def summary(paths: list[Path]) -> str:
    lines = ["| profile | kernel | duration (us) | " + " | ".join(COLUMNS) + " |",
             "| --- " * (3 + len(COLUMNS)) + "|"]
    stall_lines = []
    for path in paths:
        for kernel in read_profile(path):
            name = _short_name(kernel.get("Kernel Name", "?"))
            values = [kernel.get(DURATION, "")] + [kernel.get(metric, "") for metric in COLUMNS.values()]
            lines.append(f"| {path.stem} | `{name}` | " + " | ".join(map(_shown, values)) + " |")
            stalls = sorted(((_number(value), STALL.match(metric)[1]) for metric, value in kernel.items()
                             if STALL.match(metric) and value not in ("", "n/a")), reverse=True)
            named = ", ".join(f"{reason} {cycles:.2f}" for cycles, reason in stalls[:TOP_STALLS])
            stall_lines.append(f"- {path.stem}, `{name}`: {named or 'no stall metrics'}")
    return "\n".join(lines + ["", "Warp cycles per issued instruction by stall reason, largest first:", ""]
                     + stall_lines) + "\n"


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: summarize.py PROFILE.csv [PROFILE.csv ...] (ncu --page raw --csv exports)")
    print(summary([Path(argument) for argument in sys.argv[1:]]), end="")


if __name__ == "__main__":
    main()
