# Session 17, call 1: Nsight Compute on window(1024) (forward d128 and d64, backward d128) and dense forward, ours and cuDNN's.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt; ncu --version | tail -1;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
cd results/kernel_bench/fused_dq
P="python3 profile_backward.py --seq 32768"
N="ncu --clock-control none --set full --import-source no"
run() {  # name, kernel regex, launch count, profile_backward args
  timeout 170 $N --kernel-name "regex:$2" --launch-count $3 -f -o /tmp/$1 $P $4 > /tmp/$1.log 2>&1
  echo "## $1 rc=$?" >> $OUT/ncu.log; tail -5 /tmp/$1.log >> $OUT/ncu.log
  ncu --import /tmp/$1.ncu-rep --page raw --csv > $OUT/$1.csv 2>> $OUT/ncu.log
}
run window_fwd_d128 'sparse_attention_forward|fprop' 2 '--pattern window(1024) --mode fwd'
run window_fwd_d64 'sparse_attention_forward|fprop' 2 '--pattern window(1024) --mode fwd --head-dim 64'
run dense_fwd_d128 'sparse_attention_forward|fprop' 2 '--pattern dense --mode fwd'
run window_bwd_d128 'sparse_attention_dkdv|sparse_attention_dq|bprop' 4 '--pattern window(1024)'
cd -
python3 results/kernel_bench/window_profile/summarize.py $OUT/*.csv > $OUT/summary.md 2>> $OUT/ncu.log
cat $OUT/summary.md; tail -30 $OUT/ncu.log
date -u >> $OUT/env.txt
