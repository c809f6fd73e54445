#!/bin/bash
# The paired LM comparison of issue 14: trains variants of the `compare` preset on the code corpus, each
# evaluated on its own right after training, so that runs made in different device calls and sessions can
# be paired later from their results.json (`python eval.py --merge ...`; results/lm_compare/README.md).
#
#   [STREAMS=N] [DEADLINE=EPOCH_SECONDS] bash results/lm_compare/run.sh OUT_DIR SEED:VARIANT [...]
#
# VARIANT: dense block window window2b bridge prefix shifted. Run from the repository root on one GPU with
# data/ prepared (python -m sparse_attention.data prepare). Every run: 380 updates x 32 x 4096 tokens.
# STREAMS (default 1) runs that many processes side by side on the GPU, each taking every STREAMS-th run in
# order and 0.9/STREAMS of its memory. The runs' losses do not depend on it; their tokens/s do, so with
# STREAMS > 1 the training throughput in metrics.jsonl is no measure of anything.
# DEADLINE: a run that would start less than RUN_SECONDS (default 300) before it is skipped, and says so.
# OUT_DIR/lm_runs.tar.gz is rewritten after every run (a device call returns at most 8 files), holding
# commands.txt, environment.txt, gpu.csv (nvidia-smi every 5 s: clocks, power, temperature, load) and for
# each run: config.json, metrics.jsonl, train_summary.json, the training and eval logs, and
# eval/results.json + report.md. They are staged in runs/lm_compare_out/.
set -u
tarball=$1/lm_runs.tar.gz
shift
out=runs/lm_compare_out
streams=${STREAMS:-1}
mkdir -p "$out" "$(dirname "$tarball")" runs/lm_compare
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}  # seeds of a variant share compiles
export XLA_PYTHON_CLIENT_MEM_FRACTION
XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $streams, 3))")
{
  echo "commit ${COMMIT:-$(git rev-parse HEAD)}, streams $streams"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices()[0].device_kind)"
  date -u +%FT%TZ
} >> "$out/environment.txt" 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used,clocks_throttle_reasons.active \
  --format=csv -l 5 >> "$out/gpu.csv" 2>&1 &
smi_pid=$!
trap 'kill $smi_pid 2>/dev/null' EXIT
config_of() {  # variant -> config file and overrides
  case $1 in
    dense) echo "configs/dense.py:compare" ;;
    block) echo "configs/block.py:compare" ;;
    window) echo "configs/window.py:compare" ;;
    window2b) echo "configs/window.py:compare --config.attention.pattern=window(1024)" ;;
    bridge) echo "configs/repaired.py:compare" ;;
    prefix) echo "configs/repaired.py:compare,prefix" ;;
    shifted) echo "configs/block.py:compare --config.attention.pattern=shifted(512)" ;;
    *) echo "unknown variant $1 (dense block window window2b bridge prefix shifted)" >&2; return 1 ;;
  esac
}
for run in "$@"; do config_of "${run#*:}" > /dev/null || exit 2; done
# Identical for every run, so that --merge can pair them: 62 code files and 22 books, the first 64 KiB of
# each in two chunks of 32 KiB (124 and 44 units), at C = T/4, T and 4T.
eval_args=(--eval-sets code:long books:long --lengths 1024 4096 16384 --max-document-tokens 65536
           --document-chunk-tokens 32768 --block-size 512 --ablation-targets 8 --batch-tokens 65536 --no-diagnostics)
run_one() {
  local seed=${1%%:*} variant=${1#*:}
  local name="${variant}_s${seed}" config
  read -r -a config <<< "$(config_of "$variant")"
  if [[ -n ${DEADLINE:-} ]] && (( $(date +%s) + ${RUN_SECONDS:-300} > DEADLINE )); then
    echo "$name skipped: too close to the deadline" >> "$out/commands.txt"
    return
  fi
  local workdir="runs/lm_compare/$name"
  mkdir -p "$out/$name"
  echo "python3 train.py --config ${config[*]} --workdir $workdir --config.seed=$seed" >> "$out/commands.txt"
  python3 train.py --config "${config[@]}" --workdir "$workdir" --config.seed="$seed" > "$out/$name/train.log" 2>&1
  echo "$name train rc $?" >> "$out/commands.txt"
  echo "python3 eval.py --workdirs $workdir --out $out/$name/eval ${eval_args[*]}" >> "$out/commands.txt"
  python3 eval.py --workdirs "$workdir" --out "$out/$name/eval" "${eval_args[@]}" > "$out/$name/eval.log" 2>&1
  echo "$name eval rc $?" >> "$out/commands.txt"
  rm -f "$out/$name"/eval/*.png
  cp "$workdir"/metrics.jsonl "$workdir"/train_summary.json "$workdir"/config.json "$out/$name/" 2>/dev/null
  (
    flock 9
    tar -czf "$tarball.tmp" --exclude=.tar.lock -C "$out" . && mv "$tarball.tmp" "$tarball"
  ) 9> "$out/.tar.lock"
  grep "^$name" "$out/commands.txt" | tail -n 2
}
runs=("$@")
stream_pids=()
for ((stream = 0; stream < streams; stream++)); do
  (
    for ((i = stream; i < ${#runs[@]}; i += streams)); do run_one "${runs[i]}"; done
  ) &
  stream_pids+=($!)
done
wait "${stream_pids[@]}"
