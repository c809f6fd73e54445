python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt; } > $OUT/env.txt 2>&1
timeout 170 python3 -m lm_experiment.decode_bench --preset small --steps 64 --runs 10 --warmup 1 --contexts 131072 --batches 8,16 --patterns "window(1024);dense" --impls triton,xla --out $OUT/large_batches.json > $OUT/large_batches.log 2>&1
grep -E "^(dense|window)" $OUT/large_batches.log
date -u >> $OUT/env.txt
