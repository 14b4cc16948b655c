#!/usr/bin/env bash
# One call on a GPU machine: the CUDA parity tests, then `minseg bench --device cuda --ops`, then a profile of
# Mask R-CNN, RoIAlign and NMS (minseg beside torchvision: device time, kernel launches, busiest kernels).
# Installs nothing from the network: it needs torch, torchvision (and smp for U-Net) already importable.
# Usage (repo root):  bash tools/gpu_check.sh        logs go to $OUT (device tool) or out/gpu/
# TEST_TIMEOUT, BENCH_TIMEOUT, PROFILE_TIMEOUT (seconds, default 300, 300, 120) and REPEATS (default 10) bound
# the steps; PROFILE_TIMEOUT=0 skips the profile.
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${MINSEG_PARITY_DIR:-}" ] || { [ -d shared/parity ] && export MINSEG_PARITY_DIR="$PWD/shared/parity"; }
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/env.log"
timeout "${TEST_TIMEOUT:-300}" "$py" -m pytest tests -q -rfE --durations=10 -k "cuda or autocast" -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-300}" "$py" -m minseg bench --device cuda --ops --repeats "${REPEATS:-10}" 2>&1 | tee "$out/bench_cuda.log"
bench=${PIPESTATUS[0]}
if [ "${PROFILE_TIMEOUT:-120}" != 0 ]; then
  timeout "${PROFILE_TIMEOUT:-120}" "$py" -m minseg_ref.profile_tables --device cuda 2>&1 | tee "$out/profile_cuda.log"
fi
echo "cuda tests exit $tests, bench exit $bench" | tee -a "$out/env.log"
exit $(( tests != 0 || bench != 0 ))
