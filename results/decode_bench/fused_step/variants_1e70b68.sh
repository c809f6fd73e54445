# Issue 19: hardware tests at this commit, then variants of the fused step's constants (edited on this copy
# only, restored after each) timed on block(512) and window(1024) at 128k, batch 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, triton; print(sys.version.split()[0], jax.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
timeout 100 python3 -m pytest -v -n 4 -p no:cacheprovider tests/lm_experiment/test_fused_decode.py -k "compiled" > $OUT/gpu_tests.log 2>&1
tail -2 $OUT/gpu_tests.log
F=lm_experiment/fused_decode.py
cp $F /tmp/fused_decode.orig
for variant in "base:" "pw1:s/^PROJECTION_WARPS = 4/PROJECTION_WARPS = 1/" "pw2:s/^PROJECTION_WARPS = 4/PROJECTION_WARPS = 2/" \
    "rows8_pw1:s/^PROJECTION_ROWS = 4/PROJECTION_ROWS = 8/;s/^PROJECTION_WARPS = 4/PROJECTION_WARPS = 1/" \
    "rows8_pw2:s/^PROJECTION_ROWS = 4/PROJECTION_ROWS = 8/;s/^PROJECTION_WARPS = 4/PROJECTION_WARPS = 2/" \
    "rows2_pw1:s/^PROJECTION_ROWS = 4/PROJECTION_ROWS = 2/;s/^PROJECTION_WARPS = 4/PROJECTION_WARPS = 1/" \
    "span32:s/^ATTENTION_SPAN = 64/ATTENTION_SPAN = 32/" "span128_aw8:s/^ATTENTION_SPAN = 64/ATTENTION_SPAN = 128/;s/^ATTENTION_WARPS = 4/ATTENTION_WARPS = 8/"; do
  name=${variant%%:*}; edit=${variant#*:}
  cp /tmp/fused_decode.orig $F; [ -n "$edit" ] && sed -i "$edit" $F
  echo "## $name: $(grep -E '^(PROJECTION_ROWS|PROJECTION_WARPS|ATTENTION_SPAN|ATTENTION_WARPS) =' $F | tr '\n' ' ')" | tee -a $OUT/variants.log
  timeout 60 python3 -m lm_experiment.decode_bench --preset small --contexts 131072 --batches 1 --steps 64 --runs 10 --warmup 1 --patterns "block(512);window(1024)" --impls triton --out $OUT/variant_$name.json 2>&1 | grep -E "triton|rror" | tee -a $OUT/variants.log
done
cp /tmp/fused_decode.orig $F
date -u >> $OUT/env.txt
