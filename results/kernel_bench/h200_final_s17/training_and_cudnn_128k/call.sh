# Session 17, call 2: the small preset's training step at 32k, HEAD against a503689; window(1024) and dense against cuDNN at 128k.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -l 5 > $OUT/gpu_call.csv &
ARGS="--config.attention.impl=mosaic_gpu --config.train.seq_len=32768 --config.train.steps=6 --config.train.log_every=3 --config.train.checkpoint_every=0 --config.train.warmup_steps=2 --config.data.data_dir=$ROOT/.before/data"
PYTHONPATH=/tmp/site:$ROOT timeout 150 python3 train.py --config configs/block.py:small --workdir /tmp/run_after $ARGS > /tmp/train_after.log 2>&1
{ echo "## train after"; tail -n 4 /tmp/train_after.log; cat /tmp/run_after/metrics.jsonl; } >> $OUT/all.log
mkdir -p /tmp/before && tar -xzf .before/before_a503689.tar.gz -C /tmp/before
cd /tmp/before && PYTHONPATH=/tmp/site:/tmp/before timeout 150 python3 train.py --config configs/block.py:small --workdir /tmp/run_before $ARGS > /tmp/train_before.log 2>&1
{ echo "## train before"; tail -n 4 /tmp/train_before.log; cat /tmp/run_before/metrics.jsonl; } >> $OUT/all.log
cd $ROOT
export PYTHONPATH=/tmp/site:$ROOT
B="python3 -m lm_experiment.bench --modes fwd,fwd_bwd --warmup 2"
timeout 150 $B --seq 131072 --impls mosaic_gpu,cudnn --runs 5 --paired-rounds 6 --patterns "window(1024);dense" --out $OUT/cudnn_128k.json > /tmp/cudnn_128k.log 2>&1
{ echo "## cudnn_128k"; cat /tmp/cudnn_128k.log; } >> $OUT/all.log
grep -A3 "^## train" $OUT/all.log | cut -c1-200; sed -n '/# our fastest/,$p' /tmp/cudnn_128k.log
date -u >> $OUT/env.txt
