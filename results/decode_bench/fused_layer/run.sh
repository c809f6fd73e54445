python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, triton; print(sys.version.split()[0], jax.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
for a in "132 1" "3 0"; do timeout 40 python3 .before/diag.py $a > $OUT/diag_${a/ /_}.log 2>&1; echo "rc $?"; grep -v -i warn $OUT/diag_${a/ /_}.log | tail -6; done 2>&1 | tee $OUT/diag.log
BENCH="python3 -m lm_experiment.decode_bench --preset small --contexts 131072 --batches 1 --steps 64 --runs 10 --warmup 1"
F=lm_experiment/fused_decode.py
if grep -q "us per call" $OUT/diag.log && ! grep -q "min/max 0" $OUT/diag.log; then
  timeout 150 $BENCH --impls xla,triton --out $OUT/persistent.json > $OUT/persistent.log 2>&1
  grep -E "xla|triton|rror|ratio" $OUT/persistent.log | tail -30
  cp $F /tmp/fused_decode.orig
  for variant in "noprefetch:s/^PREFETCH_WEIGHTS = True/PREFETCH_WEIGHTS = False/"; do
    name=${variant%%:*}; edit=${variant#*:}
    cp /tmp/fused_decode.orig $F; [ -n "$edit" ] && sed -i "$edit" $F; [ $name = five ] && cp .before/fused_decode_five.py $F
    echo "## $name" | tee -a $OUT/variants.log
    timeout 60 $BENCH --patterns "block(512);window(1024)" --impls triton --out $OUT/variant_$name.json 2>&1 | grep -E "triton|rror" | tee -a $OUT/variants.log
  done
  cp /tmp/fused_decode.orig $F
  timeout 100 python3 -m pytest -v -n 4 -p no:cacheprovider tests/lm_experiment/test_fused_decode.py -k "compiled" > $OUT/gpu_tests.log 2>&1
  tail -3 $OUT/gpu_tests.log
fi
date -u >> $OUT/env.txt
