python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, triton, torch; print(sys.version.split()[0], jax.__version__, triton.__version__, torch.__version__)"; } > $OUT/env.txt 2>&1
timeout 100 python3 results/decode_bench/grid_barrier/barrier.py --out $OUT/barrier.json > $OUT/barrier.log 2>&1; echo "barrier rc $?"; tail -4 $OUT/barrier.log
BENCH="python3 -m lm_experiment.decode_bench --preset small --steps 64 --runs 10 --warmup 1 --patterns dense;block(512);window(1024) --impls xla,triton"
date -u >> $OUT/env.txt
timeout 130 $BENCH --contexts 262144,524288 --batches 1 --out $OUT/contexts.json > $OUT/contexts.log 2>&1; echo "contexts rc $?"
date -u >> $OUT/env.txt
timeout 320 $BENCH --contexts 131072 --batches 1,2,4,8,16 --out $OUT/batches.json > $OUT/batches.log 2>&1; echo "batches rc $?"
date -u >> $OUT/env.txt
grep -E "^\|? *(dense|block|window)" $OUT/contexts.log $OUT/batches.log | tail -50
