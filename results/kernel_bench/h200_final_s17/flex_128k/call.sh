# Session 17, call 3: every block-sparse pattern of issue 15 against FlexAttention at 128k, in one run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv; date -u; cat .before/commit.txt;
  python3 -c "import sys, jax, torch, triton; print(sys.version.split()[0], jax.__version__, torch.__version__, triton.__version__)"; } > $OUT/env.txt 2>&1
SIX="block(512);repaired(512, 64, bridge);repaired(512, 64, prefix);block(512, 256);random_blocks(512, 3, 0);sinks(64) | window(1024)"
timeout 330 python3 -m lm_experiment.bench --modes fwd,fwd_bwd --warmup 2 --seq 131072 --impls mosaic_gpu,flex --runs 5 --patterns "$SIX" --out $OUT/flex_128k.json > $OUT/flex_128k.log 2>&1
echo "rc=$?"; sed -n '/# our fastest/,$p' $OUT/flex_128k.log
date -u >> $OUT/env.txt
