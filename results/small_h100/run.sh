#!/bin/bash
# The comparison run of results/ (issue 6): trains the seven variants of the `small` preset at one seed on
# the code corpus with the same token budget, then evaluates them on the long code documents and the books.
#
#   bash results/small_h100/run.sh SEED OUT_DIR [STEP ...]
#
# STEPs (default: all, in this order): dense block window window1024 bridge prefix shifted eval. A device
# call is limited to 10 minutes, so a seed's runs may be split over calls on the same warm machine.
#
# Run from the repository root on one GPU, with data/ prepared (python -m sparse_attention.data prepare).
# Every run: 120 updates x 8 sequences x 8192 tokens = 7.86 M training tokens, warmup 12, pallas_gpu.
set -u
seed=$1
out=$2
shift 2
steps=${*:-dense block window window1024 bridge prefix shifted eval}
wanted() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out" runs/results
{
  echo "commit ${COMMIT:-$(git rev-parse HEAD)}"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
  date -u +%FT%TZ
} >> "$out/environment.txt" 2>&1
common=(--config.seed="$seed" --config.train.steps=120 --config.train.warmup_steps=12
        --config.train.global_batch=8 --config.train.seq_len=8192 --config.train.log_every=10
        --config.train.checkpoint_every=0 --config.attention.impl=pallas_gpu)
train() {  # name, config, extra overrides...
  local name=$1 config=$2
  shift 2
  wanted "$name" || return 0
  local workdir="runs/results/${name}_s${seed}"
  echo "python3 train.py --config $config --workdir $workdir ${common[*]} $*" >> "$out/commands.txt"
  timeout 170 python3 train.py --config "$config" --workdir "$workdir" "${common[@]}" "$@" \
    > "$out/train_${name}.log" 2>&1
  echo "$name rc $?" >> "$out/commands.txt"
  mkdir -p "$out/train/${name}_s${seed}"
  cp "$workdir"/metrics.jsonl "$workdir"/train_summary.json "$workdir"/config.json "$out/train/${name}_s${seed}/" 2>/dev/null
}
train dense configs/dense.py:small
train block configs/block.py:small
train window configs/window.py:small
train window1024 configs/window.py:small --config.attention.pattern="window(1024)"
train bridge configs/repaired.py:small
train prefix configs/repaired.py:small,prefix
train shifted configs/block.py:small --config.attention.pattern="shifted(512)"
wanted eval || exit 0
eval_args=(--workdirs runs/results/*_s"$seed" --out "$out/eval" --lengths 8192 16384 --max-documents 6
           --max-document-tokens 16384 --ablation-targets 8 --no-diagnostics)
echo "python3 eval.py ${eval_args[*]}" >> "$out/commands.txt"
timeout 200 python3 eval.py "${eval_args[@]}" > "$out/eval.log" 2>&1
echo "eval rc $?" >> "$out/commands.txt"
