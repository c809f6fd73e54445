# Session 17, call 4: one timed call's GPU time, ours against cuDNN's (JAX profiler traces), window(1024) and dense.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
T=results/kernel_bench/window_profile/trace_calls.py
timeout 150 python3 $T --seq 32768 --pattern "window(1024)" --out $OUT/trace_window_d128.json > $OUT/trace.log 2>&1
timeout 100 python3 $T --seq 32768 --pattern "window(1024)" --head-dim 64 --out $OUT/trace_window_d64.json >> $OUT/trace.log 2>&1
timeout 120 python3 $T --seq 32768 --pattern "dense" --out $OUT/trace_dense_d128.json >> $OUT/trace.log 2>&1
cut -c1-400 $OUT/trace.log
date -u >> $OUT/env.txt
