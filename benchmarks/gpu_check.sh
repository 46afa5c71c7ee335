#!/usr/bin/env bash
# The GPU checks of issue 14 (and 13) in one call on a lent machine, sized for its device budget
# (15 minutes a session, 10 a command): pick one stage a call.
#   bash benchmarks/gpu_check.sh e2e        # step vs floor, BatchAugment, DataLoader, end to end (~8 min)
#   bash benchmarks/gpu_check.sh compile    # the same end to end with --compile (~8 min)
#   bash benchmarks/gpu_check.sh tests      # the test suite on the GPU machine (-x, ~6 min)
#   bash benchmarks/gpu_check.sh convirt    # the main job at ResNet-50 / 224 px, heuristic and softmax, seed 0
# Set-up as ../shared/GPU.md: pydicom and the pylibjpeg plugins from the wheels in .whl/ (named in the
# run's carry), the demo data rebuilt inside the call. Results go to $OUT (default /tmp/gpu-out);
# SMOKE=1 runs every stage at toy sizes on the CPU, to check this script before spending device time.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?name a stage: e2e, compile, tests or convirt}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
if [ -d .whl ]; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export MEDSSL_DEMO_DIR=${MEDSSL_DEMO_DIR:-/tmp/demo} MEDSSL_CACHE=${MEDSSL_CACHE:-/tmp/cache} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" data.py demo "$MEDSSL_DEMO_DIR" > /dev/null
if [ "${SMOKE:-0}" = 1 ]; then  # toy sizes on the CPU
    big=(--device cpu --arch resnet18 --size 32 --batch-size 8 --projector 32-32 --steps 1 --repeats 1 --warmup 0)
    e2e=(--e2e-images 32 --e2e-epochs 2 --e2e-source-size 48 --e2e-workers 1 --configs convirt-sigmoid simclr)
    loader=(--loader-images 16 --workers 0 1)
    convirt=(--device cpu --arch resnet18 --size 32 --batch-size 8 --epochs 2 --workers 1 --eval-every 1)
    studies=64
else
    big=(--device cuda --arch resnet50 --size 224 --batch-size 256 --projector 8192-8192-8192)
    e2e=(--e2e-images 2048 --e2e-epochs 3 --e2e-workers 16)
    loader=(--loader-images 2048 --workers 0 16)
    convirt=(--device cuda --arch resnet50 --size 224 --batch-size 32 --epochs 30 --workers 16 --eval-every 15)
    studies=4096
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>/dev/null || echo cpu > "$out/device.txt"
case $stage in
    e2e)
        "$py" benchmarks/bench.py "${big[@]}" --loss-sizes 256 1024 4096 --augment --loader "${loader[@]}" \
            --end-to-end "${e2e[@]}" --out "$out/results-gpu.json" | tee "$out/e2e.txt" ;;
    compile)
        "$py" benchmarks/bench.py "${big[@]}" --compile --losses-only --loss-sizes 256 \
            --end-to-end "${e2e[@]}" --out "$out/results-gpu-compile.json" | tee "$out/compile.txt" ;;
    tests)
        "$py" -m pytest -q -x 2>&1 | tail -30 | tee "$out/tests.txt" ;;
    convirt)
        "$py" data.py demo /tmp/pairs --studies $studies --size 256 > /dev/null
        pairs=(--data /tmp/pairs/mimic --split-csv /tmp/pairs/mimic/mimic-cxr-2.0.0-split.csv
               --eval-labels /tmp/pairs/mimic/validate-chexpert.csv --eval-root /tmp/pairs/mimic)
        for loss in sigmoid softmax; do
            "$py" convirt.py --loss $loss "${convirt[@]}" "${pairs[@]}" --out "$out/convirt-$loss" 2>&1 \
                | grep -v "it/s" | tail -5 | tee "$out/convirt-$loss.txt"
            rm -f "$out/convirt-$loss/checkpoint.pt"  # too large to come back; log.jsonl and args.json do
        done ;;
    *) echo "unknown stage $stage: e2e, compile, tests or convirt" >&2; exit 2 ;;
esac
