python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt; } > $OUT/env.txt 2>&1
F=lm_experiment/fused_decode.py
BENCH="python3 -m lm_experiment.decode_bench --preset small --steps 64 --runs 10 --warmup 1 --contexts 131072 --impls triton"
for round in 1 2; do for version in 1744b8c new; do
  cp .before/fused_decode_$version.py $F
  timeout 80 $BENCH --batches 1,2,4 --patterns "block(512);window(1024)" --out $OUT/order_${version}_$round.json > $OUT/order_${version}_$round.log 2>&1
  echo "## $version $round"; grep -E "^(block|window)" $OUT/order_${version}_$round.log | grep -v measured
done; done
cp .before/fused_decode_new.py $F; date -u >> $OUT/env.txt
timeout 60 $BENCH --batches 2,4 --patterns "dense" --out $OUT/dense_new.json > $OUT/dense_new.log 2>&1; grep -E "^dense" $OUT/dense_new.log
date -u >> $OUT/env.txt
timeout 140 python3 -m pytest -v -n 4 -p no:cacheprovider tests/lm_experiment/test_fused_decode.py -k "compiled" > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
date -u >> $OUT/env.txt
