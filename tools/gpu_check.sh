#!/usr/bin/env bash
# One call on a GPU machine: the CUDA parity tests (inference and training), then `minseg bench --device cuda --ops`,
# then the Mask R-CNN training step (`--train`), then a profile of Mask R-CNN, RoIAlign and NMS (minseg beside
# torchvision: device time, kernel launches, busiest kernels).
# Installs nothing from the network: it needs torch, torchvision (and smp for U-Net) already importable.
# Usage (repo root):  bash tools/gpu_check.sh        logs go to $OUT (device tool) or out/gpu/
# TEST_TIMEOUT, BENCH_TIMEOUT, TRAIN_TIMEOUT, PROFILE_TIMEOUT (seconds, default 240, 180, 90, 60: 570 in all, under
# the device tool's 600 s a call) and REPEATS (default 10) bound the steps; a timeout of 0 skips its step.
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${MINSEG_PARITY_DIR:-}" ] || { [ -d shared/parity ] && export MINSEG_PARITY_DIR="$PWD/shared/parity"; }
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/env.log"
tests=0 bench=0
if [ "${TEST_TIMEOUT:-240}" != 0 ]; then
  timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest tests -q -rfE --durations=10 -k "cuda or autocast" -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
  tests=${PIPESTATUS[0]}
fi
if [ "${BENCH_TIMEOUT:-180}" != 0 ]; then
  timeout "${BENCH_TIMEOUT:-180}" "$py" -m minseg bench --device cuda --ops --repeats "${REPEATS:-10}" 2>&1 | tee "$out/bench_cuda.log"
  bench=${PIPESTATUS[0]}
fi
if [ "${TRAIN_TIMEOUT:-90}" != 0 ]; then
  timeout "${TRAIN_TIMEOUT:-90}" "$py" -m minseg bench --device cuda --train --model maskrcnn_resnet50_fpn \
    --model maskrcnn_resnet50_fpn_v2 --repeats "${REPEATS:-10}" 2>&1 | tee "$out/bench_cuda_train.log"
fi
if [ "${PROFILE_TIMEOUT:-60}" != 0 ]; then
  timeout "${PROFILE_TIMEOUT:-60}" "$py" -m minseg_ref.profile_tables --device cuda 2>&1 | tee "$out/profile_cuda.log"
fi
echo "cuda tests exit $tests, bench exit $bench" | tee -a "$out/env.log"
exit $(( tests != 0 || bench != 0 ))
