python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt; } > $OUT/env.txt 2>&1
timeout 150 python3 -m pytest -v -n 4 -p no:cacheprovider tests/lm_experiment/test_fused_decode.py -k "compiled" > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
date -u >> $OUT/env.txt
F=lm_experiment/fused_decode.py; cp $F /tmp/orig.py
for rows in 1 2 8 16; do
  cp /tmp/orig.py $F; sed -i "s/^BATCH_ROWS = 4 /BATCH_ROWS = $rows /" $F; grep "^BATCH_ROWS" $F
  timeout 100 python3 -m lm_experiment.decode_bench --preset small --steps 64 --runs 10 --warmup 1 --contexts 131072 --batches 2,4,8,16 --patterns "block(512)" --impls triton --out $OUT/rows$rows.json > $OUT/rows$rows.log 2>&1
  grep -E "^block" $OUT/rows$rows.log | grep -v measured
done
cp /tmp/orig.py $F; date -u >> $OUT/env.txt
