# Session 17, call 6: default-tile hardware tests with late_prefetch; both peers at 32k, window(1024) at 128k and with 4 kv heads.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
timeout 100 python3 -m pytest -v -n 8 -p no:cacheprovider tests/sparse_attention/kernels/test_mosaic_gpu.py::TestGpu -k "default_tiles and bfloat16" > $OUT/gpu_tests.log 2>&1
grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests.log | tail -5
ALL="block(512);repaired(512, 64, bridge);repaired(512, 64, prefix);block(512, 256);window(1024);dense;random_blocks(512, 3, 0);sinks(64) | window(1024)"
B="python3 -m lm_experiment.bench --modes fwd,fwd_bwd --warmup 2"
timeout 225 $B --seq 32768 --impls mosaic_gpu,cudnn,flex --runs 15 --paired-rounds 15 --patterns "$ALL" --out $OUT/mha_32k.json > /tmp/mha_32k.log 2>&1
{ echo "## mha_32k"; cat /tmp/mha_32k.log; } >> $OUT/all.log
sed -n '/# our fastest/,$p' /tmp/mha_32k.log
timeout 70 $B --seq 131072 --impls mosaic_gpu,cudnn --runs 5 --paired-rounds 6 --patterns "window(1024)" --out $OUT/window_128k.json > /tmp/window_128k.log 2>&1
{ echo "## window_128k"; cat /tmp/window_128k.log; } >> $OUT/all.log
sed -n '/# our fastest/,$p' /tmp/window_128k.log
timeout 55 $B --seq 32768 --kv-heads 4 --impls mosaic_gpu,cudnn --runs 15 --paired-rounds 15 --patterns "window(1024)" --out $OUT/window_gqa_32k.json > /tmp/window_gqa.log 2>&1
{ echo "## window_gqa_32k"; cat /tmp/window_gqa.log; } >> $OUT/all.log
sed -n '/# our fastest/,$p' /tmp/window_gqa.log
date -u >> $OUT/env.txt
