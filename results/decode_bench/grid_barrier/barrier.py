"""What a grid-wide barrier costs on this GPU: the floor under any one-kernel decoding step (issue 19).

A decoding step of the `small` preset has at least four grid-wide dependencies per layer (q|k|v before
attention, attention before the output projection, the residual before the MLP, the MLP's hidden vector before
its down projection), 48 in 12 layers, plus the logits. One persistent kernel must synchronize its programs
there; launches do it for separate kernels. This times that synchronization alone, in Triton proper (Pallas's
Triton lowering could not express it: results/decode_bench/fused_layer/), with one program per multiprocessor:

  barrier   every program adds 1 to a counter (release) and polls it (acquire) until all have arrived
  exchange  the same, after each program writes its slice of a vector and before it reads the whole vector
            the other programs wrote in the round before: the least a dependent phase of a step can do

Each mode runs `--rounds` rounds in one launch; the time per round is (t(rounds) - t(0)) / rounds, medians of
`--runs` launches timed by CUDA events. The exchange mode checks every value it reads (`stale_reads` must be 0:
a barrier that did not hold would let a program read the round before's values).

python barrier.py --out barrier.json   (needs torch and triton with a CUDA GPU)
"""

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

SLICE = 8  # vector elements each program writes per round


@triton.jit
def _rounds_kernel(counter_ptr, vector_ptr, stale_ptr, rounds, programs, EXCHANGE: tl.constexpr,
                   WIDTH: tl.constexpr):
    program = tl.program_id(0)
    offsets = tl.arange(0, WIDTH)
    length = programs * 8
    stale = tl.zeros((WIDTH,), tl.int32)
    for r in range(rounds):
        if EXCHANGE:  # write this round's slice (value r + 1) into the buffer the next round reads
            mine = tl.arange(0, 8)
            tl.store(vector_ptr + ((r + 1) % 2) * WIDTH + program * 8 + mine, tl.zeros((8,), tl.float32) + (r + 1))
        tl.debug_barrier()  # every thread's stores before the one thread's release
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        target = (r + 1) * programs
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while arrived < target:
            arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        if EXCHANGE:  # L1 is not coherent across multiprocessors: read through L2
            seen = tl.load(vector_ptr + ((r + 1) % 2) * WIDTH + offsets, mask=offsets < length, other=0.0,
                           cache_modifier=".cg")
            stale += ((seen != r + 1) & (offsets < length)).to(tl.int32)
    tl.store(stale_ptr + program, tl.sum(stale))


def _time_launch(programs: int, rounds: int, exchange: bool, runs: int) -> tuple[float, int, int]:
    """Median ms of `runs` launches; the counter after the last launch; its stale reads."""
    width = triton.next_power_of_2(programs * SLICE)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    vector = torch.zeros(2 * width, dtype=torch.float32, device="cuda")
    stale = torch.zeros(programs, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(runs + 1):  # the first launch compiles
        counter.zero_()
        vector.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _rounds_kernel[(programs,)](counter, vector, stale, rounds, programs, EXCHANGE=exchange, WIDTH=width,
                                    num_warps=4)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:]), int(counter.item()), int(stale.sum().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=0, help="programs (default: one per multiprocessor)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    properties = torch.cuda.get_device_properties(0)
    programs = args.programs or properties.multi_processor_count
    rows = []
    for mode in ("barrier", "exchange"):
        exchange = mode == "exchange"
        empty_ms, _, _ = _time_launch(programs, 0, exchange, args.runs)
        full_ms, counter, stale = _time_launch(programs, args.rounds, exchange, args.runs)
        if counter != programs * args.rounds:
            raise SystemExit(f"{mode}: the counter reached {counter}, not {programs * args.rounds}")
        rows.append(dict(mode=mode, programs=programs, rounds=args.rounds, launch_ms=empty_ms,
                         total_ms=full_ms, us_per_round=1e3 * (full_ms - empty_ms) / args.rounds,
                         stale_reads=stale))
        print(f"{mode:9s} {programs} programs: {rows[-1]['us_per_round']:.3f} us per round "
              f"(launch {empty_ms * 1e3:.1f} us, {args.rounds} rounds {full_ms:.3f} ms), stale reads {stale}",
              flush=True)
    report = dict(device=properties.name, torch=torch.__version__, triton=triton.__version__, rows=rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
