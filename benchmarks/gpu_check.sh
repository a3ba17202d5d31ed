#!/usr/bin/env bash
# The GPU checks, in one call of a short GPU lease: the CUDA tests, then the training and latency
# benchmarks, each inside its share of a time budget. Figures and logs go to $OUT (default
# ./gpu-out): at most 8 files, none deeper than one folder. Record the figures in RESULTS.md.
#
#     bash benchmarks/gpu_check.sh [SECONDS]      # from the repository root; default 480 s
#
# Wheels of packages the machine lacks, saved under .whl/ and .whl-scale/ beside the checkout
# (bitsandbytes, fastapi + uvicorn + pydantic for the server rows, datasets, deepspeed), are
# installed into /tmp/site first. A saved tokenizer under .gpu/tokenizer serves latency.py.
set -u
budget=${1:-480}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
OUT=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)

wheels=$(ls .whl/*.whl .whl-scale/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1

# 1. The CUDA tests: the step never waits for the GPU, graphs replay what eager computes, the key/value check.
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_fast.py tests/test_train.py tests/serve/test_static.py 2>&1 | tee "$OUT/gpu-tests.log"

# 2. Training: fimtune's step; the same with PyTorch's dropout masks kept, and with the key/value head
#    repeated (what each change saves); naive bf16.
timeout $(($(left) * 2 / 5)) python3 benchmarks/train_throughput.py --variants c,c-torch-dropout,c-repeat-kv,b \
    --budget-s $(($(left) * 2 / 5 - 40)) --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"

# 3. Completion latency: the engine's variants side by side, the server rows, a profile of the step.
cd benchmarks && timeout $(($(left) - 5)) python3 latency.py --device cuda --shape starcoderbase-1b \
    --no-generate-static --budget-s $(($(left) - 40)) --profile-step "$OUT/profile" \
    --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"
