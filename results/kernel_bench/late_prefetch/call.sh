# Session 17, call 5: late_prefetch on the hardware (tests, and sweeps against the defaults).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
timeout 100 python3 -m pytest -v -n 3 -p no:cacheprovider tests/sparse_attention/kernels/test_mosaic_gpu.py::TestGpu -k "late_prefetch" > $OUT/gpu_tests.log 2>&1
grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -5
S=results/kernel_bench/tuning/sweep.py
V='[{"late_prefetch": true}]'
timeout 200 python3 $S --modes fwd,fwd_bwd --rounds 15 --variants "$V" --patterns "window(1024);sinks(64) | window(1024);block(512);repaired(512, 64, prefix)" --out $OUT/d128.json > $OUT/sweep.log 2>&1
timeout 120 python3 $S --modes fwd,fwd_bwd --rounds 15 --head-dim 64 --variants "$V" --patterns "window(1024);block(512)" --out $OUT/d64.json >> $OUT/sweep.log 2>&1
cut -c1-250 $OUT/sweep.log
date -u >> $OUT/env.txt
